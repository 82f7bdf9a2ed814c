"""Resumable training state without pickle: policy and optimiser sharded with `torch.distributed.checkpoint` (each
rank writes its own shards, keyed by parameter name, so a run saved on N ranks resumes on any number), the RNG states
as safetensors plus a JSON manifest. Checkpoints kept for evaluation also hold the policy as a save_pretrained
directory. A checkpoint written from a different settings hash is never resumed."""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from kalmanrl.distributed import Ranks, load_sharded, save_sharded, shared_atomic_dir, write_full_model
from kalmanrl.io import read_parquet, write_parquet
from kalmanrl.layout import checkpoint_dir

MANIFEST = "trainer_state.json"
SHARDED = "sharded"  # the torch.distributed.checkpoint directory: policy and optimiser state


@dataclass
class Resumed:
    step: int
    metrics: pd.DataFrame


def _rng_tensors() -> dict[str, torch.Tensor]:
    return {"torch_cpu": torch.get_rng_state(),
            **({"torch_cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {})}


def save_checkpoint(root: Path, step: int, *, policy, tokenizer, optimizer, scheduler, metrics: pd.DataFrame,
                    settings_hash: str, keep_every: int = 0, ranks: Ranks = Ranks()) -> Path:
    """Write checkpoints/step_{step} atomically (every rank must call it) and drop older ones (the newest is all a
    resume needs), except those of every `keep_every`-th step, which are kept, with a save_pretrained policy, for
    evaluation. The RNG states are rank 0's."""
    target = checkpoint_dir(root, step)
    kept = bool(keep_every) and step % keep_every == 0
    with shared_atomic_dir(target, ranks) as tmp:
        save_sharded(tmp / SHARDED, policy, optimizer)
        if kept:
            write_full_model(policy, tokenizer, tmp, ranks)
        if ranks.is_main:
            save_file(_rng_tensors(), tmp / "rng.safetensors")
            write_parquet(metrics, tmp / "metrics.parquet")
            manifest = {"step": step, "settings_hash": settings_hash, "scheduler": scheduler.state_dict(),
                        "python_random": _jsonable(random.getstate()),
                        "numpy_random": _jsonable(np.random.get_state())}
            (tmp / MANIFEST).write_text(json.dumps(manifest))
    if not ranks.is_main:
        return target
    for old in root.glob("step_*"):
        kept = keep_every and int(old.name.removeprefix("step_")) % keep_every == 0
        if old != target and not kept:
            shutil.rmtree(old, ignore_errors=True)
    return target


def latest_checkpoint(root: Path, settings_hash: str) -> Path | None:
    """The newest complete checkpoint written with the same settings, or None. Checkpoints of other settings are
    deleted, so a changed config restarts cleanly instead of resuming someone else's run."""
    found = None
    for path in sorted(root.glob("step_*")):
        manifest = path / MANIFEST
        if manifest.exists() and json.loads(manifest.read_text())["settings_hash"] == settings_hash:
            found = path
        else:
            shutil.rmtree(path, ignore_errors=True)
    return found


def load_checkpoint(path: Path, *, policy, optimizer, scheduler) -> Resumed:
    """Restore weights, optimizer (on any number of ranks: every rank must call it), scheduler and RNG streams in
    place; return the step to continue from."""
    load_sharded(path / SHARDED, policy, optimizer)
    manifest = json.loads((path / MANIFEST).read_text())
    scheduler.load_state_dict(manifest["scheduler"])
    rng = load_file(path / "rng.safetensors")
    torch.set_rng_state(rng["torch_cpu"])
    if "torch_cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["torch_cuda"])
    random.setstate(_tuples(manifest["python_random"]))
    np.random.set_state(_tuples(manifest["numpy_random"]))
    return Resumed(step=manifest["step"], metrics=read_parquet(path / "metrics.parquet"))


def _jsonable(value):
    if isinstance(value, np.ndarray):
        return {"__ndarray__": value.tolist(), "dtype": str(value.dtype)}
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    return value


def _tuples(value):
    if isinstance(value, dict) and "__ndarray__" in value:
        return np.asarray(value["__ndarray__"], dtype=value["dtype"])
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value
