"""`kalmanrl compare-summary`: a run against the records of its config's expected file: identical to a record bit for
bit, different from its own machine class's record or beyond tolerance, or within tolerance of the records of other
machine classes (every metric inside its recorded interval, every conclusion unchanged), naming where it departs."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from kalmanrl.cli import main
from kalmanrl.reporting.expected import (
    DIFFERENT,
    IDENTICAL,
    WITHIN_TOLERANCE,
    ExpectedError,
    RunResults,
    compare,
    expected_rows,
    machine_class,
    tolerance_factor,
    write_expected,
)
from kalmanrl.reporting.fingerprint import Fingerprint, departures, series_departure

INTEL = {"cpu_vendor": "GenuineIntel", "dispatch_env": "ATEN_CPU_CAPABILITY=avx2", "torch_threads": "1"}
AMD = {**INTEL, "cpu_vendor": "AuthenticAMD"}


def summary(machine: dict = INTEL) -> pd.DataFrame:
    return pd.DataFrame({"model": ["tiny"] * 3, "task": ["a"] * 3, "algorithm": ["sft", "grpo", "kpo"],
                         "seed": pd.array([None, 0, 0], dtype="Int64"), "step": pd.array([0, 2, 2], dtype="Int64"),
                         "benchmark": ["b"] * 3, "avg_at_k": [0.1, 1 / 3, 0.25], "pass_at_2": [0.2, 0.5, 0.5],
                         "n_problems": [8, 8, 8], "sha256_model": ["x", "y", "z"],
                         "version_torch": ["2.13.0", "2.13.0", "2.14.0"], "cpu_model": ["A", "B", "C"],
                         **{k: [v] * 3 for k, v in machine.items()}})


def accuracy(grpo: float = 1 / 3) -> pd.DataFrame:
    return pd.DataFrame({"model": ["tiny"] * 3, "task": ["a"] * 3, "benchmark": ["b"] * 3,
                         "algorithm": ["sft", "grpo", "kpo"], "avg_at_k": [0.1, grpo, 0.25],
                         "avg_at_k_low": [0.05, 0.25, 0.2], "avg_at_k_high": [0.15, 0.45, 0.3], "confidence": 0.95})


def differences(kpo_grpo: tuple[float, float] = (-0.08, 0.5),
                grpo_sft: tuple[float, float] = (0.23, 0.01)) -> pd.DataFrame:
    rows = [("kpo - grpo", *kpo_grpo), ("grpo - sft", *grpo_sft)]
    return pd.DataFrame([{"model": "tiny", "task": "a", "benchmark": "b", "comparison": name, "difference": d,
                          "low": d - 0.1, "high": d + 0.1, "p_holm": p, "alpha": 0.05} for name, d, p in rows])


def stages(loss: tuple[float, ...] = (2.0, 1.5, 1.25), data: str = "d1") -> list[Fingerprint]:
    return [Fingerprint("data", "a.parquet", data), Fingerprint("tokenizer", "tiny", "t1"),
            Fingerprint("base model", "tiny", "m0"), Fingerprint("warm start", "tiny/a", "w1", {"loss": list(loss)}),
            Fingerprint("train", "tiny/a/grpo/seed0", "g1", {"reward_mean": [0.1, 0.2], "loss": [0.0, 0.1],
                                                             "grad_norm": [1.0, 0.9]})]


def run(machine: dict = INTEL, **changes) -> RunResults:
    parts = {"summary": summary(machine), "accuracy": accuracy(), "differences": differences(), "stages": stages()}
    return RunResults(**{**parts, **changes})


@pytest.fixture
def recorded(tmp_path):
    """An expected file with one record, made on the INTEL class."""
    path = tmp_path / "expected.json"
    write_expected(run(), path)
    return path


def test_a_run_equal_to_its_record_is_identical_and_provenance_is_ignored(recorded):
    other = run(summary=summary().assign(version_torch="9", cpu_model="elsewhere"))
    verdict, outcomes = compare(other, recorded)
    assert verdict == IDENTICAL and outcomes[0].lines == []
    rows = {row["algorithm"]: row for row in json.loads(recorded.read_text())["records"][0]["summary"]["rows"]}
    assert rows["grpo"]["avg_at_k"] == 1 / 3 and rows["sft"]["seed"] is None  # exact round trip


def test_a_record_is_identical_on_another_machine_class_too_when_the_bits_agree(recorded):
    assert compare(run(AMD), recorded)[0] == IDENTICAL


def test_its_own_class_must_reproduce_its_record_to_the_last_bit(recorded):
    changed = summary()
    changed.loc[1, "avg_at_k"] = math.nextafter(1 / 3, 1)  # one ulp off
    verdict, outcomes = compare(run(summary=changed), recorded)
    assert verdict == DIFFERENT
    assert any("'algorithm': 'grpo'" in line and "avg_at_k = 0.33333333333333337, expected 0.3333333333333333" in line
               for line in outcomes[0].lines)


@pytest.mark.parametrize("column", ["verl_best_at_4", "krpo_summed_reward"])
def test_the_papers_own_scores_are_recorded_and_compared_too(tmp_path, column):
    """A config's `extra_metrics` (the authors' scores the report sets beside the papers' numbers)."""
    path = tmp_path / "expected.json"
    write_expected(run(summary=summary().assign(**{column: [0.5, 0.75, 0.625]})), path)
    verdict, outcomes = compare(run(summary=summary().assign(**{column: [0.5, 0.75, 0.5]})), path)
    assert verdict == DIFFERENT
    assert any(f"{column} = 0.5, expected 0.625" in line for line in outcomes[0].lines), outcomes[0].lines


@pytest.mark.parametrize("changes, reason", [
    ({"differences": differences(kpo_grpo=(-0.08, 0.01))}, "comparison {'model': 'tiny', 'task': 'a', 'benchmark': "
                                                           "'b', 'comparison': 'kpo - grpo'}: p_holm = 0.01, "
                                                           "expected 0.5"),
    ({"accuracy": accuracy().assign(avg_at_k_low=[0.05, 0.3, 0.2])}, "accuracy {'model': 'tiny', 'task': 'a', "
                                                                     "'benchmark': 'b', 'algorithm': 'grpo'}: "
                                                                     "avg_at_k_low = 0.3, expected 0.25"),
])
def test_the_same_stages_and_summary_with_other_conclusions_are_not_identical(recorded, changes, reason):
    """Report code (bootstrap, Holm, alpha) that changes the conclusions leaves every stage and summary row as it
    was: its own class's record is then not reproduced, and another class's is at most within tolerance."""
    verdict, outcomes = compare(run(**changes), recorded)
    assert verdict == DIFFERENT
    assert outcomes[0].lines[0] == f"departs from it first at the report's tables (the summary is identical): {reason}"
    assert outcomes[0].lines[2:] == [reason]
    assert compare(run(AMD, **changes), recorded)[0] != IDENTICAL


def test_a_run_departing_only_at_the_evaluations_says_so_and_how_far_it_moved_the_study(recorded):
    """Every stage identical and an evaluation drawn otherwise (e.g. a change of evaluation code): its own class's
    record names the evaluations, and says whether, as another machine class's run, it would be within tolerance --
    what a deliberate change needs to know before it is recorded with --write."""
    changed = summary()
    changed.loc[1, "avg_at_k"] = 0.4
    verdict, outcomes = compare(run(summary=changed, accuracy=accuracy(grpo=0.4)), recorded)
    assert verdict == DIFFERENT
    assert outcomes[0].lines[:2] == [
        "departs from it first at the evaluations (every stage before them is identical): {'model': 'tiny', 'task': "
        "'a', 'algorithm': 'grpo', 'seed': 0, 'step': 2, 'benchmark': 'b'}: avg_at_k = 0.4, expected "
        "0.3333333333333333",
        "as another machine class's run it would be within tolerance (largest deviation 0.33 of its tolerance, "
        "tiny/a/b/grpo avg_at_k)"]
    far = compare(run(summary=changed, accuracy=accuracy(grpo=0.9)), recorded)[1][0]
    assert far.lines[1].startswith("as another machine class's run it would be different too: accuracy tiny/a/b/grpo: "
                                   "avg_at_k 0.9 outside its tolerance")


def test_the_first_stage_and_step_where_a_run_departs_is_named(recorded):
    nudged = stages(loss=(2.0, math.nextafter(1.5, 2), 1.25))
    verdict, outcomes = compare(run(stages=nudged), recorded)
    assert verdict == DIFFERENT
    assert outcomes[0].lines[0] == ("departs from it first at warm start tiny/a: departs at step 2: loss "
                                    "1.5000000000000002, recorded 1.5 (relative 1.5e-16)")


def test_another_machine_class_within_the_intervals_and_with_the_same_conclusions_is_within_tolerance(recorded):
    other = run(AMD, stages=stages(loss=(2.0, 1.5, 1.3)), accuracy=accuracy(grpo=0.4),
                differences=differences(kpo_grpo=(0.02, 0.9), grpo_sft=(0.2, 0.03)))  # the kpo sign may flip
    verdict, outcomes = compare(other, recorded)
    assert verdict == WITHIN_TOLERANCE
    assert outcomes[0].lines[0].startswith("departs from it first at warm start tiny/a: departs at step 3")
    # 0.4 - 1/3 is 0.57 of the recorded interval's upper side; the tolerance is that side x sqrt(2) x z(1 - 0.05 / 6)
    # / z(0.975) = 1.73 of it (three metrics checked)
    assert outcomes[0].lines[1] == "largest deviation 0.33 of its tolerance (tiny/a/b/grpo avg_at_k)"
    assert tolerance_factor(0.95, 3) == pytest.approx(math.sqrt(2) * 2.394 / 1.960, rel=1e-3)


def test_a_deficit_recorded_as_not_significant_may_become_significant(recorded):
    """"KPO does not improve on GRPO" (recorded -8 points, p 0.5) still holds at -20 points, p 0.01."""
    other = run(AMD, stages=stages(loss=(2.0, 1.5, 1.3)), differences=differences(kpo_grpo=(-0.2, 0.01)))
    assert compare(other, recorded)[0] == WITHIN_TOLERANCE


def test_no_improvement_recorded_with_a_positive_lean_is_contradicted_by_a_significant_one(tmp_path):
    """"KPO does not improve on GRPO" recorded at +5 points, p 0.5: +20 points at p 0.01 says it does; a deficit
    reaching significance does not contradict it."""
    path = tmp_path / "expected.json"
    write_expected(run(differences=differences(kpo_grpo=(0.05, 0.5))), path)
    better = run(AMD, stages=stages(loss=(2.0, 1.5, 1.3)), differences=differences(kpo_grpo=(0.2, 0.01)))
    verdict, outcomes = compare(better, path)
    assert verdict == DIFFERENT and ("kpo - grpo: recorded not significant (+5.0 points, Holm p 0.5), now a "
                                     "significant improvement (+20.0 points, p 0.01)") in outcomes[0].lines[-1]
    worse = run(AMD, stages=stages(loss=(2.0, 1.5, 1.3)), differences=differences(kpo_grpo=(-0.2, 0.01)))
    assert compare(worse, path)[0] == WITHIN_TOLERANCE


@pytest.mark.parametrize("changes, reason", [
    ({"accuracy": accuracy(grpo=0.6)}, "tiny/a/b/grpo: avg_at_k 0.6 outside its tolerance around the recorded 0.3333 "
                                       "(interval [0.25, 0.45] x 1.73, 3 checks)"),
    ({"differences": differences(grpo_sft=(0.2, 0.06))}, "grpo - sft: recorded significant (+23.0 points, Holm p "
                                                         "0.01), now +20.0 points, p 0.06"),
    ({"differences": differences(grpo_sft=(-0.2, 0.01))}, "grpo - sft: recorded significant"),
    ({"differences": differences(kpo_grpo=(0.2, 0.01))}, "kpo - grpo: recorded not significant (-8.0 points, Holm p "
                                                         "0.5), now a significant improvement (+20.0 points, p 0.01)"),
    ({"stages": stages(data="d2")}, "data a.parquet: sha256 d2, recorded d1"),
    ({"summary": summary(AMD).assign(n_problems=5)}, "'algorithm': 'grpo', 'seed': 0, 'step': 2, 'benchmark': 'b'}: "
                                                     "n_problems = 5, expected 8"),
    ({"accuracy": accuracy().iloc[:2]}, "accuracy tiny/a/b/kpo: missing from the run"),
])
def test_another_machine_class_outside_tolerance_is_different_and_says_why(recorded, changes, reason):
    verdict, outcomes = compare(run(AMD, **{"stages": stages(loss=(2.0, 1.5, 1.3)), **changes}), recorded)
    assert verdict == DIFFERENT
    assert any(reason in line for line in outcomes[0].lines), outcomes[0].lines


def test_a_metric_whose_interval_has_no_width_on_one_side_must_not_move_that_way(tmp_path):
    """A recorded interval that ends at its value (every bootstrap draw gave it, e.g. an accuracy of 0 or 1) gives no
    room on that side: any move there is different, while the other side keeps its tolerance."""
    path = tmp_path / "expected.json"
    write_expected(run(accuracy=accuracy().assign(avg_at_k_high=[0.1, 0.45, 0.3])), path)  # sft: [0.05, 0.1]
    moved = {"stages": stages(loss=(2.0, 1.5, 1.3))}
    verdict, outcomes = compare(run(AMD, accuracy=accuracy().assign(avg_at_k=[0.11, 1 / 3, 0.25]), **moved), path)
    assert verdict == DIFFERENT
    assert "accuracy tiny/a/b/sft: avg_at_k 0.11 outside its tolerance around the recorded 0.1" in outcomes[0].lines[1]
    assert compare(run(AMD, accuracy=accuracy().assign(avg_at_k=[0.09, 1 / 3, 0.25]), **moved), path)[0] == \
        WITHIN_TOLERANCE


def test_a_run_identical_to_one_record_is_identical_whatever_the_others(recorded):
    """With two classes recorded (their numbers within tolerance of each other), a run that reproduces either record
    bit for bit is identical, and only that record's outcome is reported."""
    amd = run(AMD, accuracy=accuracy(grpo=0.4), stages=stages(loss=(2.0, 1.5, 1.3)))
    write_expected(amd, recorded, add=True)
    for machine, reproduced in ((INTEL, run()), (AMD, amd)):
        verdict, outcomes = compare(reproduced, recorded)
        assert verdict == IDENTICAL and [o.record for o in outcomes] == [machine_class(summary(machine))]


def with_checkpoint(machine: dict, grpo: float) -> pd.DataFrame:
    """The summary with GRPO's kept checkpoint at step 1 (avg@k `grpo`), which the accuracy table does not hold."""
    rows = summary(machine)
    return pd.concat([rows, rows.iloc[[1]].assign(step=pd.array([1], dtype="Int64"), avg_at_k=grpo)],
                     ignore_index=True)


@pytest.mark.parametrize("grpo, verdict", [(0.35, WITHIN_TOLERANCE), (0.99, DIFFERENT)])
def test_a_kept_checkpoint_is_held_to_its_final_steps_tolerance(tmp_path, grpo, verdict):
    """Step 1's mean over seeds gets the interval of GRPO's final avg@k ([0.25, 0.45] around 1/3) around its recorded
    0.3: four checks now, so x1.80 of it."""
    path = tmp_path / "expected.json"
    write_expected(run(summary=with_checkpoint(INTEL, 0.3)), path)
    outcome = compare(run(AMD, summary=with_checkpoint(AMD, grpo), stages=stages(loss=(2.0, 1.5, 1.3))), path)
    assert outcome[0] == verdict
    assert outcome[1][0].lines[-1] == ("largest deviation 0.24 of its tolerance (tiny/a/b/grpo at step 1 avg_at_k)"
                                       if verdict == WITHIN_TOLERANCE else
                                       "accuracy tiny/a/b/grpo at step 1: avg_at_k 0.99 outside its tolerance around "
                                       "the recorded 0.3 (interval [0.2167, 0.4167] x 1.80, 4 checks)")


def test_series_departure_names_the_first_step_and_value():
    assert series_departure({"loss": [1.0, 2.0]}, {"loss": [1.0, 2.0]}) is None
    assert series_departure({"loss": [1.0, math.nan]}, {"loss": [1.0, math.nan]}) is None
    assert series_departure({"loss": [1.0]}, {"loss": [1.0, 2.0]}) == "step 2: loss missing, recorded 2.0"
    assert departures(stages()[:2], stages()) == [
        ("base model", "base model tiny: missing from the run"), ("warm start", "warm start tiny/a: missing from the "
                                                                 "run"), ("train", "train tiny/a/grpo/seed0: missing "
                                                                                   "from the run")]


def test_write_replaces_every_record_and_add_keeps_the_others_only_within_tolerance(recorded):
    write_expected(run(AMD), recorded, add=True)
    assert [r["machine"]["class"] for r in json.loads(recorded.read_text())["records"]] == \
        [machine_class(summary(INTEL)), machine_class(summary(AMD))]
    with pytest.raises(ExpectedError, match="not within tolerance of the record of GenuineIntel"):
        write_expected(run({**AMD, "cpu_vendor": "HygonGenuine"}, accuracy=accuracy(grpo=0.9),
                           stages=stages(loss=(2.0, 1.5, 1.3))), recorded, add=True)
    write_expected(run(AMD, accuracy=accuracy(grpo=0.9)), recorded)
    assert len(json.loads(recorded.read_text())["records"]) == 1


def test_a_file_of_another_format_is_refused_naming_how_to_rerecord(tmp_path):
    (tmp_path / "old.json").write_text(json.dumps({"key": [], "columns": [], "rows": []}))
    with pytest.raises(ExpectedError, match="not an expected file of format 2 .*--write"):
        compare(run(), tmp_path / "old.json")


def test_the_command_prints_its_verdict_and_exits_1_only_when_different(tmp_path, capsys):
    report = tmp_path / "results" / "report"
    report.mkdir(parents=True)
    summary().to_parquet(report / "summary.parquet")
    accuracy().to_parquet(report / "accuracy.parquet")
    differences().to_parquet(report / "comparisons.parquet")
    args = [str(report / "summary.parquet"), str(tmp_path / "e.json")]
    assert main(["compare-summary", *args, "--write"]) == 0
    assert main(["compare-summary", *args]) == 0
    assert capsys.readouterr().out.splitlines()[0].endswith(f"({machine_class(summary())}): identical")
    summary().assign(n_problems=9).to_parquet(report / "summary.parquet")
    assert main(["compare-summary", *args]) == 1
    out = capsys.readouterr().out
    assert ": different" in out.splitlines()[0] and out.count("n_problems = 9, expected 8") == 4  # 3 rows, and
    assert "departs from it first at the evaluations" in out  # the first of them as where the run departs
    (tmp_path / "e.json").write_text("{}")
    assert main(["compare-summary", *args]) == 2
    (tmp_path / "e.json").write_text('{"format": 2,\n "records": [}')
    assert main(["compare-summary", *args]) == 2
    assert f"{tmp_path / 'e.json'}:2: not JSON" in capsys.readouterr().err
    (report / "comparisons.parquet").unlink()
    assert main(["compare-summary", *args]) == 2
    assert "comparisons.parquet missing" in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    (None, r"e\.json: cannot read the expected file \(No such file or directory\)"),
    (b"\xff", r"e\.json: not UTF-8 text \(byte b'\\xff' at offset 0\)"),
    (b'{"format": 2, "records": [5]}', r"e\.json: not an expected file of format 2"),
    (b'{"format": 2, "records": [{"machine": 5}]}', r"e\.json: not an expected file of format 2"),
])
def test_an_expected_file_that_cannot_be_read_fails_naming_it(tmp_path, content, message):
    if content is not None:
        (tmp_path / "e.json").write_bytes(content)
    with pytest.raises(ExpectedError, match=message):
        compare(run(), tmp_path / "e.json")


def test_a_report_table_that_is_not_parquet_fails_naming_it(tmp_path):
    for name, table in (("summary", summary()), ("accuracy", accuracy()), ("comparisons", differences())):
        table.to_parquet(tmp_path / f"{name}.parquet")
    (tmp_path / "accuracy.parquet").write_bytes(b"PAR1 cut short")
    with pytest.raises(ExpectedError, match=r"accuracy\.parquet: not a readable Parquet table"):
        RunResults.load(tmp_path / "summary.parquet")


def test_a_table_that_is_not_a_summary_is_refused():
    with pytest.raises(ExpectedError, match="not a report summary"):
        expected_rows(pd.DataFrame({"x": [1]}))


@pytest.mark.parametrize("name", ["config", "smoke"])
def test_each_recorded_expectation_covers_its_configs_whole_grid(repo_root, name):
    """Every record of config/<name>.expected.json holds one row per evaluation its config asks for (the warm start,
    and every algorithm and seed at each kept step and the last, on every benchmark), one accuracy row per cell and
    algorithm, and a fingerprint of every stage of its grid."""
    import yaml

    from kalmanrl.configuration.config import validate_config

    config = validate_config(yaml.safe_load((repo_root / "config" / f"{name}.yaml").read_text()))
    train = config["train"]
    steps = sorted({*range(train["keep_every"], train["steps"], train["keep_every"] or train["steps"]),
                    train["steps"]})
    grid = [(model, task, benchmark) for model in config["models"] for task in config["tasks"]
            for benchmark in config["benchmarks"]]
    cells = {(model, task, "sft", None, 0, benchmark) for model, task, benchmark in grid}
    cells |= {(model, task, algorithm, seed, step, benchmark) for model, task, benchmark in grid
              for algorithm in config["algorithms"] for seed in config["seeds"] for step in steps}
    runs = {f"{model}/{task}/{algorithm}/seed{seed}" for model in config["models"] for task in config["tasks"]
            for algorithm in config["algorithms"] for seed in config["seeds"]}
    records = json.loads((repo_root / "config" / f"{name}.expected.json").read_text())["records"]
    assert records, f"config/{name}.expected.json holds no record (kalmanrl compare-summary ... --write records one)"
    for record in records:
        recorded = record["summary"]
        assert {tuple(row[k] for k in recorded["key"]) for row in recorded["rows"]} == cells
        assert {(r["model"], r["task"], r["benchmark"], r["algorithm"]) for r in record["accuracy"]} == \
            {(model, task, benchmark, a) for model, task, benchmark in grid for a in ["sft", *config["algorithms"]]}
        stages = {(f["stage"], f["name"]) for f in record["stages"]}
        assert {name for stage, name in stages if stage == "train"} == runs
        assert {stage for stage, _ in stages} == {"data", "tokenizer", "base model", "warm start", "train"}
