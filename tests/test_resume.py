"""A training run stopped at any step and resumed ends with the uninterrupted run's metrics and final weights, bit for
bit, whatever its algorithm and options: every piece of state a step needs is in the checkpoint or a pure function of
the step. A job killed while writing a checkpoint leaves nothing half-written behind once it is started again."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file

from kalmanrl.jobs.trainer import train
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
    would otherwise hold a copy of the weights and optimiser state for good."""
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

    train(tiny_model_dir, arithmetic_parquet, cut, settings=settings)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_000004"]
    environments = json.loads((cut / "final" / "provenance.json").read_text())["environments"]
    assert [e["from_step"] for e in environments] == [0, 2]
    assert_same_run(tmp_path / "whole", cut)
