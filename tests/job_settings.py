"""A complete `--settings` value for one stage job of the default config, for tests that call `kalmanrl <stage>`
(a job refuses settings that lack a part it needs)."""

from __future__ import annotations

import json

from kalmanrl.configuration.config import stage_settings, validate_config

JOB = {"data": {"dataset": "arithmetic_easy"},
       "train": {"model": "tiny", "task": "arithmetic_easy", "algorithm": "grpo", "seed": "0"},
       "evaluate": {"model": "tiny", "benchmark": "arithmetic_easy", "algorithm": "grpo", "seed": "0"}}


def job_settings(stage: str, **replace) -> str:
    """The default config's settings for a `stage` job, with the parts in `replace` swapped in, as JSON."""
    return json.dumps({**stage_settings(validate_config({}), stage, **JOB[stage]), **replace})
