"""The results tree has one home, kalmanrl.core.layout: its templates fill and read back, the paths it gives are the
tree the workflow has always written, and no other module of the package or rule file spells a path of the tree
itself."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from kalmanrl.core import layout
from kalmanrl.core.layout import (
    ResultsTree,
    evaluation_sibling,
    fill,
    parse,
    parse_evaluation,
    parse_run_name,
    run_name,
)
from kalmanrl.reporting.results import NO_SEED, summary_ident

TREE = ResultsTree("results/study")
RUN = {"model": "tiny", "task": "arith", "algorithm": "krpo", "seed": 2}


def test_fields_left_out_stay_snakemake_wildcards():
    assert TREE.run_dir() == "results/study/runs/{model}/{task}/{algorithm}/seed{seed}"
    assert TREE.dataset(dataset="{task}") == "results/study/data/{task}.parquet"
    assert (TREE.metrics(model="tiny", task="arith")
            == "results/study/runs/tiny/arith/{algorithm}/seed{seed}/metrics.parquet")


def test_a_value_for_a_field_the_template_lacks_is_refused():
    with pytest.raises(KeyError, match="no field \\['algoritm'\\]"):
        TREE.run_dir(algoritm="krpo")
    with pytest.raises(ValueError, match="unknown evaluation file kind 'summaries'"):
        TREE.evaluation("summaries")


def test_the_tree_is_the_one_the_workflow_writes():
    """The paths tests/test_workflow.py finds on disk after the smoke run, spelt out once more here."""
    evaluation = {"model": "tiny", "task": "arith", "benchmark": "math500"}
    assert TREE.dataset(dataset="math500") == "results/study/data/math500.parquet"
    assert TREE.train_split(task="arith") == "results/study/data/arith.train.parquet"
    assert TREE.base_model(model="tiny") == "results/study/models/tiny/base"
    assert TREE.warm_start_model(model="tiny", task="arith") == "results/study/models/tiny/arith/sft"
    assert TREE.final_model(**RUN) == "results/study/runs/tiny/arith/krpo/seed2/final"
    assert TREE.metrics(**RUN) == "results/study/runs/tiny/arith/krpo/seed2/metrics.parquet"
    assert TREE.kept_model(20, **RUN) == "results/study/runs/tiny/arith/krpo/seed2/checkpoints/step_000020/model"
    assert (TREE.evaluation("summary", run=run_name("krpo", 2, 20), **evaluation)
            == "results/study/eval/tiny/arith/krpo/seed2/step20/math500.summary.parquet")
    assert (TREE.evaluation("details", run=run_name(layout.WARM_START), **evaluation)
            == "results/study/eval/tiny/arith/sft/math500.details.parquet")
    assert TREE.log("train", **RUN) == "results/study/logs/train/tiny/arith/krpo/seed2.log"
    assert TREE.log("decontaminate", task="arith") == "results/study/logs/data/arith.train.log"
    assert TREE.log("report") == "results/study/logs/report.log"
    assert (TREE.benchmark("evaluate", run="sft", **evaluation)
            == "results/study/benchmarks/evaluate/tiny/arith/sft/math500.tsv")
    assert [TREE.report_file(n) for n in ("html", "markdown", "summary")] == [
        "results/study/report/report.html", "results/study/report/report.md", "results/study/report/summary.parquet"]
    assert TREE.figure_dir("curves") == "results/study/report/figures/curves"


@pytest.mark.parametrize("template", [layout.DATASET, layout.TRAIN_SPLIT, layout.BASE_MODEL, layout.WARM_START_MODEL,
                                      layout.RUN_DIR, layout.EVAL_FILE, layout.FIGURE_FILE])
def test_every_template_reads_back_what_it_was_filled_with(template):
    values = {"dataset": "gsm8k", "task": "arith_easy", "model": "qwen3-4b", "algorithm": "kpo", "seed": "3",
              "run": "kpo/seed3/step40", "benchmark": "math500", "kind": "summary"}
    fields = {name: values[name] for name in re.findall(r"\{(\w+)\}", template)}
    assert parse(template, f"/any/root/{fill(template, **fields)}") == fields
    assert parse(template, "elsewhere/x.parquet") is None


@pytest.mark.parametrize("ident", [{"algorithm": "sft"}, {"algorithm": "krpo", "seed": "0"},
                                   {"algorithm": "my-estimator", "seed": "12", "step": "300"}])
def test_run_names_read_back(ident):
    assert parse_run_name(run_name(**ident)) == ident


@pytest.mark.parametrize("run", ["krpo", "krpo/0", "a/b/seed1", "krpo/seed1/final"])
def test_a_run_name_outside_the_tree_is_refused(run):
    with pytest.raises(ValueError, match="is not a run of the results tree"):
        parse_run_name(run)


def test_the_report_finds_details_beside_their_summary():
    summary = TREE.evaluation("summary", run="grpo/seed0", model="tiny", task="arith", benchmark="gsm8k")
    assert evaluation_sibling(summary, "details") == Path(
        TREE.evaluation("details", run="grpo/seed0", model="tiny", task="arith", benchmark="gsm8k"))
    with pytest.raises(ValueError, match="not an evaluation file of the results tree"):
        evaluation_sibling("elsewhere/gsm8k.summary.parquet", "details")


def test_summary_paths_name_the_final_evaluation_of_their_cell():
    def path(run: str) -> str:
        return TREE.evaluation("summary", run=run, model="tiny", task="arith", benchmark="gsm8k")

    assert summary_ident(path("sft")) == {"model": "tiny", "task": "arith", "algorithm": "sft", "seed": NO_SEED,
                                          "benchmark": "gsm8k"}
    assert summary_ident(path("krpo/seed2"))["seed"] == 2
    assert summary_ident(path("krpo/seed2/step20")) is None  # a kept checkpoint: its run's final summary names the cell
    details = TREE.evaluation("details", run="sft", model="tiny", task="arith", benchmark="gsm8k")
    assert parse_evaluation(details)["kind"] == "details" and summary_ident(details) is None
    assert summary_ident("elsewhere/krpo/seed2/gsm8k.summary.parquet") is None  # not under eval/


# Pieces of the tree's paths that only kalmanrl.core.layout may spell (a module or rule spelling one has its own copy).
TREE_PIECES = ["runs/", "eval/", "models/", "data/", "logs/", "benchmarks/", ".summary.parquet", ".details.parquet",
               ".train.parquet", "metrics.parquet", "report.html", "report.md", "/final", "seed{", "step{",
               "__{task}", "figures/"]
TREE_NAMES = {"final", "checkpoints", "figures"}  # whole strings: directory names joined on by `/`


def _code_strings(path: Path) -> list[tuple[int, str]]:
    """The string constants of a module's code (f-string parts included), docstrings left out."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr)}
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


def test_no_module_or_rule_spells_a_path_of_the_tree(repo_root):
    found = []
    package = repo_root / "src" / "kalmanrl"
    modules = sorted(package.rglob("*.py"))
    assert len(modules) > 40, modules  # every layer's folder, not only the package's top level
    for path in modules:
        if path.name == "layout.py":
            continue
        strings = _code_strings(path)
        if path.name == "checkpoint.py":  # a checkpoint's state/ holds the metrics so far under the same file name
            strings = [(line, s) for line, s in strings if s != "metrics.parquet"]
        found += [f"{path.relative_to(package)}:{line}: {s!r}" for line, s in strings
                  if s in TREE_NAMES or any(piece in s for piece in TREE_PIECES)]
    for path in [repo_root / "Snakefile", *sorted((repo_root / "workflow" / "rules").glob("*.smk"))]:
        found += [f"{path.name}:{number}: {line.strip()}"
                  for number, line in enumerate(path.read_text().splitlines(), 1)
                  if any(piece in line for piece in TREE_PIECES) and not line.lstrip().startswith("#")]
    assert not found, "paths of the results tree spelt outside kalmanrl.core.layout:\n" + "\n".join(found)
