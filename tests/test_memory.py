"""A training step's memory does not grow with the rollout batch at a fixed micro-batch budget (it does without
one), measured as the peak bytes of the tensors the step creates (benchmarks/tensor_memory.py)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from kalmanrl.policy.model import load_policy


@pytest.fixture(scope="module")
def bench(repo_root):
    spec = importlib.util.spec_from_file_location("bench_train_step", repo_root / "benchmarks" / "bench_train_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tensor_memory_counts_new_storages_until_freed_and_not_views(bench):
    weight = torch.zeros(1000, 1000)
    with bench.TensorMemory() as memory:
        view = weight.t()  # no new storage
        a = torch.ones(500, 1000)  # 2 MB
        b = a * 2  # 2 MB
        del a
        c = torch.ones(250, 1000)  # 1 MB, a's bytes already freed
        b.add_(1)  # in place: nothing new
    assert memory.peak == 4_000_000 and memory.live == 3_000_000
    del view, b, c


def test_peak_step_memory_is_flat_when_the_rollout_batch_grows_4x(bench, tiny_model_dir):
    policy = load_policy(tiny_model_dir)[0]
    budget = 4 * (20 + 32)

    def peak(rows, budget):
        return bench.step_peak_memory(policy, rows=rows, group=4, prompt_len=20, completion_len=32,
                                      micro_batch_tokens=budget)

    small, large = peak(16, budget), peak(64, budget)
    assert large <= 1.10 * small, (small, large)
    unbudgeted_small, unbudgeted_large = peak(16, 10**9), peak(64, 10**9)  # the measurement sees growth
    assert unbudgeted_large > 2 * unbudgeted_small, (unbudgeted_small, unbudgeted_large)
