"""The memory plan covers exactly the jobs the workflow runs: `kalmanrl.jobs.plan.jobs` of a config lists, job for job,
the train and evaluate jobs a Snakemake dry run of that config schedules. Both read kalmanrl.core.layout.config_jobs;
this checks that list against Snakemake's own DAG, not against another copy of its loops."""

from __future__ import annotations

import copy
import os
import re
from collections import Counter
from pathlib import Path

import pytest

from kalmanrl.configuration.config import load_config
from kalmanrl.core.layout import parse_run_name
from kalmanrl.jobs import plan
from smoke_runs import REPO, snakemake

# One job of a dry run's listing: its rule, then its indented details (the wildcards among them).
JOB = re.compile(r"^(?:local)?rule (\w+):\n((?: {4}.*\n)*)", re.M)
WILDCARDS = re.compile(r"^ +wildcards: (.*)$", re.M)


def scheduled(config_file: Path, workdir: Path) -> Counter:
    """(rule, wildcards) of every train and evaluate job a dry run of CONFIG_FILE schedules in WORKDIR from scratch,
    an evaluation's {run} read back into its algorithm, seed and step as the plan gives them. A dry run reads no
    dataset and no model, so a hub config plans offline (HF_HUB_OFFLINE makes sure nothing is downloaded)."""
    result = snakemake(workdir, "-n", "--forceall", "--configfile", str(config_file),
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    jobs = Counter()
    for rule, details in JOB.findall(result.stdout):
        if rule in ("train", "evaluate"):
            wildcards = dict(item.split("=", 1) for item in WILDCARDS.search(details).group(1).split(", "))
            if rule == "evaluate":
                wildcards.update(parse_run_name(wildcards.pop("run")))
            jobs[rule, frozenset(wildcards.items())] += 1
    return jobs


def planned(config: dict) -> Counter:
    """(stage, wildcards) of every job `kalmanrl plan` estimates, the values as text (as Snakemake gives them)."""
    return Counter((stage, frozenset((key, str(value)) for key, value in wildcards.items()))
                   for stage, wildcards in plan.jobs(config))


@pytest.mark.parametrize("name", ["config", "paper-kpo", "paper-krpo"])
def test_the_plan_lists_the_jobs_snakemake_schedules(name, tmp_path):
    """Equal as multisets, so a job missing, added, repeated or with one wildcard changed fails. That the comparison
    can fail is checked on the same dry run: the plan of the config with `train.keep_every` switched (on where it is
    off, off where it is on) differs from it in exactly the kept checkpoints' evaluations."""
    config_file = REPO / "config" / f"{name}.yaml"
    jobs = scheduled(config_file, tmp_path)
    config = load_config(config_file)
    assert planned(config) == jobs
    assert {stage for stage, _ in jobs} == {"train", "evaluate"}

    altered = copy.deepcopy(config)
    train = altered["train"]
    train["keep_every"] = 0 if train["keep_every"] else train["steps"] // 2
    differing = set(planned(altered)) ^ set(jobs)
    assert differing and all(stage == "evaluate" and "step" in dict(wildcards) for stage, wildcards in differing)
