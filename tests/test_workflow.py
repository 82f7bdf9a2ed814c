"""The real Snakemake DAG on config/smoke.yaml: every stage runs, outputs have the promised schemas and row counts,
a finished run is up to date, and a changed training setting reruns exactly train, evaluate and report."""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import subprocess
import warnings
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from smoke_runs import smoke_config, snakemake

pytestmark = pytest.mark.slow

JOB_LINE = re.compile(r"^(\w+)\s+(\d+)$", re.M)


def planned_jobs(result: subprocess.CompletedProcess) -> Counter:
    """Rule -> job count from the job-stats table of a dry run."""
    table = result.stdout.split("Job stats:", 1)[1].split("total", 1)[0] if "Job stats:" in result.stdout else ""
    return Counter({rule: int(n) for rule, n in JOB_LINE.findall(table)})


@pytest.fixture(scope="module")
def smoke(smoke_run):
    """The session's finished smoke run (conftest.py) and its config."""
    return smoke_run, smoke_config()


def test_lint_is_clean(repo_root):
    result = subprocess.run(["snakemake", "--lint"], cwd=repo_root, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Congratulations, your workflow is in a good condition!" in result.stdout + result.stderr


def test_dry_run_prints_the_job_grid(repo_root, tmp_path):
    result = subprocess.run(["snakemake", "-n", "--config", f"results_dir={tmp_path}", "seeds=[0,1]"],
                            cwd=repo_root, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    jobs = planned_jobs(result)
    runs = 3 * 2  # the default config's algorithms x the seeds given on the command line
    assert jobs["train"] == runs
    assert jobs["evaluate"] == 1 + runs * 2  # the warm start; each run's final policy and its step 40
    assert jobs["sft"] == jobs["model"] == jobs["report"] == jobs["all"] == 1


def test_every_stage_writes_its_parquet(smoke):
    workdir, config = smoke
    results = workdir / "results"
    data = pq.read_table(results / "data" / "arithmetic_easy.parquet").to_pandas()
    params = config["datasets"]["arithmetic_easy"]["params"]
    assert Counter(data["split"]) == {"train": params["train_size"], "test": params["test_size"]}
    assert {"id", "source", "split", "problem", "answer"} <= set(data.columns)
    assert pq.read_table(results / "data" / "math_mini.parquet").num_rows == 12
    train_split = pq.read_table(results / "data" / "arithmetic_easy.train.parquet")
    assert train_split.num_rows == params["train_size"]
    assert (results / "models" / "tiny" / "arithmetic_easy" / "sft" / "model.safetensors").exists()

    for algorithm in config["algorithms"]:
        run = results / "runs" / "tiny" / "arithmetic_easy" / algorithm / "seed0"
        metrics = pq.read_table(run / "metrics.parquet").to_pandas()
        assert list(metrics["step"]) == list(range(1, config["train"]["steps"] + 1))
        assert {"reward_mean", "accuracy", "clip_frac", "entropy", "grad_norm", "response_length",
                "sign_switch_rate_raw", "rollout_tokens_per_s"} <= set(metrics.columns)
        assert (run / "final" / "model.safetensors").exists()

    evaluate = config["evaluate"]
    intermediate = [f"{a}/seed0/step1" for a in config["algorithms"]]  # train.keep_every: 1 of 2 steps
    for run in ["sft", *(f"{a}/seed0" for a in config["algorithms"]), *intermediate]:
        for benchmark in config["benchmarks"]:
            base = results / "eval" / "tiny" / "arithmetic_easy" / run / benchmark
            details = pq.read_table(f"{base}.details.parquet").to_pandas()
            assert len(details) == evaluate["max_problems"] * evaluate["k"]
            assert {"problem_id", "sample_index", "completion", "reward", "correct", "finish_reason"} <= \
                set(details.columns)
            assert pq.read_table(f"{base}.summary.parquet").num_rows == 1

    summary = pq.read_table(results / "report" / "summary.parquet").to_pandas()
    assert len(summary) == (1 + 2 * len(config["algorithms"])) * len(config["benchmarks"])
    assert sorted(summary["step"].dropna().unique()) == [0, 1, 2]
    assert (results / "report" / "report.html").stat().st_size > 0
    assert "arithmetic_easy" in (results / "report" / "report.md").read_text()


def test_intermediate_checkpoints_are_kept_and_evaluated_at_their_step(smoke):
    workdir, config = smoke
    run = workdir / "results" / "runs" / "tiny" / "arithmetic_easy" / "krpo" / "seed0"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000001", "step_000002"]
    summary = pq.read_table(workdir / "results" / "eval" / "tiny" / "arithmetic_easy" / "krpo" / "seed0" / "step1" /
                            "arithmetic_easy.summary.parquet").to_pandas()
    assert summary.loc[0, "step"] == 1 and summary.loc[0, "algorithm"] == "krpo"
    assert "checkpoints/step_000001" in summary.loc[0, "command"]


def test_keep_every_must_be_a_multiple_of_checkpoint_every():
    from kalmanrl.configuration.config import ConfigError, validate_config

    with pytest.raises(ConfigError, match="config.train.keep_every: 3 is not a multiple of train.checkpoint_every = 2"):
        validate_config({"train": {"checkpoint_every": 2, "keep_every": 3}})


def test_a_finished_run_is_up_to_date(smoke):
    workdir, _ = smoke
    result = snakemake(workdir, "-n")
    assert "Nothing to be done" in result.stdout + result.stderr


def test_changing_a_training_setting_reruns_train_evaluate_and_report_only(smoke, tmp_path):
    workdir, config = smoke
    changed = {**config, "train": {**config["train"], "lr": config["train"].get("lr", 1e-4) * 2}}
    (tmp_path / "changed.yaml").write_text(yaml.safe_dump(changed))
    jobs = planned_jobs(snakemake(workdir, "-n", "--configfile", str(tmp_path / "changed.yaml")))
    runs = len(config["algorithms"])
    evaluated = 2 * runs  # the final policy and the kept step-1 checkpoint of each run
    assert jobs == Counter({"train": runs, "evaluate": evaluated * len(config["benchmarks"]), "report": 1, "all": 1})


def test_forced_rerun_of_one_rule_reruns_its_dependents(smoke):
    workdir, config = smoke
    jobs = planned_jobs(snakemake(workdir, "-n", "-R", "sft"))
    runs = len(config["algorithms"])
    assert jobs["sft"] == 1 and jobs["train"] == runs and jobs["model"] == 0 and jobs["data"] == 0


def write_config(workdir: Path, config: dict) -> Path:
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump({"results_dir": "results", **config}))
    return path


def test_a_retried_job_asks_for_more_memory_and_time_up_to_the_caps_and_the_model_rule_is_local(repo_root, tmp_path):
    """A `model` job that fails (a local model that does not exist) is retried: memory and time grow with the attempt
    up to resources.model.max_mem_mb / max_runtime, and it runs where the workflow was started."""
    config = write_config(tmp_path, {
        "models": {"missing": {"source": "local", "path": str(tmp_path / "no-such-model")}},
        "resources": {"model": {"mem_mb": 1000, "max_mem_mb": 1500, "runtime": 10, "max_runtime": 15}}})
    result = subprocess.run(["snakemake", "-s", str(repo_root / "Snakefile"), "-d", str(tmp_path), "--cores", "1",
                             "--retries", "1", "results/models/missing/base", "--configfile", str(config)],
                            capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    log = result.stdout + result.stderr
    assert result.returncode != 0, log[-3000:]
    asked = [(int(re.search(r"mem_mb=(\d+)", line)[1]), int(re.search(r"runtime=(\d+)", line)[1]))
             for line in re.findall(r"resources: (.*)", log)]
    assert asked == [(1000, 10), (1500, 15)], log[-3000:]  # not 2000 MB and 20 minutes
    assert "localrule model:" in log


def test_the_data_and_report_rules_ask_for_their_configured_resources(repo_root, tmp_path):
    """resources.data (the data and decontaminate rules) and resources.report reach their rules, as every other
    stage's do (they were accepted and ignored)."""
    config = write_config(tmp_path, {"resources": {"data": {"mem_mb": 1234, "runtime": 7},
                                                   "report": {"mem_mb": 2345, "runtime": 9}}})
    result = subprocess.run(["snakemake", "-s", str(repo_root / "Snakefile"), "-d", str(tmp_path), "-n",
                             "--configfile", str(config)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    asked = dict(re.findall(r"^(?:local)?rule (\w+):\n(?:.*\n)*?\s+resources: .*?runtime=(\d+)", result.stdout, re.M))
    assert {rule: asked.get(rule) for rule in ("data", "decontaminate", "report")} == \
        {"data": "7", "decontaminate": "7", "report": "9"}, result.stdout[-3000:]
    assert "mem_mb=1234" in result.stdout and "mem_mb=2345" in result.stdout


def test_a_local_run_whose_gpu_jobs_could_not_get_devices_is_refused_before_any_job(repo_root, tmp_path):
    """Two GPUs (named in CUDA_VISIBLE_DEVICES; this machine has no NVML) and GPU jobs, but no --resources gpu=N:
    Snakemake would start GPU jobs side by side and the surplus would wait an hour for a device. Refused at once,
    with the advice; a dry run only warns (it also plans cluster runs); with --resources gpu=2 the run may go on."""
    config = write_config(tmp_path, {"resources": {"train": {"gpus": 1}, "evaluate": {"gpus": 1}}})
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "0,1"}
    # --configfile=: one file, so that a target may follow
    base = ["snakemake", "-s", str(repo_root / "Snakefile"), "-d", str(tmp_path), f"--configfile={config}"]
    # `-j 1`: with the default profile's `cores: all` Snakemake also sets nodes, yet the run is local. The target, a
    # dataset, is the quickest job a run that is not refused would start.
    for jobs in (["--cores", "1"], ["-j", "1"]):
        refused = subprocess.run([*base, *jobs, "results/data/arithmetic_easy.parquet"], capture_output=True,
                                 text=True, env=env)
        assert refused.returncode != 0 and "run with --resources gpu=2" in refused.stderr, refused.stderr[-3000:]
        assert not (tmp_path / "results").exists(), "a job ran before the refusal"
    dry = subprocess.run([*base, "-n", "--quiet"], capture_output=True, text=True, env=env)
    assert dry.returncode == 0 and "a local run would refuse to start" in dry.stderr, dry.stderr[-3000:]
    planned = subprocess.run([*base, "-n", "--quiet", "--resources", "gpu=2"], capture_output=True, text=True, env=env)
    assert planned.returncode == 0 and "refuse" not in planned.stderr, planned.stderr[-3000:]


def compare_summary(workdir: Path, expected: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["kalmanrl", "compare-summary", str(workdir / "results" / "report" / "summary.parquet"),
                           str(expected), *args], capture_output=True, text=True)


def test_the_smoke_run_reproduces_its_recorded_numbers(smoke, repo_root):
    """config/smoke.expected.json records the smoke run per machine class (kalmanrl.reporting.expected): a machine of a
    recorded class reproduces its record bit for bit; another one must stay within the recorded intervals with the
    same conclusions, and the test says which comparison it made. After a deliberate change of results, rerecord it
    with `kalmanrl compare-summary results/smoke/report/summary.parquet config/smoke.expected.json --write`."""
    workdir, _ = smoke
    result = compare_summary(workdir, repo_root / "config" / "smoke.expected.json")
    assert result.returncode == 0, result.stdout + result.stderr
    verdict = result.stdout.splitlines()[0]
    assert verdict.endswith((": identical", ": within tolerance")), result.stdout
    how = "exactly" if verdict.endswith(": identical") else "within tolerance (no record of this machine class)"
    warnings.warn(f"the smoke run was compared {how}:\n{result.stdout}", stacklevel=1)  # shown in every test summary


def test_a_run_of_a_recorded_class_that_departs_is_refused_naming_the_stage_and_step(smoke, tmp_path):
    """The smoke run recorded, then the record's warm-start loss at step 3 moved by one ulp: the comparison fails and
    names the warm start and step 3 as where the run departs. The same record said to be another machine class's
    is only departed from, within tolerance (every metric equal); a changed dataset hash fails for any class."""
    workdir, _ = smoke
    expected = tmp_path / "expected.json"
    assert compare_summary(workdir, expected, "--write").returncode == 0
    original = json.loads(expected.read_text())
    record = original["records"][0]
    warm_start = next(f for f in record["stages"] if f["stage"] == "warm start")
    warm_start["series"]["loss"][2] = math.nextafter(warm_start["series"]["loss"][2], math.inf)
    expected.write_text(json.dumps(original))
    result = compare_summary(workdir, expected)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "departs from it first at warm start tiny/arithmetic_easy: departs at step 3: loss" in result.stdout

    record["machine"]["class"] = "AnotherVendor | ATEN_CPU_CAPABILITY=avx2 | threads 1"
    expected.write_text(json.dumps(original))
    result = compare_summary(workdir, expected)
    assert result.returncode == 0 and result.stdout.splitlines()[0].endswith(": within tolerance"), result.stdout
    assert "largest deviation 0.00 of its tolerance" in result.stdout

    next(f for f in record["stages"] if f["stage"] == "data")["sha256"] = "0" * 64
    expected.write_text(json.dumps(original))
    result = compare_summary(workdir, expected)
    assert result.returncode == 1 and "data arithmetic_easy.parquet: sha256" in result.stdout, result.stdout


def test_every_jobs_settings_are_what_its_command_accepts(repo_root, tmp_path):
    """Each rule's --settings, exactly as the workflow writes it (the report rule adds "reproduce" to what
    stage_settings gives), parses for its stage: a part the command refuses would fail only when the job runs."""
    from kalmanrl.configuration.config import parse_settings

    result = subprocess.run(["snakemake", "-n", "-p", "--forceall", "--config", f"results_dir={tmp_path}"],
                            cwd=repo_root, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    commands = [shlex.split(line.split("Shell command: ", 1)[1]) for line in result.stdout.splitlines()
                if line.startswith("Shell command: kalmanrl ") and " --settings " in line]
    assert {command[1] for command in commands} == {"data", "model", "sft", "train", "evaluate", "report"}
    for command in commands:
        parse_settings(command[command.index("--settings") + 1], command[1])
