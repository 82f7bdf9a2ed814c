"""Everything that makes one training job span several processes (GPUs, nodes), and nothing else: the process group
from torchrun's environment, FSDP2 sharding, reductions of counts and metrics, streaming full parameters out of a
sharded model, sharded checkpoints, and the torchrun / srun command that starts the ranks.

One code path serves 1 and N ranks: with a single process (no torchrun) there is no process group, the model stays a
plain module, and every helper here degrades to the identity, so the trainer never branches on the world size.

Gradients are *summed* over ranks (FSDP's default would average them): each rank's loss is its own share of the global
loss (its tokens' sum divided by the global token count, see `global_sum`), so the sum is the 1-rank gradient."""

from __future__ import annotations

import contextlib
import datetime
import os
import shutil
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from kalmanrl.runtime.lifetime import end_with_torchrun

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class Ranks:
    """Where this process sits in the job. `mesh` is None when there is one rank (no process group)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    mesh: object | None = None

    @property
    def is_main(self) -> bool:
        """Rank 0 writes metrics, logs and the final policy."""
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.world_size > 1


def init_ranks(env: Mapping[str, str] = os.environ, *, cuda: bool | None = None,
               timeout_minutes: float = 30) -> Ranks:
    """Join the job's process group when started by torchrun with more than one rank (WORLD_SIZE > 1): NCCL and one
    GPU per local rank on CUDA, gloo on the CPU; a 1-D device mesh over all ranks for FSDP. Otherwise one rank, no
    process group. `cuda`: whether the job computes on CUDA (the device the job was granted; None: whenever CUDA is
    usable). A process torchrun started ends with torchrun (torchrun puts each in a session of its own, out of reach
    of the signals that end the job)."""
    end_with_torchrun(env)
    cuda = torch.cuda.is_available() if cuda is None else cuda
    world_size = int(env.get("WORLD_SIZE", "1"))
    local_rank = int(env.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if world_size == 1:
        if cuda:
            torch.cuda.set_device(device)
        return Ranks(device=device)
    from torch.distributed.device_mesh import init_device_mesh

    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=timeout_minutes),
                                device_id=device if cuda else None)
    mesh = init_device_mesh(device.type, (world_size,), mesh_dim_names=("fsdp",))
    return Ranks(rank=dist.get_rank(), world_size=world_size, local_rank=local_rank, device=device, mesh=mesh)


def close_ranks(ranks: Ranks) -> None:
    """Leave the process group (so the process exits cleanly)."""
    if ranks.sharded and dist.is_initialized():
        dist.destroy_process_group()


def shard_model(model: torch.nn.Module, ranks: Ranks) -> torch.nn.Module:
    """FSDP2: `fully_shard` each decoder layer, then the root (embeddings, final norm, head), so only one layer's
    full parameters exist at a time in forward and backward, and the optimiser (made after this call, from the
    sharded parameters) keeps only this rank's shard of its state.

    Parameters are gathered in their own dtype and gradients reduced in float32, so N ranks compute the function one
    rank does: under `autocast_bf16` the float32 weights meet autocast's bf16 matrix products on both (FSDP's bf16
    parameter cast would also round embeddings, norms and the residual stream, which one rank keeps in float32).
    One rank: the model is returned as it is."""
    if not ranks.sharded:
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mp = MixedPrecisionPolicy(reduce_dtype=torch.float32)
    layers = decoder_layers(model)
    for layer in layers:
        fully_shard(layer, mesh=ranks.mesh, mp_policy=mp)
    fully_shard(model, mesh=ranks.mesh, mp_policy=mp)
    for module in [*layers, model]:  # sum, not average, the ranks' gradients (plain SUM collectives: gloo has no
        module.set_gradient_divide_factor(1.0)  # pre-multiplied sum)
        module.set_force_sum_reduction_for_comms(True)
    model.kalmanrl_forward = types.MethodType(_call_with_model, model)
    register_fsdp_forward_method(model, "kalmanrl_forward")
    return model


def reshard(model: torch.nn.Module) -> None:
    """Free the gathered parameters of a sharded model's root (embeddings, final norm, head) after forward passes
    with no backward to follow, as the frozen reference's: FSDP2 keeps a root gathered after its forward, expecting
    the backward that would free it. The layers reshard by themselves."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        model.reshard()


def _call_with_model(model: torch.nn.Module, fn: Callable, *args, **kwargs):
    return fn(model, *args, **kwargs)


def as_forward(model: torch.nn.Module, fn: Callable, *args, **kwargs):
    """`fn(model, *args, **kwargs)` run as a forward pass of `model`. For computations that call the model's parts
    (the decoder, then the output head chunk by chunk) instead of `model(...)`: with FSDP the root's parameters
    (embeddings, final norm, head) are gathered around the call and their gradients reduced after the backward, as
    for `model(...)`. A plain model: just the call."""
    method = getattr(model, "kalmanrl_forward", None)
    return fn(model, *args, **kwargs) if method is None else method(fn, *args, **kwargs)


def decoder_layers(model: torch.nn.Module) -> Sequence[torch.nn.Module]:
    """The repeated transformer blocks of a transformers causal LM (`model.model.layers` for Qwen2/3, Llama, ...)."""
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not len(layers):
        raise ValueError(f"{type(model).__name__} has no `model.layers` list of decoder layers to shard")
    return list(layers)


def global_sum(value: float | torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """The sum of `value` over all ranks (a float64 scalar on this rank's device), e.g. a mini-batch's loss from the
    ranks' shares of it, or the groups with unequal rewards all ranks drew."""
    return summed(torch.as_tensor(value, dtype=torch.float64, device=ranks.device).detach().clone(), ranks)


def reduce_metrics(metrics: Mapping[str, float], ranks: Ranks) -> dict[str, float]:
    """One value per metric for the whole job: keys ending in `_min` / `_max` take the min / max over ranks, all others
    the mean over ranks (every rank holds an equal share of the prompts; a value all ranks share stays as it is).
    All ranks must pass the same keys."""
    if not ranks.sharded:
        return dict(metrics)
    keys = sorted(metrics)
    names = [None] * ranks.world_size
    dist.all_gather_object(names, keys)
    if any(other != keys for other in names):
        raise ValueError(f"ranks report different metrics: {names}")
    values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=ranks.device)
    out = {}
    for op, select in ((dist.ReduceOp.MIN, lambda k: k.endswith("_min")),
                       (dist.ReduceOp.MAX, lambda k: k.endswith("_max")),
                       (dist.ReduceOp.SUM, lambda k: not k.endswith(("_min", "_max")))):
        reduced = values.clone()
        dist.all_reduce(reduced, op=op)
        for key, value in zip(keys, reduced.tolist(), strict=True):
            if select(key):
                out[key] = value / ranks.world_size if op == dist.ReduceOp.SUM else value
    # Counts that every rank shares (e.g. skipped updates, decided together) stay integers.
    return {key: int(value) if isinstance(metrics[key], int) and value == int(value) else value
            for key, value in out.items()}


def global_max(*values: int, ranks: Ranks) -> tuple[int, ...]:
    """The largest of each of `values` over all ranks, in one collective."""
    if not ranks.sharded:
        return values
    box = torch.tensor(values, dtype=torch.int64, device=ranks.device)
    dist.all_reduce(box, op=dist.ReduceOp.MAX)
    return tuple(box.tolist())


def gather_rows(tensor: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """All ranks' `tensor`s [n, ...] (the same n on every rank) concatenated in rank order [n x world_size, ...], on
    every rank: the whole batch's rewards, lengths, ... from each rank's share, for metrics."""
    if not ranks.sharded:
        return tensor
    parts = [torch.empty_like(tensor, device=ranks.device) for _ in range(ranks.world_size)]
    dist.all_gather(parts, tensor.to(ranks.device).contiguous())
    return torch.cat(parts).to(tensor.device)


def gather_objects(value, ranks: Ranks) -> list:
    """Every rank's picklable `value`, in rank order, on every rank (one element without ranks)."""
    if not ranks.sharded:
        return [value]
    out = [None] * ranks.world_size
    dist.all_gather_object(out, value)
    return out


def share(count: int, ranks: Ranks, what: str) -> range:
    """This rank's contiguous share of `count` items (prompts of a step): rank r takes the r-th of world_size equal
    parts, so the ranks' shares concatenated in rank order are the one-rank order. `count` must divide evenly."""
    if count % ranks.world_size:
        raise ValueError(f"{what} = {count} does not split evenly over {ranks.world_size} ranks")
    size = count // ranks.world_size
    return range(ranks.rank * size, (ranks.rank + 1) * size)


def summed(tensor: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """`tensor` summed elementwise over all ranks (itself without ranks), in its dtype: rows each rank filled alone,
    0 in the others', become every rank's rows, exactly (x + 0 = x)."""
    if not ranks.sharded:
        return tensor
    total = tensor.to(ranks.device).contiguous().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total.to(tensor.device)


def in_step(parts: list, ranks: Ranks, *, stand_in) -> list[tuple[object, bool]]:
    """`parts` (e.g. micro-batches) as (part, real) pairs, padded with (`stand_in`, False) to the largest count on any
    rank: a forward of an FSDP model is a collective, so every rank must run as many. The caller discards (or weights
    by 0) what a stand-in computes."""
    (total,) = global_max(len(parts), ranks=ranks)
    return [(part, True) for part in parts] + [(stand_in, False)] * (total - len(parts))


def all_finite(values: list[torch.Tensor], ranks: Ranks) -> bool:
    """Whether every value on every rank is finite: all ranks must agree to skip (or take) an optimiser step."""
    bad = sum(int(not torch.isfinite(v).all()) for v in values)
    return int(global_sum(bad, ranks)) == 0


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> float:
    """Clip the global gradient norm (over all ranks' shards) to `max_norm`; return the norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def full_parameters(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, full tensor) for every entry of the model's state dict, gathered one at a time, so a weight
    push into a rollout engine never holds more than one extra full tensor. Names are transformers' (FSDP2 adds no
    prefix). With sharding every rank must exhaust the iterator in the same order (each gather is a collective)."""
    for name, tensor in model.state_dict().items():
        yield name, tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor.detach()


@contextlib.contextmanager
def shared_atomic_dir(path: Path, ranks: Ranks) -> Iterator[Path]:
    """`kalmanrl.core.io.atomic_path` for a directory every rank writes into: rank 0 makes the temporary sibling and
    renames it to `path` once every rank has left the block without an error.

    After the block the ranks agree on the outcome through the process group's key-value store, not a collective: a
    rank that raised posts its error and re-raises at once, and every other rank, once out of the block, raises an
    error naming the failing ranks and `path` (rank 0 removing the temporary directory), so a failed job ends
    promptly and leaves no half-written `path`. A collective there would keep a failing rank waiting for ranks still
    inside a collective of the block (e.g. the barrier after rank 0 writes a full model) until the process group's
    timeout, 30 minutes; without one the failing rank leaves, and its exit ends the job (torchrun stops the other
    ranks). A failed rename is broadcast. One process: `atomic_path` itself."""
    from kalmanrl.core.io import atomic_path

    if not ranks.sharded:
        with atomic_path(path, directory=True) as tmp:
            yield tmp
        return
    agreed = False
    try:
        with atomic_path(path, directory=True) if ranks.is_main else contextlib.nullcontext() as tmp:
            tmp = Path(broadcast_object(str(tmp) if ranks.is_main else None, ranks))
            try:
                yield tmp
            except BaseException as error:
                _post_outcome(tmp, ranks, error)
                raise
            _post_outcome(tmp, ranks, None)
            _raise_if_another_rank_failed(path, tmp, ranks)
            agreed = True
    except BaseException as error:
        if not agreed:
            raise
        renamed = error  # only rank 0 renames
    else:
        renamed = None
    failure = broadcast_object(None if renamed is None else _describe(renamed), ranks)
    if renamed is not None:
        raise renamed
    if failure is not None:
        raise RuntimeError(f"rank 0 could not move the directory the ranks wrote into place at {path}: {failure}")


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:1000]


def _outcome_key(tmp: Path, rank: int) -> str:
    """A rank's outcome of the `shared_atomic_dir` block writing into `tmp` (unique per block: rank 0's mkdtemp)."""
    return f"kalmanrl/shared_atomic_dir/{tmp}/rank{rank}"


def _post_outcome(tmp: Path, ranks: Ranks, error: BaseException | None) -> None:
    """This rank's outcome of a `shared_atomic_dir` block in the process group's store: "" or its error."""
    dist.distributed_c10d._get_default_store().set(_outcome_key(tmp, ranks.rank),
                                                   "" if error is None else _describe(error))


def _raise_if_another_rank_failed(path: Path, tmp: Path, ranks: Ranks) -> None:
    """Wait for every rank's outcome of the block; raise, naming the failing ranks, when any failed."""
    store = dist.distributed_c10d._get_default_store()
    keys = [_outcome_key(tmp, rank) for rank in range(ranks.world_size)]
    store.wait(keys)
    errors = {rank: message for rank, key in enumerate(keys) if (message := store.get(key).decode())}
    if errors:
        raise RuntimeError(f"rank(s) {', '.join(map(str, errors))} failed writing {path}, so no rank keeps it: "
                           + "; ".join(f"rank {rank}: {message}" for rank, message in errors.items()))


def tied_aliases(model: torch.nn.Module) -> dict[str, str]:
    """Second names of tied parameters (an output head sharing the embeddings) -> the name they share a weight with.
    A state dict lists such a weight under both names; DCP, which keys tensors by name, would store it twice (about
    1.5 GB more per Qwen3-4B checkpoint in float32), and save_pretrained writes it once."""
    first: dict[int, str] = {}
    aliases = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if id(parameter) in first:
            aliases[name] = first[id(parameter)]
        else:
            first[id(parameter)] = name
    return aliases


def without_tied_aliases(state: Mapping[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`state` with each tied weight once, under its first name (see `tied_aliases`)."""
    aliases = tied_aliases(model)
    return {name: tensor for name, tensor in state.items() if name not in aliases}


def trained_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """The model's and optimiser's state dicts of what trains: frozen parameters (a LoRA policy's base weights) are
    the model directory's, loaded with the model, and stay out of checkpoints. A plain policy trains every one."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))


def save_sharded(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Model and optimiser state with `torch.distributed.checkpoint`: each rank writes its own shards into `path`
    (the same directory on every rank), keyed by parameter name (each tied weight once), so any number of ranks can
    load it back. Only what trains (`trained_state`)."""
    import torch.distributed.checkpoint as dcp

    model_state, optim_state = trained_state(model, optimizer)
    dcp.save({"model": without_tied_aliases(model_state, model), "optimizer": optim_state}, checkpoint_id=str(path))


def load_sharded(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load what `save_sharded` wrote, on any number of ranks (DCP reshards), into `model` and `optimizer` in place:
    exactly the model's trained parameters (checked here), its frozen ones left as loaded. The optimiser may be fresh
    (no state yet)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    model_state, optim_state = trained_state(model, optimizer)
    stored = without_tied_aliases(model_state, model)
    _check_sharded_model(path, dcp.FileSystemReader(str(path)).read_metadata(), stored, type(model).__name__)
    state = {"model": stored, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=str(path))
    loaded = {**state["model"], **{alias: state["model"][name] for alias, name in tied_aliases(model).items()
                                   if name in state["model"]}}
    set_state_dict(model, optimizer, model_state_dict=loaded, optim_state_dict=state["optimizer"],
                   options=StateDictOptions(strict=False))  # frozen parameters are not in it; the rest is checked


def _check_sharded_model(path: Path, metadata, model_state: Mapping[str, torch.Tensor], model_name: str) -> None:
    """Refuse a checkpoint whose weights are not exactly the model's (names and full shapes), naming the directory:
    DCP alone would silently skip weights the model lacks and raises its mismatches as a BaseException."""
    saved = {key.removeprefix("model."): meta for key, meta in metadata.state_dict_metadata.items()
             if key.startswith("model.")}
    missing = sorted(model_state.keys() - saved.keys())
    unexpected = sorted(saved.keys() - model_state.keys())
    shapes = sorted(f"{key} {tuple(saved[key].size)} != {tuple(model_state[key].shape)}"
                    for key in model_state.keys() & saved.keys()
                    if tuple(getattr(saved[key], "size", ())) != tuple(model_state[key].shape))
    if missing or unexpected or shapes:
        raise ValueError(f"{path} does not match {model_name}: missing {missing}, unexpected {unexpected}, "
                         f"shapes {shapes}")


def barrier(ranks: Ranks) -> None:
    if ranks.sharded:
        dist.barrier()


def broadcast_object(value, ranks: Ranks):
    """Rank 0's `value` on every rank (e.g. the checkpoint to resume, which only rank 0 looks up)."""
    if not ranks.sharded:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def launch_command(command: Sequence[str], *, gpus: int, log_dir: str, nodes: int = 1, tasks_per_node: int = 1,
                   port: int | None = None, first_node: str | None = None, job_id: str | None = None) -> list[str]:
    """The command line that runs `command` (a console script and its arguments, e.g. ["kalmanrl", "train", ...])
    as `gpus` ranks (a node's GPUs, or 1 CPU rank) in each of `nodes` x `tasks_per_node` SLURM tasks:
    - one rank: `command` itself;
    - one task: `torchrun --standalone --nproc-per-node <gpus> --no-python <command>`;
    - several tasks (inside a SLURM allocation; one per node for GPUs, one per rank for CPU ranks): `srun` starts
      one torchrun per task, which meet at a c10d rendezvous on the allocation's first node (`first_node`) under the
      job id, on `port` (default DEFAULT_PORT + job id mod 1000, so that jobs sharing a node do not collide).
    torchrun keeps its ranks' error files under `log_dir` (the run directory's, beside the run it explains); without
    it each torchrun would leave a directory of its own in /tmp, on every node, after every job."""
    if gpus < 1 or nodes < 1 or tasks_per_node < 1:
        raise ValueError(f"gpus ({gpus}), nodes ({nodes}) and tasks_per_node ({tasks_per_node}) must be at least 1")
    tasks = nodes * tasks_per_node
    if gpus * tasks == 1:
        return list(command)
    if tasks == 1:
        return ["torchrun", "--standalone", f"--nproc-per-node={gpus}", f"--log-dir={log_dir}", "--no-python",
                *command]
    if not first_node or not job_id:
        raise ValueError(f"a {tasks}-task job needs the allocation's first node and job id (run it inside SLURM)")
    port = DEFAULT_PORT + int(job_id) % 1000 if port is None else port
    # --ntasks: the job step that runs this command exports its own SLURM_NTASKS (1), which srun would otherwise take.
    # --overlap: that step already holds the first node's resources.
    return ["srun", f"--nodes={nodes}", f"--ntasks={tasks}", f"--ntasks-per-node={tasks_per_node}", "--overlap",
            "--kill-on-bad-exit=1", "torchrun", f"--nnodes={tasks}", f"--nproc-per-node={gpus}",
            "--rdzv-backend=c10d", f"--rdzv-endpoint={first_node}:{port}", f"--rdzv-id={job_id}",
            f"--log-dir={log_dir}", "--no-python", *command]


def remove_empty_folders(root: Path) -> None:
    """Remove the folders under `root`, and `root`, that hold no file (none if `root` does not exist)."""
    for folder, _, _ in os.walk(root, topdown=False):  # deepest first, `root` last
        if not os.listdir(folder):
            os.rmdir(folder)


def missing_slurm_client(env: Mapping[str, str] = os.environ) -> str | None:
    """Why a job of several SLURM tasks cannot start here, or None. It starts them with `srun` and finds its
    rendezvous host with `scontrol`, from where `kalmanrl train` runs; an Apptainer image has neither (and srun would
    start the other nodes' ranks outside it anyway)."""
    missing = [tool for tool in ("srun", "scontrol") if shutil.which(tool, path=env.get("PATH")) is None]
    if not missing:
        return None
    inside = env.get("APPTAINER_CONTAINER") or env.get("SINGULARITY_CONTAINER")
    return (f"a training job over several nodes (or SLURM tasks) starts its ranks with srun and scontrol, and "
            f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not on PATH "
            f"{f'inside the image {inside}' if inside else 'on this host'}. Run it with the software on the nodes "
            "themselves (a virtual environment, or `--sdm conda` rather than `--sdm apptainer`), or on one node "
            "(resources.train.nodes: 1)")


def rank_cpus(env: Mapping[str, str] = os.environ) -> int:
    """The CPUs one rank's helper processes (the reward workers) may use: the ranks torchrun started on this node
    (LOCAL_WORLD_SIZE) share the process's CPU set, rather than each starting one worker per CPU."""
    return max(1, len(os.sched_getaffinity(0)) // int(env.get("LOCAL_WORLD_SIZE", "1")))


def slurm_first_node(env: Mapping[str, str] = os.environ) -> str:
    """The first host of this SLURM job's allocation (the rendezvous host of a multi-node job)."""
    import subprocess

    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise RuntimeError("SLURM_JOB_NODELIST is not set: a multi-node job must run inside a SLURM allocation")
    hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True, capture_output=True,
                           text=True).stdout.split()
    return hosts[0]
