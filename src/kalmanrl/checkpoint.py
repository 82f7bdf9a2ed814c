"""Resumable training state without pickle. A checkpoint is a directory

    step_NNNNNN/trainer_state.json   the step and the settings hash it was written with
    step_NNNNNN/model/               the policy, save_pretrained in the model's configured dtype, and its tokenizer:
                                     nothing else, so vLLM and `kalmanrl evaluate` load it like any model directory
    step_NNNNNN/state/               what only a resume needs: optimizer and RNG tensors (safetensors), scheduler and
                                     Python/NumPy RNG (JSON), the metrics so far, and the full-precision weights when
                                     model/ holds a lower precision than training does

Only the newest checkpoint keeps its state/; a checkpoint kept for evaluation (`train.keep_every`) is thinned to its
model/ once a newer one exists. A checkpoint written from a different settings hash is never resumed."""

from __future__ import annotations

import json
import logging
import random
import shutil
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file, save_model

from kalmanrl.io import atomic_path, read_parquet, write_parquet
from kalmanrl.layout import checkpoint_dir, checkpoint_model_dir, checkpoint_state_dir
from kalmanrl.model import save_policy

log = logging.getLogger(__name__)

MANIFEST = "trainer_state.json"
RESUME = "resume.json"            # in state/: optimizer metadata, scheduler, Python and NumPy RNG
WEIGHTS = "weights.safetensors"   # in state/: the policy in its training precision, when model/ is lower


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
    """The CPU generator and one generator per visible CUDA device (`get_rng_state` alone is the current device's)."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {"torch_cpu": torch.get_rng_state(), **{f"torch_cuda_{i}": state for i, state in enumerate(cuda)}}


def _restore_rng(rng: dict[str, torch.Tensor], source: Path) -> None:
    torch.set_rng_state(rng["torch_cpu"])
    cuda = [rng[f"torch_cuda_{i}"] for i in range(sum(k.startswith("torch_cuda_") for k in rng))]
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if cuda and len(cuda) == available:
        torch.cuda.set_rng_state_all(cuda)
    elif cuda or available:
        log.warning("%s holds the CUDA generators of %d device(s), this process sees %d: CUDA random streams are not "
                    "restored, so the resumed run may differ from an uninterrupted one", source, len(cuda), available)


def save_checkpoint(root: Path, step: int, *, policy, tokenizer, optimizer, scheduler, metrics: pd.DataFrame,
                    settings_hash: str, dtype: str, keep_every: int = 0) -> Path:
    """Write checkpoints/step_{step} atomically (the policy in `dtype`, the model's configured dtype), then drop older
    checkpoints (the newest is all a resume needs) except those of every `keep_every`-th step, which are kept for
    evaluation as weights only."""
    target = checkpoint_dir(root, step)
    with atomic_path(target, directory=True) as tmp:
        save_policy(policy, tokenizer, checkpoint_model_dir(tmp), dtype=dtype)
        state = checkpoint_state_dir(tmp)
        state.mkdir()
        if any(p.dtype != getattr(torch, dtype) for p in policy.parameters()):
            save_model(policy, str(state / WEIGHTS))
        tensors, optim_meta = _optimizer_tensors(optimizer)
        save_file(tensors, state / "optimizer.safetensors")
        save_file(_rng_tensors(), state / "rng.safetensors")
        write_parquet(metrics, state / "metrics.parquet")
        resume = {"optimizer": optim_meta, "scheduler": scheduler.state_dict(),
                  "python_random": _jsonable(random.getstate()), "numpy_random": _jsonable(np.random.get_state())}
        (state / RESUME).write_text(json.dumps(resume))
        (tmp / MANIFEST).write_text(json.dumps({"step": step, "settings_hash": settings_hash}))
    for old in root.glob("step_*"):
        if old == target:
            continue
        if keep_every and int(old.name.removeprefix("step_")) % keep_every == 0:
            _drop_state(old)
        else:
            shutil.rmtree(old, ignore_errors=True)
    return target


def _drop_state(checkpoint: Path) -> None:
    """Thin a checkpoint to its model/. The resume manifest goes first, so a thinning cut short leaves a state/ that
    is never mistaken for a complete one."""
    state = checkpoint_state_dir(checkpoint)
    (state / RESUME).unlink(missing_ok=True)
    shutil.rmtree(state, ignore_errors=True)


def latest_checkpoint(root: Path, settings_hash: str) -> Path | None:
    """The newest resumable checkpoint (one with a complete state/) written with the same settings, or None.
    Checkpoints of other settings are deleted, so a changed config restarts cleanly instead of resuming someone else's
    run; weights-only checkpoints of the same settings are kept."""
    found = None
    for path in sorted(root.glob("step_*")):
        manifest = path / MANIFEST
        if not manifest.exists() or json.loads(manifest.read_text())["settings_hash"] != settings_hash:
            shutil.rmtree(path, ignore_errors=True)
        elif (checkpoint_state_dir(path) / RESUME).exists():
            found = path
        else:
            _drop_state(path)
    return found


def load_checkpoint(path: Path, *, policy, optimizer, scheduler) -> Resumed:
    """Restore weights (strictly), optimizer, scheduler and RNG streams in place; return the step to continue from."""
    state = checkpoint_state_dir(path)
    full_precision = state / WEIGHTS
    load_weights(policy, [full_precision] if full_precision.exists() else weight_files(checkpoint_model_dir(path)))
    resume = json.loads((state / RESUME).read_text())
    _load_optimizer(optimizer, load_file(state / "optimizer.safetensors"), resume["optimizer"])
    scheduler.load_state_dict(resume["scheduler"])
    _restore_rng(load_file(state / "rng.safetensors"), state / "rng.safetensors")
    random.setstate(_tuples(resume["python_random"]))
    np.random.set_state(_tuples(resume["numpy_random"]))
    step = json.loads((path / MANIFEST).read_text())["step"]
    return Resumed(step=step, metrics=read_parquet(state / "metrics.parquet"))


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a save_pretrained directory: model.safetensors, or the shards its index names."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        return [model_dir / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    if (model_dir / "model.safetensors").exists():
        return [model_dir / "model.safetensors"]
    raise FileNotFoundError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")


def load_weights(policy: torch.nn.Module, files: list[Path]) -> None:
    """Load safetensors `files` into `policy` in place, strictly: every parameter and persistent buffer must be in
    them (a tied weight through any of its names) and they may hold nothing else. A mismatch raises, naming the
    files and the keys, instead of resuming from a partly random or mismatched model."""
    expected = policy.state_dict()
    storages: dict[int, set[str]] = defaultdict(set)
    for name, tensor in expected.items():
        storages[tensor.untyped_storage().data_ptr()].add(name)
    loaded: dict[str, torch.Tensor] = {}
    for file in files:
        loaded.update(load_file(file))
    unexpected = sorted(set(loaded) - set(expected))
    missing = sorted(name for name, tensor in expected.items()
                     if not storages[tensor.untyped_storage().data_ptr()] & loaded.keys())
    shapes = sorted(f"{name} {tuple(loaded[name].shape)} (model {tuple(expected[name].shape)})"
                    for name in set(loaded) & set(expected) if loaded[name].shape != expected[name].shape)
    if missing or unexpected or shapes:
        raise ValueError(f"{', '.join(map(str, files))} does not match {type(policy).__name__}: "
                         f"missing {missing or 'none'}; unexpected {unexpected or 'none'}; "
                         f"wrong shape {shapes or 'none'}")
    policy.load_state_dict(loaded, strict=False)


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
