"""A training step's memory does not grow with the rollout batch at a fixed micro-batch budget (it does without
one), nor generation's with the completions' length beyond their KV cache, measured as the peak bytes of the tensors
the step creates (benchmarks/tensor_memory.py)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from conftest import IdsTokenizer
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


@pytest.mark.slow
def test_generation_holds_one_steps_logits_and_the_plan_counts_them(bench, monkeypatch):
    """The hf engine keeps the sampled tokens' log-probs, not every step's [rows, vocab] logits (at a 151,936-token
    vocabulary those are 0.6 MB per row and token), so longer completions cost only their KV cache; and the plan's
    estimate of a generate call (`plan.hf_generate_bytes`, the top-p sampler's tensors) is what it measures."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from kalmanrl.jobs import plan
    from kalmanrl.policy import rollout

    monkeypatch.setattr(rollout._RowSampler, "DRAW_BUDGET", 1)  # no uniforms drawn ahead (CPU only, not planned)
    config = Qwen2Config(vocab_size=8192, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, eos_token_id=1, pad_token_id=0,
                         bos_token_id=None, max_position_embeddings=512)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(100)[1] = 0  # the end token's logit 0 among logits hundreds apart: never sampled
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = 1, 0
    shape, prompts = plan.model_shape(config), [list(range(5 + i, 21 + i)) for i in range(4)]
    engine = rollout.HFEngine(model, IdsTokenizer())

    def peak(max_tokens: int) -> int:
        sampling = rollout.SamplingConfig(n=4, temperature=1.0, top_p=0.9, max_tokens=max_tokens, seed=0)
        with bench.TensorMemory() as memory:
            out = engine.generate(prompts, sampling)
        assert all(len(c.token_ids) == max_tokens for group in out for c in group)
        return memory.peak

    short, long = peak(8), peak(64)
    kv_growth = 16 * (64 - 8) * shape.kv_bytes_per_token("float32")
    assert long - short <= 2 * kv_growth, (short, long)  # every step's logits kept: 16 * 56 * 8192 * 4 more
    assert 0.8 <= long / plan.hf_generate_bytes(shape, 16, 16 + 64, "float32", batch_size=engine.batch_size) <= 1.1
