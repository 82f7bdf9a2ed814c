"""A training run stopped at any step and resumed ends with the uninterrupted run's metrics and final weights, bit for
bit, whatever its algorithm and options and on 2 ranks too: every piece of state a step needs is in the checkpoint or
a pure function of the step. A job killed while writing a checkpoint leaves nothing half-written behind once it is
started again.

Run as a script (`test_resume.py <settings.json> <model> <dataset> <out> <cut>`) this file is a rank of a training job
that dies on every rank right after its step-<cut> checkpoint (no cut: 0), as a job killed there would."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from kalmanrl.jobs import trainer
from kalmanrl.jobs.trainer import train
from kalmanrl.runtime.distributed import launch_command
from test_lora import lora_settings
from test_trainer import TIMING, settings_for

HERE = Path(__file__).resolve().parent


def assert_same_run(whole: Path, resumed: Path) -> None:
    """The same metrics (timings aside) and the same final weights, bit for bit."""
    expected, got = (pd.read_parquet(d / "metrics.parquet") for d in (whole, resumed))
    timing = [c for c in expected.columns if c in TIMING or c == "time_validation"]
    pd.testing.assert_frame_equal(expected.drop(columns=timing), got.drop(columns=timing))
    a, b = (load_file(d / "final" / "model.safetensors") for d in (whole, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def test_a_run_killed_while_writing_a_checkpoint_resumes_from_the_previous_one_and_leaves_no_temporary(
        tmp_path, tiny_model_dir, arithmetic_parquet):
    """A job killed half-way through writing step 3's checkpoint leaves its temporary directory (the rename never
    came): the restart resumes from step 2, ends where the uninterrupted run does, and removes the temporary, which
    would otherwise hold a copy of the weights and optimiser state for good (and those of the final policy and the
    metrics table, which a kill inside `finish` leaves)."""
    settings = settings_for("grpo", steps=4)
    train(tiny_model_dir, arithmetic_parquet, tmp_path / "whole", settings=settings)
    cut = tmp_path / "cut"
    kill = ("import json, os, digit_share\n"
            "from kalmanrl.jobs import checkpoint\n"
            "from kalmanrl.jobs.trainer import train\n"
            "save = checkpoint.save_sharded\n"
            "def save_then_die(path, *args):\n"
            "    save(path, *args)\n"
            "    if '.step_000003.tmp-' in str(path):\n"
            "        os._exit(9)\n"
            "checkpoint.save_sharded = save_then_die\n"
            f"train({str(tiny_model_dir)!r}, {str(arithmetic_parquet)!r}, {str(cut)!r}, "
            f"settings=json.loads({json.dumps(settings)!r}))\n")
    done = subprocess.run([sys.executable, "-c", kill], cwd=HERE, capture_output=True, text=True, timeout=300)
    assert done.returncode == 9, done.stderr[-3000:]
    checkpoints = cut / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir())[0].startswith(".step_000003.tmp-")
    (cut / ".final.tmp-k1ll3d").mkdir()  # and what a kill inside `finish` leaves
    (cut / ".metrics.parquet.tmp-k1ll3d").write_bytes(b"PAR1")

    train(tiny_model_dir, arithmetic_parquet, cut, settings=settings)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_000004"]
    assert not list(cut.glob(".*.tmp-*"))
    environments = json.loads((cut / "final" / "provenance.json").read_text())["environments"]
    assert [e["from_step"] for e in environments] == [0, 2]
    assert_same_run(tmp_path / "whole", cut)


class Cut(Exception):
    """Ends a run where a killed job would have stopped."""


def algorithm(name: str, train: dict | None = None, **spec) -> dict:
    """settings_for(name, **train) with the algorithm's spec changed by `spec` (dicts replace whole entries)."""
    settings = settings_for(name, **(train or {}))
    settings["algorithm"].update(spec)
    return settings


def dynamic_sampling() -> dict:
    """DAPO's recipe on a 0/1 reward in groups of two, so some steps draw again: token-sum aggregate, a higher clip,
    the overlong penalty and dynamic sampling."""
    settings = algorithm("grpo", {"group_size": 2}, aggregate="dapo", eps_high=0.28,
                         overlong_buffer={"length": 4, "penalty": 1.0},
                         dynamic_sampling={"enabled": True, "metric": "accuracy", "max_draws": 8})
    settings["task"]["reward"] = "has_digit"
    return settings


# (settings, the step the run is cut after, whether it is cut right after that step's checkpoint or after the step's
# metrics row with its newest checkpoint older). Each covers what no other resume test does.
CASES = {
    "krpo": (lambda: settings_for("krpo"), 2, True),
    "gspo": (lambda: algorithm("grpo", ratio="sequence"), 1, True),
    "gmpo": (lambda: algorithm("grpo", surrogate="geometric_mean"), 2, True),
    "kpo_two_epochs_contiguous_cut_between_checkpoints": (lambda: settings_for(
        "kpo", steps=4, checkpoint_every=2, ppo_epochs=2, mini_batch_order="contiguous"), 3, False),
    "cosine_schedule_cut_in_its_warmup": (lambda: settings_for("grpo", steps=4, warmup_ratio=0.5,
                                                                schedule="cosine"), 1, True),
    "dapo_dynamic_sampling": (dynamic_sampling, 2, True),
    "kl_token_tis_dual_clip": (lambda: algorithm("grpo", beta=0.1, clip_ratio_c=3.0,
                                                 rollout_correction={"name": "token_tis", "params": {}}), 2, True),
    "krpo_bypass_bnpo": (lambda: algorithm("krpo", aggregate="bnpo",
                                           rollout_correction={"name": "bypass", "params": {}}), 1, True),
    "bfloat16_weights": (lambda: settings_for("kpo", precision="bfloat16"), 2, True),
    "autocast_packed": (lambda: settings_for("grpo", precision="autocast_bf16", packing=True,
                                             micro_batch_tokens=100), 2, True),
    "lora_dropout": (lambda: lora_settings("kpo", lora={"dropout": 0.1}, steps=3), 1, True),
    "skipped_updates": (lambda: settings_for("grpo", lr=1e30, max_nonfinite=100), 2, True),
    "kept_checkpoint": (lambda: settings_for("grpo", steps=4, keep_every=2), 2, True),
    "validation_cut_between_checkpoints": (lambda: settings_for(
        "grpo", steps=4, checkpoint_every=2, validation={"every": 2, "max_problems": 4, "k": 2}), 3, False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_run_cut_at_a_step_resumes_to_the_uninterrupted_run_bit_for_bit(case, tmp_path, tiny_model_dir,
                                                                          arithmetic_parquet, monkeypatch):
    """Cut right after a checkpoint or one step past it (that step is then trained again), the resumed run's metrics
    and final weights are the uninterrupted run's: the optimiser, the schedule's position, the random streams (dropout
    draws from the global generator), the non-finite count and the metrics so far are in the checkpoint, and the
    prompts, samples, dynamic sampling's draws, mini-batches and validation samples are functions of the step."""
    make, cut_at, after_checkpoint = CASES[case]
    settings = make()
    validation = [arithmetic_parquet] if settings["train"]["validation"]["every"] else []
    whole = train(tiny_model_dir, arithmetic_parquet, tmp_path / "whole", settings=settings,
                  validation_data=validation)

    def checkpoint(run, step, _checkpoint=trainer.checkpoint):
        _checkpoint(run, step)
        if after_checkpoint and step == cut_at:
            raise Cut

    def record(run, step, *args, _record=trainer.record):
        row = _record(run, step, *args)
        if not after_checkpoint and step + 1 == cut_at:
            raise Cut
        return row

    monkeypatch.setattr(trainer, "checkpoint", checkpoint)
    monkeypatch.setattr(trainer, "record", record)
    with pytest.raises(Cut):
        train(tiny_model_dir, arithmetic_parquet, tmp_path / "cut", settings=settings, validation_data=validation)
    monkeypatch.undo()
    train(tiny_model_dir, arithmetic_parquet, tmp_path / "cut", settings=settings, validation_data=validation)

    assert_same_run(tmp_path / "whole", tmp_path / "cut")
    environments = json.loads((tmp_path / "cut" / "final" / "provenance.json").read_text())["environments"]
    every = settings["train"]["checkpoint_every"]
    assert [e["from_step"] for e in environments] == [0, cut_at // every * every]
    if case == "skipped_updates":
        assert whole["nonfinite_total"].iloc[0] < whole["nonfinite_total"].iloc[-1]
    if case == "dapo_dynamic_sampling":
        assert whole["ds_draws"].gt(1).any()
    if case.startswith("validation"):
        assert whole["val_accuracy"].notna().sum() == 2


def test_a_run_resumed_with_another_thread_count_says_it_does_not_continue_bit_for_bit(
        tmp_path, tiny_model_dir, arithmetic_parquet, monkeypatch, caplog):
    """The thread count changes the CPU's summation order: a resume on another count warns, naming it; a resume on
    the same count (and the same versions and dispatch) does not."""
    settings = settings_for("grpo", steps=3)

    def checkpoint(run, step, _checkpoint=trainer.checkpoint):
        _checkpoint(run, step)
        raise Cut

    monkeypatch.setattr(trainer, "checkpoint", checkpoint)
    with pytest.raises(Cut):
        train(tiny_model_dir, arithmetic_parquet, tmp_path / "same", settings=settings, threads=1)
    monkeypatch.undo()
    shutil.copytree(tmp_path / "same", tmp_path / "other")
    threads = torch.get_num_threads()
    try:
        with caplog.at_level(logging.WARNING, logger="kalmanrl.jobs.checkpoint"):
            train(tiny_model_dir, arithmetic_parquet, tmp_path / "same", settings=settings, threads=1)
            assert "bit for bit" not in caplog.text
            train(tiny_model_dir, arithmetic_parquet, tmp_path / "other", settings=settings, threads=2)
    finally:
        torch.set_num_threads(threads)
    assert "resumes where torch_threads: '1' -> '2': the run does not continue bit for bit" in caplog.text


def start_ranks(out: Path, settings: Path, model: Path, data: Path, cut: int) -> None:
    """This file as a 2-rank training job (torchrun, gloo) cut after step `cut` (0: not cut); waits for it."""
    command = launch_command([sys.executable, __file__, str(settings), str(model), str(data), str(out), str(cut)],
                             gpus=2, log_dir=str(out.parent / f"{out.name}.torchrun"))
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == (1 if cut else 0), done.stderr[-4000:]


@pytest.mark.slow
def test_a_two_rank_run_with_dropout_cut_after_a_checkpoint_resumes_on_two_ranks_bit_for_bit(
        tmp_path, tiny_model_dir, arithmetic_parquet):
    """Each rank draws its own dropout masks (its own rows, micro-batches of its own shapes) and keeps its random
    streams in a file of its own: resumed on 2 ranks, the run is the uninterrupted 2-rank run to the bit. (The other
    2-rank resume tests compare with one process, to a tolerance, and without dropout.)"""
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps(lora_settings("kpo", lora={"dropout": 0.1}, steps=3)))
    start_ranks(tmp_path / "whole", settings, tiny_model_dir, arithmetic_parquet, 0)
    start_ranks(tmp_path / "cut", settings, tiny_model_dir, arithmetic_parquet, 2)
    assert sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()) == ["step_000002"]
    assert sorted(p.name for p in (tmp_path / "cut" / "checkpoints" / "step_000002" / "state").glob("rng*")) == [
        "rng.rank0.safetensors", "rng.rank1.safetensors"]
    start_ranks(tmp_path / "cut", settings, tiny_model_dir, arithmetic_parquet, 0)
    assert_same_run(tmp_path / "whole", tmp_path / "cut")


def cut_worker(settings: Path, model: Path, data: Path, out: Path, cut: int) -> None:
    sys.path.insert(0, str(HERE))
    import digit_share  # noqa: F401  (registers the "digit_share" reward in this rank)
    from kalmanrl.configuration.config import parse_settings

    def checkpoint(run, step, _checkpoint=trainer.checkpoint):
        _checkpoint(run, step)
        if step == cut:
            os._exit(1)

    trainer.checkpoint = checkpoint
    train(model, data, out, settings=parse_settings(f"@{settings}", "train"))


if __name__ == "__main__":
    cut_worker(*map(Path, sys.argv[1:5]), int(sys.argv[5]))
