"""Resumable training state without pickle. A checkpoint is a directory

    step_NNNNNN/trainer_state.json   the step and the settings hash it was written with
    step_NNNNNN/state/               what only a resume needs: policy (its trained parameters: a LoRA policy's
                                     adapters only) and optimiser sharded with `torch.distributed.checkpoint` (each
                                     rank writes its own shards, keyed by parameter name, so a run saved on N ranks
                                     resumes on any number, in full precision), each rank's random streams
                                     (rng.rank{r}.safetensors: torch generators, Python/NumPy RNG), the scheduler
                                     (JSON), the metrics
    step_NNNNNN/model/               kept checkpoints only (`train.keep_every`): the policy (LoRA adapters merged),
                                     save_pretrained in the model's configured dtype, and its tokenizer, nothing else,
                                     so vLLM and `kalmanrl evaluate` load it like any model directory

Only the newest checkpoint keeps its state/; a kept checkpoint is thinned to its model/ once a newer one exists. A
checkpoint written from a different settings hash is never resumed."""

from __future__ import annotations

import json
import logging
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from kalmanrl.core.io import read_parquet, write_parquet
from kalmanrl.core.layout import checkpoint_dir, checkpoint_model_dir, checkpoint_state_dir
from kalmanrl.policy.lora import adapter_layers, merged_parameters
from kalmanrl.policy.model import save_policy
from kalmanrl.runtime import distributed
from kalmanrl.runtime.distributed import Ranks, load_sharded, save_sharded, shared_atomic_dir
from kalmanrl.runtime.provenance import arithmetic_changes, environment

log = logging.getLogger(__name__)

MANIFEST = "trainer_state.json"
RESUME = "resume.json"   # in state/: scheduler, number of ranks; written last: its presence marks state/ complete
SHARDED = "sharded"      # in state/: the torch.distributed.checkpoint directory (policy and optimiser)
RNG = "rng.rank{rank}.safetensors"  # in state/: one rank's torch generators, its Python and NumPy RNG as metadata
SINGLE_RNG = "rng.safetensors"  # rank 0's generators only, in checkpoints written before RNG (Python/NumPy in RESUME)



def write_full_model(model: torch.nn.Module, tokenizer, directory: Path, ranks: Ranks, *, dtype: str) -> None:
    """A plain `save_pretrained` model in `dtype` (transformers and vLLM load it) from a sharded or plain model, LoRA
    adapters merged into their weights, written by rank 0 into `directory`. Every rank must call it (the full state
    dict is gathered to rank 0's CPU)."""
    state = None
    if adapter_layers(model):
        state = {name: tensor.to("cpu") for name, tensor in merged_parameters(model) if ranks.is_main}
        state = distributed.without_tied_aliases(state, model)
    elif ranks.sharded:
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        state = distributed.without_tied_aliases(state, model)  # written once, as save_pretrained does
    if ranks.is_main:
        save_policy(model, tokenizer, directory, dtype=dtype, state_dict=state)
    distributed.barrier(ranks)


@dataclass
class Resumed:
    step: int
    metrics: pd.DataFrame
    environments: list[dict]  # where the run ran so far (see `kalmanrl.jobs.trainer.finish`)


def _rng_tensors() -> dict[str, torch.Tensor]:
    """The CPU generator and one generator per visible CUDA device (`get_rng_state` alone is the current device's)."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {"torch_cpu": torch.get_rng_state(), **{f"torch_cuda_{i}": state for i, state in enumerate(cuda)}}


def _save_rng(state: Path, ranks: Ranks) -> None:
    """This rank's random streams, in a file of its own: the ranks are seeded alike but draw different amounts (dropout
    over micro-batches of their own shapes), so rank 0's states would put the others on other streams on resume."""
    metadata = {"python_random": json.dumps(_jsonable(random.getstate())),
                "numpy_random": json.dumps(_jsonable(np.random.get_state()))}
    save_file(_rng_tensors(), state / RNG.format(rank=ranks.rank), metadata=metadata)


def _load_rng(path: Path, resume: dict, ranks: Ranks) -> None:
    """Restore this rank's random streams from checkpoint `path`. Saved on as many ranks as now, each rank takes its
    own, and the resumed run draws what the uninterrupted one would. Saved on another number of ranks (a documented
    way to resume: the weights and optimiser reshard exactly), no rank's saved streams are the ones it would have had,
    so every rank takes rank 0's, as all ranks of a fresh run start from the same seed, and rank 0 logs a warning
    naming the checkpoint and both counts: the run goes on, but not bit for bit as on the old number of ranks. A
    checkpoint from before per-rank files holds rank 0's streams only (and not its number of ranks): every rank
    takes those, with a warning when there are several."""
    state = checkpoint_state_dir(path)
    saved = resume.get("ranks")
    if saved is None:
        source = state / SINGLE_RNG
        if ranks.is_main and ranks.sharded:
            log.warning("%s holds rank 0's random streams only (it predates per-rank ones): all %d ranks restore "
                        "them, so ranks other than 0 draw other numbers than in an uninterrupted run", path,
                        ranks.world_size)
        tensors, streams = load_file(source), resume
    else:
        if saved != ranks.world_size and ranks.is_main:
            log.warning("%s was saved on %d rank%s and resumes on %d rank%s: every rank restores rank 0's random "
                        "streams, so the run does not continue bit for bit as on %d", path, saved,
                        "s" * (saved != 1), ranks.world_size, "s" * (ranks.world_size != 1), saved)
        source = state / RNG.format(rank=ranks.rank if saved == ranks.world_size else 0)
        if not source.exists():
            raise FileNotFoundError(f"{source} is missing: {path} was saved on {saved} ranks, each with its random "
                                    "streams in a file of its own")
        with safe_open(source, framework="pt") as stored:
            tensors = {name: stored.get_tensor(name) for name in stored.keys()}
            metadata = stored.metadata()
            streams = {key: json.loads(metadata[key]) for key in ("python_random", "numpy_random")}
    _restore_rng(tensors, source)
    random.setstate(_tuples(streams["python_random"]))
    np.random.set_state(_tuples(streams["numpy_random"]))


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
                    settings_hash: str, dtype: str, keep_every: int = 0, environments: list[dict] = (),
                    ranks: Ranks = Ranks()) -> Path:
    """Write checkpoints/step_{step} atomically (every rank must call it), then drop older checkpoints (the newest is
    all a resume needs) except those of every `keep_every`-th step, which are kept for evaluation as weights only
    (model/, in `dtype`, the model's configured dtype). Each rank saves its own random streams."""
    target = checkpoint_dir(root, step)
    kept = bool(keep_every) and step % keep_every == 0
    with shared_atomic_dir(target, ranks) as tmp:
        state = checkpoint_state_dir(tmp)
        state.mkdir(parents=True, exist_ok=True)
        save_sharded(state / SHARDED, policy, optimizer)
        if kept:
            write_full_model(policy, tokenizer, checkpoint_model_dir(tmp), ranks, dtype=dtype)
        _save_rng(state, ranks)
        if ranks.is_main:
            write_parquet(metrics, state / "metrics.parquet")
            resume = {"scheduler": scheduler.state_dict(), "ranks": ranks.world_size,
                      "environments": list(environments)}
            (state / RESUME).write_text(json.dumps(resume))
            (tmp / MANIFEST).write_text(json.dumps({"step": step, "settings_hash": settings_hash}))
    if not ranks.is_main:
        return target
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


def load_checkpoint(path: Path, *, policy, optimizer, scheduler, ranks: Ranks = Ranks()) -> Resumed:
    """Restore weights and optimizer (strictly, on any number of ranks: every rank must call it), scheduler and this
    rank's random streams (see `_load_rng`) in place; return the step to continue from. Rank 0 warns when the
    environment differs from the last start's in what decides the numbers (`provenance.ARITHMETIC`: versions, torch's
    CPU capability and threads, the dispatch settings): the run goes on, but not bit for bit as it began."""
    state = checkpoint_state_dir(path)
    load_sharded(state / SHARDED, policy, optimizer)
    resume = json.loads((state / RESUME).read_text())
    scheduler.load_state_dict(resume["scheduler"])
    _load_rng(path, resume, ranks)
    step = json.loads((path / MANIFEST).read_text())["step"]
    environments = resume.get("environments", [])
    if ranks.is_main and environments and (changes := arithmetic_changes(environments[-1], environment())):
        log.warning("%s resumes where %s: the run does not continue bit for bit as it began", path,
                    "; ".join(changes))
    return Resumed(step=step, metrics=read_parquet(state / "metrics.parquet"), environments=environments)


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
