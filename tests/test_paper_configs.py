"""The paper-scale grids validate against the schema, state the papers' hyper-parameters, plan their whole DAG
(`snakemake -n`), so launching one on a cluster is one command, and have a cell for every number the papers publish
(src/kalmanrl/reporting/published.yaml), so the report can show it beside ours."""

from __future__ import annotations

import functools
import re
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from kalmanrl.configuration.config import load_config
from kalmanrl.core.layout import WARM_START
from kalmanrl.reporting.comparisons import comparisons
from kalmanrl.reporting.published import paper_matches, published_numbers
from kalmanrl.reporting.results import CELL

REPO = Path(__file__).resolve().parents[1]
JOB_LINE = re.compile(r"^(\w+)\s+(\d+)$", re.M)


def planned_jobs(config: str, tmp_path: Path) -> dict[str, int]:
    result = subprocess.run(["snakemake", "-n", "--configfile", config, "--config", f"results_dir={tmp_path}"],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = result.stdout.split("Job stats:", 1)[1].split("total", 1)[0]
    return {rule: int(n) for rule, n in JOB_LINE.findall(table)}


def test_krpo_grid_has_the_papers_models_tasks_and_hyper_parameters():
    config = load_config(REPO / "config" / "paper-krpo.yaml")
    assert {m["id"] for m in config["models"].values()} == {
        "meta-llama/Llama-3.2-1B-Instruct", "Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-1.5B-Instruct"}
    assert {"arithmetic_easy", "arithmetic_normal", "arithmetic_hard"} <= set(config["tasks"])
    assert sum(config["datasets"][t]["loader"] == "openmath" for t in config["tasks"]) == 7
    train = config["train"]
    assert (train["group_size"], train["prompts_per_step"], train["ppo_epochs"] * train["mini_batches"],
            train["lr"], train["max_grad_norm"]) == (12, 32, 24, 5e-6, 1.0)
    krpo = config["algorithms"]["krpo"]
    assert krpo["advantage"] == "krpo" and krpo["beta"] == 0.01
    assert {k: krpo["advantage_params"][k] for k in ("q", "r", "x0", "p0")} == {"q": 1e-5, "r": 1e-2, "x0": 0.0,
                                                                               "p0": 1.0}


def test_krpo_grid_runs_the_authors_optimiser_and_evaluation():
    config = load_config(REPO / "config" / "paper-krpo.yaml")
    train, evaluate = config["train"], config["evaluate"]
    assert (train["weight_decay"], train["warmup_ratio"], train["schedule"], train["top_p"]) == (0.0, 0.0, "constant",
                                                                                                 1.0)
    assert (train["precision"], train["loss_on_eos"]) == ("bfloat16", False)
    assert (evaluate["k"], evaluate["temperature"], evaluate["top_p"]) == (12, 1.0, 1.0)
    assert evaluate["extra_metrics"] == ["krpo_summed_reward"]
    assert config["algorithms"]["grpo"]["advantage_params"]["eps"] == 1e-8
    arithmetic = config["datasets"]["arithmetic_easy"]
    assert (arithmetic["template"], arithmetic["reward"]) == ("krpo", "krpo_arithmetic")
    assert arithmetic["reward_params"].get("partial_credit", 0.5) == 0.5


def test_kpo_grid_has_the_papers_recipe():
    config = load_config(REPO / "config" / "paper-kpo.yaml")
    assert [m["id"] for m in config["models"].values()] == ["Qwen/Qwen3-4B"]
    assert set(config["algorithms"]) == {"grpo", "gspo", "gmpo", "kpo", "kpo_unclipped"}
    assert config["algorithms"]["kpo"]["ratio"] == "kpo" and config["algorithms"]["gspo"]["ratio"] == "sequence"
    train, evaluate = config["train"], config["evaluate"]
    assert (train["group_size"], train["prompts_per_step"], train["ppo_epochs"] * train["mini_batches"],
            train["lr"], train["weight_decay"], train["max_tokens"]) == (8, 32, 4, 1e-6, 0.1, 4096)
    assert (evaluate["k"], max(evaluate["pass_k"]), evaluate["top_p"]) == (16, 16, 0.7)
    assert evaluate["extra_metrics"] == ["verl_best_at_k"]
    assert config["benchmarks"] == ["math500", "aime24", "aime25", "amc23", "minerva_math", "olympiadbench"]


def test_kpo_is_the_papers_kpo_clipped_and_kpo_unclipped_its_unclipped_row():
    """`kpo` is what the authors' script runs (is_clip=true, Q 1e-6, GSPO's clip range); `kpo_unclipped` is the
    paper's other KPO row: the same filter without the clip, at the Q a secondary reading of the paper gives."""
    algorithms = load_config(REPO / "config" / "paper-kpo.yaml")["algorithms"]
    clipped, unclipped = algorithms["kpo"], algorithms["kpo_unclipped"]
    assert (clipped["clip"], clipped["eps_low"], clipped["eps_high"], clipped["ratio_params"]["q"]) == (
        True, 3e-4, 4e-4, 1e-6)
    assert (unclipped["ratio"], unclipped["clip"], unclipped["ratio_params"]) == (
        "kpo", False, {"q": 1e-4, "r": 1.0, "x0": 0.0, "p0": 0.0, "gains": "authors_float32"})
    assert clipped["ratio_params"]["gains"] == "authors_float32"  # their float32 closed-form gains (core:1501-1551)


def test_kpo_baselines_are_verls_losses():
    algorithms = load_config(REPO / "config" / "paper-kpo.yaml")["algorithms"]
    grpo, gmpo = algorithms["grpo"], algorithms["gmpo"]
    assert (grpo["ratio"], grpo["surrogate"], grpo["clip_ratio_c"], grpo["eps_low"]) == ("token", "clipped", 3.0, 0.2)
    assert (gmpo["ratio"], gmpo["surrogate"], gmpo["eps_low"], gmpo["eps_high"]) == ("token", "geometric_mean", 0.4,
                                                                                      0.4)
    for name, algorithm in algorithms.items():
        assert algorithm["beta"] == 0 and algorithm["aggregate"] == "grpo", name
        assert algorithm["advantage_params"]["eps"] == 1e-6, name
        assert name == "grpo" or algorithm["clip_ratio_c"] is None


def test_kpo_data_prompts_and_reward_are_the_authors():
    config = load_config(REPO / "config" / "paper-kpo.yaml")
    datasets = config["datasets"]
    assert datasets["dapo_filter"]["loader"] == "dapo_filter" and datasets["dapo_filter"]["template"] == "kpo_train"
    assert datasets["aime25"]["params"]["hub_id"] == "MathArena/aime_2025"
    assert datasets["amc23"]["params"]["hub_id"] == "knoveleng/AMC-23"
    for name in [*config["tasks"], *config["benchmarks"]]:
        spec = datasets[name]
        assert spec["template"] == ("kpo_train" if name in config["tasks"] else "kpo_eval"), name
        assert spec["reward"] == "math_verify", name
        assert spec["reward_params"] == {"after_think": True, "require_box": True}, name


@pytest.mark.parametrize("name", ["paper-krpo", "paper-kpo"])
def test_paper_grid_asks_for_gpus_for_training_and_evaluation_jobs(name):
    resources = load_config(REPO / "config" / f"{name}.yaml")["resources"]
    assert resources["train"]["gpus"] >= 1 and resources["evaluate"]["gpus"] >= 1  # how many: tests/test_plan.py
    assert resources["data"]["gpus"] == resources["report"]["gpus"] == 0


@pytest.mark.parametrize("name, runs, benchmarks", [("paper-krpo", 3 * 10 * 2 * 3, 10),
                                                     ("paper-kpo", 1 * 1 * 5 * 3, 6)])
def test_paper_grid_plans_every_job(name, runs, benchmarks, tmp_path):
    """models x tasks x algorithms x seeds train jobs; each run and each warm start evaluated on every benchmark."""
    jobs = planned_jobs(f"config/{name}.yaml", tmp_path)
    config = load_config(REPO / "config" / f"{name}.yaml")
    warm_starts = len(config["models"]) * len(config["tasks"])
    assert jobs["train"] == runs
    assert jobs["evaluate"] == (runs + warm_starts) * benchmarks
    assert jobs["sft"] == warm_starts and jobs["report"] == 1


@functools.cache
def grid(config_file: str) -> dict[str, pd.DataFrame]:
    """The rows a config's report can have: by "algorithm" every (model, task, benchmark, algorithm) of its accuracy
    table, warm start included; by "comparison" every (model, task, benchmark, comparison) of its differences."""
    config = load_config(REPO / config_file)
    algorithms = {*config["algorithms"], WARM_START}
    cells = pd.MultiIndex.from_product([config["models"], config["tasks"], config["benchmarks"]], names=CELL)
    names = {"algorithm": sorted(algorithms), "comparison": [f"{a} - {b}" for a, b in comparisons(algorithms)]}
    return {key: cells.to_frame(index=False).merge(pd.DataFrame({key: values}), how="cross")
            for key, values in names.items()}


def test_every_published_number_has_a_row_in_its_paper_configs_grid():
    """The report shows a published number only beside a row of the same model, task, benchmark and algorithm (or
    comparison), matched as the report matches them: a key renamed on either side must not hide one again."""
    accuracy, differences = published_numbers()
    assert set(accuracy["paper"]) | set(differences["paper"]) == {"KPO", "KRPO"}
    unmatched = []
    for published, key, value in ((accuracy, "algorithm", "avg_at_k"), (differences, "comparison", "difference")):
        for _, row in published.iterrows():
            assert (REPO / row["config"]).is_file(), row["config"]
            rows = grid(row["config"])[key]
            if all(m is None for m in paper_matches(rows, row.to_frame().T, [*CELL, key], value)):
                unmatched.append(row[["paper", *CELL, key]].to_dict())
    assert not unmatched, f"published numbers no row of their paper config can show: {unmatched}"
