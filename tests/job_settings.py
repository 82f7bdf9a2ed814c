"""A complete `--settings` value for one stage job of the default config, and stand-in input paths, for tests that
call `kalmanrl <stage>` (a job refuses settings that lack a part it needs, and input paths that do not exist)."""

from __future__ import annotations

import json
from pathlib import Path

from kalmanrl.configuration.config import stage_settings, validate_config

JOB = {"data": {"dataset": "arithmetic_easy"},
       "train": {"model": "tiny", "task": "arithmetic_easy", "algorithm": "grpo", "seed": "0"},
       "evaluate": {"model": "tiny", "benchmark": "arithmetic_easy", "algorithm": "grpo", "seed": "0"}}


def job_settings(stage: str, **replace) -> str:
    """The default config's settings for a `stage` job, with the parts in `replace` swapped in, as JSON."""
    return json.dumps({**stage_settings(validate_config({}), stage, **JOB[stage]), **replace})


def job_inputs(folder: Path) -> list[str]:
    """`--model` and `--dataset` options naming a directory and a file that exist (empty: for tests that stop the job
    before it reads them)."""
    (folder / "model").mkdir(parents=True, exist_ok=True)
    (folder / "data.parquet").touch()
    return ["--model", str(folder / "model"), "--dataset", str(folder / "data.parquet")]
