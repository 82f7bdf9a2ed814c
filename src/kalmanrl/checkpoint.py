"""Resumable training state without pickle: the policy as a save_pretrained directory, the optimizer and the RNG
states as safetensors plus a JSON manifest. A checkpoint written from a different settings hash is never resumed."""

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

from kalmanrl.io import atomic_path, read_parquet, write_parquet
from kalmanrl.layout import checkpoint_dir

MANIFEST = "trainer_state.json"


@dataclass
class Resumed:
    step: int
    metrics: pd.DataFrame


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for param_id, param_state in state["state"].items():
        for key, value in param_state.items():
            if torch.is_tensor(value):
                tensors[f"{param_id}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{param_id}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for name, value in [*tensors.items(), *meta["scalars"].items()]:
        param_id, key = name.split(".", 1)
        state.setdefault(int(param_id), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _rng_tensors() -> dict[str, torch.Tensor]:
    return {"torch_cpu": torch.get_rng_state(),
            **({"torch_cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {})}


def save_checkpoint(root: Path, step: int, *, policy, tokenizer, optimizer, scheduler, metrics: pd.DataFrame,
                    settings_hash: str, keep_every: int = 0) -> Path:
    """Write checkpoints/step_{step} atomically and drop older ones (the newest is all a resume needs), except those
    of every `keep_every`-th step, which are kept for evaluation."""
    target = checkpoint_dir(root, step)
    with atomic_path(target, directory=True) as tmp:
        policy.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        tensors, optim_meta = _optimizer_tensors(optimizer)
        save_file(tensors, tmp / "optimizer.safetensors")
        save_file(_rng_tensors(), tmp / "rng.safetensors")
        write_parquet(metrics, tmp / "metrics.parquet")
        manifest = {"step": step, "settings_hash": settings_hash, "optimizer": optim_meta,
                    "scheduler": scheduler.state_dict(), "python_random": _jsonable(random.getstate()),
                    "numpy_random": _jsonable(np.random.get_state())}
        (tmp / MANIFEST).write_text(json.dumps(manifest))
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
    """Restore weights, optimizer, scheduler and RNG streams in place; return the step to continue from."""
    from safetensors.torch import load_model

    load_model(policy, path / "model.safetensors", strict=False)
    manifest = json.loads((path / MANIFEST).read_text())
    _load_optimizer(optimizer, load_file(path / "optimizer.safetensors"), manifest["optimizer"])
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
