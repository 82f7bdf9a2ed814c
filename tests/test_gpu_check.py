"""benchmarks/gpu_check.py, the command a lent GPU machine runs, kept from rotting: its CPU version runs the same
checks through the real trainer on tiny shapes and writes every field the GPU version reports; the GPU-only model
builder runs here on a shrunk Qwen3-4B config; a step cost that runs out of GPU memory is reported, not fatal."""

from __future__ import annotations

import functools
import importlib.util
import json
import subprocess
import sys

import pytest
import torch


@functools.cache  # once: the module registers its reward by name
def load_gpu_check(repo_root):
    spec = importlib.util.spec_from_file_location("gpu_check", repo_root / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_the_cpu_version_passes_every_check_and_writes_every_field(repo_root, tmp_path):
    result = subprocess.run([sys.executable, str(repo_root / "benchmarks" / "gpu_check.py"), "--device", "cpu",
                             "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["ok"] and set(report["correctness"]["precisions"]) == {"float32", "autocast_bf16", "bfloat16"}
    for name, row in report["correctness"]["precisions"].items():
        assert row["ratio_min"] == row["ratio_max"] == 1.0, name  # learning rate 0: the policy is the old policy
        assert row["kl"] == 0.0, name  # the reference is the policy, stored as it is
    assert report["correctness"]["checkpoint"] == {"weights_identical": True, "adam_state_identical": True,
                                                   "ok": True}
    budgets = report["costs"]["budgets"]
    assert [b["micro_batch_tokens"] for b in budgets] == [4 * 48, 16 * 48]
    for budget in budgets:
        assert budget["update_tokens_per_s"] > 0 and set(budget["planned_gib"]) == {"held", "scoring", "updating"}
    generation = report["costs"]["generation"]
    assert generation["tokens"] == generation["rows"] * generation["completion_len"] > 0  # no row ended early
    assert generation["tokens_per_s"] > 0 and generation["planned_gib"] > 0
    assert "| autocast_bf16 | 1.0 | 1.0 | 0 | True |" in (tmp_path / "gpu_check.md").read_text()


@pytest.mark.slow
def test_the_gpu_model_is_built_from_a_config_alone(repo_root):
    from transformers import AutoConfig

    gpu_check = load_gpu_check(repo_root)
    config = AutoConfig.from_pretrained(gpu_check.QWEN3_4B)
    config.update({"num_hidden_layers": 1, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2,
                   "num_key_value_heads": 1, "head_dim": 32, "vocab_size": 256})
    config.eos_token_id = 2  # Qwen3's own end of turn is past this vocabulary
    policy = gpu_check.random_policy(config, torch.device("cpu"))
    assert policy.is_gradient_checkpointing and next(policy.parameters()).dtype == torch.float32
    assert type(policy).__name__ == "Qwen3ForCausalLM"
    # check 4 on it: every row runs to its length, and the output head (tied to the embeddings) is given back
    head = policy.get_output_embeddings().weight.detach().clone()
    generation = gpu_check.generation_cost(policy, gpu_check.plan.model_shape(config), rows=16, prompt_len=8,
                                           completion_len=6)
    assert generation["tokens"] == 16 * 6 and torch.equal(policy.get_output_embeddings().weight, head)


def test_the_cpu_version_runs_on_the_cpu_where_cuda_is_usable(repo_root, tmp_path, monkeypatch):
    """`--device cpu` on the lent GPU machine (tests/test_gpu_check.py there) trained on CUDA while its report said
    cpu: the jobs were given gpus=None, which takes CUDA wherever it is usable."""
    gpu_check = load_gpu_check(repo_root)
    given = []

    class Given(Exception):
        pass

    def correctness(work, gpus):
        given.append(gpus)
        raise Given

    monkeypatch.setattr(gpu_check, "correctness", correctness)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--device", "cpu", "--out", str(tmp_path)])
    with pytest.raises(Given):
        gpu_check.main()
    assert given == [0]


def test_a_budget_that_runs_out_of_gpu_memory_is_a_row_of_the_report(repo_root, tmp_path, monkeypatch):
    """Qwen3-4B's shape needs more than an 80 GB card at the larger budget (kalmanrl plan): that budget's row says
    so, and the others' figures and the correctness checks are still reported."""
    gpu_check = load_gpu_check(repo_root)
    measured = {"micro_batch_tokens": 192, "rows": 16, "tokens": 768, "seconds": {"scoring": 1.0, "updating": 1.0},
                "update_tokens_per_s": 768.0, "measured_gib": {}, "planned_gib": {"held": 1.0},
                "measured_over_planned": {}}

    def step_cost(policy, settings, shape, **kwargs):
        if settings.train.micro_batch_tokens > 192:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.27 GiB\nmore detail")
        return dict(measured)

    monkeypatch.setattr(gpu_check, "step_cost", step_cost)
    costs = gpu_check.costs(tmp_path, 0, 989.0)
    assert costs["budgets"] == [{**measured, "model_flop_utilisation": None},
                                {"micro_batch_tokens": 768,
                                 "out_of_memory": "CUDA out of memory. Tried to allocate 9.27 GiB"}]
    report = {"device": "cuda", "date": "today", "torch": "2.13", "cuda": "13.0", "gpu": "H100", "ok": True,
              "correctness": {"precisions": {"float32": {"ratio_min": 1.0, "ratio_max": 1.0, "kl": 0.0, "ok": True}},
                              "training": {"reward_mean": [0.1], "loss": [0.0], "ok": True},
                              "checkpoint": {"ok": True}},
              "costs": costs}
    assert "| 768 | out of memory: CUDA out of memory. Tried to allocate 9.27 GiB |" in gpu_check.markdown(report)


def test_the_wheels_to_carry_are_what_the_config_validator_needs_beyond_torch_transformers_pandas_pyarrow(repo_root):
    """The lent machine is only promised torch, transformers, pandas and pyarrow (with what they require): every other
    package gpu_check imports, jsonschema and what it requires, must be in the docstring's download command, at the
    version of the lock."""
    import re
    from importlib import metadata

    from packaging.requirements import Requirement

    from kalmanrl.runtime.provenance import canonical_name, lock_pins

    def closure(names):
        """`names` and everything they require here (extras and other platforms' requirements left out)."""
        seen, todo = set(), [canonical_name(n) for n in names]
        while todo:
            name = todo.pop()
            if name in seen:
                continue
            seen.add(name)
            for requirement in map(Requirement, metadata.distribution(name).requires or []):
                if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                    todo.append(canonical_name(requirement.name))
        return seen

    needed = closure(["jsonschema"]) - closure(["torch", "transformers", "pandas", "pyarrow"])
    pins = lock_pins(repo_root / "locks" / "cpu.txt")
    command = load_gpu_check(repo_root).__doc__.split("pip download", 1)[1].split("# there:", 1)[0]
    named = {canonical_name(name): version for name, version in re.findall(r"([A-Za-z0-9._-]+)==(\S+)", command)}
    assert "attrs" in needed
    assert named == {name: pins[name] for name in needed}
