"""What a config is expected to give, recorded per machine class, and a finished run compared with it.

An expected file (e.g. config/smoke.expected.json) holds one record per machine class the config was run on (the
CPU vendor, the CPU dispatch variables in force and the thread counts): every stage's fingerprint
(kalmanrl.reporting.fingerprint), every row of the report summary (metrics and the sha256 of the evaluated weights), and
the report's accuracy table (every metric with its bootstrap interval) and comparisons (difference, Holm p-value) -- the
study's conclusions. A run is

- **identical** when every stage output, summary row, accuracy row and comparison equals one record's bit for bit
  (whichever class it is of: equality with another class's record shows the same bits across machine classes; the
  tables too, since other report code can draw other conclusions from the same summary);
- **different** when a record of its own class exists and it does not reproduce it exactly (a machine class must
  give its own numbers: anything else is a real change), when a stage without float arithmetic (the datasets, the
  tokenizer) differs, when rows are missing or a summary's counts (problems, k, samples) differ, or when it is
  outside the tolerance below;
- **within tolerance** otherwise, when no record of its class exists: against every record, every metric of the
  accuracy table lies within its tolerance of the recorded value, and so does every metric's mean over seeds at each
  kept checkpoint (below), every comparison the record found significant (Holm p at most its alpha) is significant
  with the same sign, and none it found not significant has become a significant improvement. Conclusions are
  one-sided, as the study states them: "A improves on B" (significant) must hold again; "A does not improve on B"
  (not significant, whichever way A - B leaned) is contradicted only by A becoming significantly better, not by a
  deficit reaching significance, which a comparison near the Holm level does with the last bit of the arithmetic.
  The sign of a difference the grid cannot tell from zero may change.

A metric's tolerance is its recorded interval widened for two things a change of machine brings (`tolerance_factor`):
the run's value is a second draw of the same noise, so the two differ by sqrt(2) times one draw's noise, and all the
metrics are checked at once, so each check gets TOLERANCE_LEVEL / (number of checks) (Bonferroni). A run that
differs from the record by noise alone is then called different in at most 5% of machine changes; a change of the
study's code moves its numbers by more, or departs from the record of a machine class that has one.

A kept checkpoint (a summary step before a run's last) has no interval of its own: the accuracy table and its
bootstrap are of the last step only. Its mean over seeds, compared as the accuracy table's means are, gets the
interval of its cell and algorithm's last step, that interval's two sides around the checkpoint's recorded mean, each
metric one more check. The same seeds, problems and samples make its noise close to the last step's (a rate's
binomial noise moves a little with the rate), and the report's tables, and the records of them, stay as they are.

Provenance (versions, paths, times) is never compared: it says where a run happened, not what it computed.
"""

from __future__ import annotations

import datetime
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from scipy.stats import norm

from kalmanrl.core.io import atomic_path, not_utf8
from kalmanrl.core.layout import report_file
from kalmanrl.reporting.fingerprint import MISSING, Fingerprint, departures, fingerprints
from kalmanrl.reporting.results import CELL

FORMAT = 2
KEY = ("model", "task", "algorithm", "seed", "step", "benchmark")
# The summary's measured columns: the metrics, the papers' own scores (config `extra_metrics`) and the weights' hash.
VALUE = re.compile(r"^(n_problems|k|n_samples|avg_at_k|maj_at_k|mean_length|truncation_rate|pass_at_\d+|"
                   r"verl_best_at_\d+|krpo_summed_reward|sha256_model)$")
# Metrics of the accuracy table that carry an interval (<metric>_low, <metric>_high): kalmanrl.reporting.comparisons.
INTERVAL = re.compile(r"^(avg_at_k|maj_at_k|mean_length|truncation_rate|pass_at_\d+)$")
EXACT_STAGES = ("data", "tokenizer")  # integer and text work only: equal on every machine, or a real change
# Summary columns that count what was evaluated (problems, samples per problem, samples in all), not what was measured
# (INTERVAL) or on which weights (sha256_model): equal on every machine, or a real change.
COUNTS = re.compile(r"^(n_problems|k|n_samples)$")
ACCURACY_KEY = [*CELL, "algorithm"]
DIFFERENCE_KEY = [*CELL, "comparison"]
IDENTICAL, WITHIN_TOLERANCE, DIFFERENT = "identical", "within tolerance", "different"
TOLERANCE_LEVEL = 0.05  # how often a run that differs from a record by noise alone may be called different


class ExpectedError(ValueError):
    """An expected file or a run that cannot be compared (wrong format, not a report summary)."""


def _plain(value):
    """A cell as JSON: numpy scalars as Python numbers, missing values (pandas NA, NaN) as None."""
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return None
    return value.item() if hasattr(value, "item") else value


def _records(frame: pd.DataFrame, columns: list[str]) -> list[dict]:
    return [{c: _plain(v) for c, v in zip(columns, values, strict=True)}
            for values in frame[columns].itertuples(index=False)]


def expected_rows(summary: pd.DataFrame) -> dict:
    """The part of a summary that a reproduction must equal: {key, columns, rows}, rows sorted by key."""
    key = [c for c in KEY if c in summary.columns]
    columns = [c for c in summary.columns if VALUE.match(c)]
    if not key or not columns:
        raise ExpectedError(f"not a report summary: key columns {key}, value columns {columns}")
    return {"key": key, "columns": columns,
            "rows": _records(summary.sort_values(key, na_position="first"), key + columns)}


def machine_class(summary: pd.DataFrame) -> str:
    """The machine class a run's numbers belong to: CPU vendor, CPU dispatch variables and thread counts, as its
    summary's provenance records them (a run that mixed them has every value listed)."""
    def values(column: str) -> str:
        found = sorted({str(v) for v in summary[column].dropna()}) if column in summary else []
        return ",".join(found) or "unknown"
    return f"{values('cpu_vendor')} | {values('dispatch_env')} | threads {values('torch_threads')}"


def _read_table(path: Path) -> pd.DataFrame:
    """A report table; one that is not Parquet (cut short, another file) fails naming it, not as pyarrow's
    '<Buffer>'."""
    try:
        return pd.read_parquet(path)
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        raise ExpectedError(f"{path}: not a readable Parquet table ({err})") from None


@dataclass
class RunResults:
    """What a finished results tree gives to compare: its summary, the report's accuracy and comparison tables, and
    the stage fingerprints."""
    summary: pd.DataFrame
    accuracy: pd.DataFrame
    differences: pd.DataFrame
    stages: list[Fingerprint] = field(default_factory=list)

    @classmethod
    def load(cls, summary_path: str | Path) -> RunResults:
        """The run whose report summary is `summary_path` (<results_dir>/report/summary.parquet)."""
        report_dir = Path(summary_path).parent
        paths = [Path(summary_path), report_file(report_dir, "accuracy"), report_file(report_dir, "comparisons")]
        if missing := [str(path) for path in paths if not path.exists()]:
            raise ExpectedError(f"{', '.join(missing)} missing: a run is compared from its report's summary, accuracy "
                                f"and comparison tables (rerun the report: snakemake --cores all -R report)")
        summary, accuracy, comparisons = map(_read_table, paths)
        return cls(summary, accuracy, comparisons, fingerprints(report_dir.parent))

    def record(self) -> dict:
        """This run as a record of its machine class."""
        first = self.summary.iloc[0] if len(self.summary) else pd.Series(dtype=object)
        machine = {"class": machine_class(self.summary),
                   **{k: _plain(first.get(k)) for k in ("cpu_model", "cpu_isa", "version_torch", "git_commit")},
                   "recorded": datetime.date.today().isoformat()}
        return {"machine": machine, "stages": [f.as_json() for f in self.stages],
                "summary": expected_rows(self.summary), **self.conclusions()}

    def conclusions(self) -> dict:
        """The accuracy table (every metric with its interval) and the comparisons, as a record holds them."""
        accuracy = [c for c in self.accuracy.columns if INTERVAL.match(c)]
        intervals = [f"{c}_{side}" for c in accuracy for side in ("low", "high") if f"{c}_{side}" in self.accuracy]
        intervals += ["confidence"] if "confidence" in self.accuracy else []
        differences = [c for c in ("difference", "low", "high", "p_holm", "alpha") if c in self.differences]
        return {"accuracy": _records(self.accuracy, [*ACCURACY_KEY, *accuracy, *intervals]) if accuracy else [],
                "differences": _records(self.differences, [*DIFFERENCE_KEY, *differences]) if differences else []}


def read_expected(path: str | Path) -> list[dict]:
    """The records of an expected file, checked for the format this module writes."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise ExpectedError(f"{path}: cannot read the expected file ({err.strerror})") from None
    except UnicodeDecodeError as err:
        raise ExpectedError(f"{path}: {not_utf8(err)}") from None
    except json.JSONDecodeError as err:
        raise ExpectedError(f"{path}:{err.lineno}: not JSON ({err.msg})") from None
    if (not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("records"), list)
            or not all(isinstance(r, dict) and isinstance(r.get("machine"), dict) for r in data["records"])):
        raise ExpectedError(f"{path}: not an expected file of format {FORMAT} (rerecord it: kalmanrl "
                            f"compare-summary <results_dir>/report/summary.parquet {path} --write)")
    return data["records"]


def write_expected(run: RunResults, path: str | Path, *, add: bool = False) -> list[dict]:
    """Record `run` in the expected file `path`. By default it becomes the only record (the numbers changed, so
    every other machine class's record is stale); with `add`, it joins or replaces its own class's record and the
    others are kept, which is right only when the code did not change (refused unless the run is within tolerance
    of each of them). Returns the records written."""
    record = run.record()
    records = [record]
    if add and Path(path).exists():
        others = [r for r in read_expected(path) if r["machine"]["class"] != record["machine"]["class"]]
        for other in others:
            outcome = compare_with(run, other)
            if outcome.verdict == DIFFERENT:
                raise ExpectedError(f"the run is not within tolerance of the record of {other['machine']['class']}"
                                    f" ({outcome.lines[0]}): record it alone, without --add")
        records = others + [record]
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps({"format": FORMAT, "records": records}, indent=1) + "\n")
    return records


# ------------------------------------------------------------------------------------------------------ comparing
@dataclass
class Outcome:
    """A run against one record: the verdict, what it rests on, and the lines that explain it."""
    verdict: str
    record: str
    lines: list[str] = field(default_factory=list)
    largest: float = 0.0  # the largest deviation as a share of its interval (tolerance comparisons)


def _ident(row: dict, key: list[str]) -> tuple:
    return tuple(row.get(c) for c in key)


def _same(a, b) -> bool:
    """Exact equality; two NaNs are the same."""
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def _row_differences(actual: list[dict], expected: list[dict], key: list[str], columns: list[str]) -> list[str]:
    """Missing or extra rows (by `key`), and each (row, column) of `columns` whose value is not exactly the recorded
    one."""
    got = {_ident(row, key): row for row in actual}
    want = {_ident(row, key): row for row in expected}
    lines = [f"missing row {dict(zip(key, k, strict=True))}" for k in want if k not in got]
    lines += [f"unexpected row {dict(zip(key, k, strict=True))}" for k in got if k not in want]
    for k in want.keys() & got.keys():
        for column in columns:
            if column not in got[k]:
                lines.append(f"{dict(zip(key, k, strict=True))}: column {column} missing from the run")
            elif not _same(got[k][column], want[k][column]):
                lines.append(f"{dict(zip(key, k, strict=True))}: {column} = {got[k][column]!r}, "
                             f"expected {want[k][column]!r}")
    return sorted(lines)


def summary_differences(summary: pd.DataFrame, expected: dict) -> list[str]:
    """Every difference between a run's summary and a record's rows: missing or extra rows, and each (row, column)
    whose value is not exactly the recorded one. Empty when the run reproduces it."""
    actual = expected_rows(summary)
    key = expected["key"]
    if actual["key"] != key:
        return [f"key columns differ: run {actual['key']}, expected {key}"]
    return _row_differences(actual["rows"], expected["rows"], key, expected["columns"])


def conclusion_differences(run: RunResults, record: dict) -> list[str]:
    """Every difference between the run's accuracy and comparison tables and a record's, as summary_differences
    gives them: other report code (bootstrap, Holm, alpha) can conclude otherwise from the same summary."""
    conclusions = run.conclusions()
    lines = []
    for table, key, kind in (("accuracy", ACCURACY_KEY, "accuracy"), ("differences", DIFFERENCE_KEY, "comparison")):
        columns = [c for c in dict.fromkeys(c for row in record[table] for c in row) if c not in key]
        lines += [f"{kind} {line}" for line in _row_differences(conclusions[table], record[table], key, columns)]
    return lines


def tolerance_factor(confidence: float, checks: int) -> float:
    """How many times its recorded interval (at `confidence`) a metric may stray from the recorded value when
    `checks` metrics are compared at once: sqrt(2) for the difference of two noisy draws, and the normal quantile of
    TOLERANCE_LEVEL / checks (two-sided) over that of the interval."""
    return math.sqrt(2) * norm.ppf(1 - TOLERANCE_LEVEL / (2 * checks)) / norm.ppf(0.5 + confidence / 2)


def _deviation(value: float, recorded: float, low: float, high: float, factor: float) -> float:
    """How far `value` lies from the recorded value, as a share of its tolerance: `factor` times the recorded
    interval on its side (1: at its edge; inf: off a side the interval does not extend to)."""
    if value == recorded:
        return 0.0
    edge = high if value > recorded else low
    return abs(value - recorded) / (factor * abs(edge - recorded)) if edge != recorded else math.inf


def _label(row: dict, key: list[str]) -> str:
    return "/".join(str(row[c]) for c in key)


def _checked_metrics(row: dict) -> list[str]:
    """The metrics of a recorded accuracy row that carry an interval."""
    return [c for c in row if INTERVAL.match(c) and None not in (row[c], row.get(f"{c}_low"))]


def _paired(frame: pd.DataFrame, recorded: list[dict], key: list[str], kind: str) -> tuple[list, list[str]]:
    """(label, recorded row, run row) for every recorded row of a table, and a line for each one the run lacks."""
    mine = {_ident(row, key): row for row in _records(frame, list(frame.columns))}
    pairs = [(_label(want, key), want, mine.get(_ident(want, key))) for want in recorded]
    return ([pair for pair in pairs if pair[2] is not None],
            [f"{kind} {label}: {MISSING}" for label, _, got in pairs if got is None])


def _checkpoints(run: RunResults, record: dict) -> dict[tuple, list[tuple[int, dict, dict]]]:
    """Per cell and algorithm (ACCURACY_KEY): (step, recorded means, the run's means) at each kept checkpoint, a
    recorded step before its last, where the means are over seeds of every summary metric (None: missing)."""
    metrics = [c for c in record["summary"]["columns"] if INTERVAL.match(c)]

    def means(rows: pd.DataFrame) -> dict[tuple, dict]:
        rows = rows.reindex(columns=[*ACCURACY_KEY, "step", *metrics]).astype(dict.fromkeys(metrics, float))
        return {k: {m: _plain(v) for m, v in values.items()}
                for k, values in rows.groupby([*ACCURACY_KEY, "step"])[metrics].mean().to_dict("index").items()}

    recorded_rows = pd.DataFrame(record["summary"]["rows"], columns=record["summary"]["key"] + metrics)
    last = recorded_rows.groupby(ACCURACY_KEY)["step"].max()
    mine, found = means(run.summary), {}
    for (*cell, step), recorded in means(recorded_rows).items():
        if step < last[tuple(cell)]:
            found.setdefault(tuple(cell), []).append((step, recorded, mine.get((*cell, step), {})))
    return found


def tolerance_lines(run: RunResults, record: dict) -> tuple[list[str], float, str]:
    """The run's metrics outside their tolerance and its changed conclusions (lines), with the largest deviation as
    a share of its tolerance and where it is. A kept checkpoint's mean over seeds has the tolerance of its cell and
    algorithm's final interval, that interval's sides around the checkpoint's recorded mean (the module docstring)."""
    largest, where = 0.0, ""
    accuracy, lines = _paired(run.accuracy, record["accuracy"], ACCURACY_KEY, "accuracy")
    checkpoints = _checkpoints(run, record)
    checks = []  # (where, metric, the run's value, the recorded value and interval, its confidence)
    for label, want, got in accuracy:
        for metric in _checked_metrics(want):
            low, high = want[f"{metric}_low"], want[f"{metric}_high"]
            checks.append((label, metric, got.get(metric), want[metric], low, high, want["confidence"]))
            for step, recorded, mine in checkpoints.get(_ident(want, ACCURACY_KEY), []):
                if (value := recorded.get(metric)) is not None:
                    checks.append((f"{label} at step {step}", metric, mine.get(metric), value,
                                   value - (want[metric] - low), value + (high - want[metric]), want["confidence"]))
    for label, metric, value, recorded, low, high, confidence in checks:
        factor = tolerance_factor(confidence, len(checks))
        if value is None:
            lines.append(f"accuracy {label}: {metric} {MISSING}")
            continue
        deviation = _deviation(value, recorded, low, high, factor)
        if deviation > largest:
            largest, where = deviation, f"{label} {metric}"
        if deviation > 1:
            lines.append(f"accuracy {label}: {metric} {value:.4g} outside its tolerance around the recorded "
                         f"{recorded:.4g} (interval [{low:.4g}, {high:.4g}] x {factor:.2f}, {len(checks)} checks)")
    differences, missing = _paired(run.differences, record["differences"], DIFFERENCE_KEY, "comparison")
    lines += missing
    for label, want, got in differences:
        alpha = want["alpha"]
        significant = want["p_holm"] <= alpha
        if significant and not (got["p_holm"] <= alpha and got["difference"] * want["difference"] > 0):
            lines.append(f"comparison {label}: recorded significant ({100 * want['difference']:+.1f} points, Holm p "
                         f"{want['p_holm']:.3g}), now {100 * got['difference']:+.1f} points, p {got['p_holm']:.3g}")
        elif not significant and got["p_holm"] <= alpha and got["difference"] > 0:
            lines.append(f"comparison {label}: recorded not significant ({100 * want['difference']:+.1f} points, "
                         f"Holm p {want['p_holm']:.3g}), now a significant improvement "
                         f"({100 * got['difference']:+.1f} points, p {got['p_holm']:.3g})")
    return lines, largest, where


def compare_with(run: RunResults, record: dict) -> Outcome:
    """The run against one record, exactly first, then within tolerance (see the module docstring)."""
    cls = record["machine"]["class"]
    recorded_stages = [Fingerprint.from_json(f) for f in record["stages"]]
    departed = departures(run.stages, recorded_stages)
    stage_lines = [line for _, line in departed]
    summary_lines = summary_differences(run.summary, record["summary"])
    conclusion_lines = conclusion_differences(run, record)
    if not stage_lines and not summary_lines and not conclusion_lines:
        return Outcome(IDENTICAL, cls)
    departs = [f"departs from it first at {_first_departure(stage_lines, summary_lines, conclusion_lines)}"]
    hard = [line for stage, line in departed if stage in EXACT_STAGES or line.endswith(MISSING)]
    counts = [c for c in record["summary"]["columns"] if COUNTS.match(c)]
    hard += summary_differences(run.summary, {**record["summary"], "columns": counts})
    if hard:
        rest = [line for line in stage_lines[1:] + summary_lines + conclusion_lines if line not in hard]
        return Outcome(DIFFERENT, cls, departs + hard + rest)
    lines, largest, where = tolerance_lines(run, record)
    if machine_class(run.summary) == cls:
        # Its own class's record must be reproduced exactly; how far the change moved the study is still worth
        # knowing before a deliberate change is recorded with --write.
        moved = (f"as another machine class's run it would be within tolerance (largest deviation {largest:.2f} "
                 f"of its tolerance, {where})" if not lines else
                 f"as another machine class's run it would be different too: {lines[0]}")
        return Outcome(DIFFERENT, cls, [*departs, moved, *stage_lines[1:], *summary_lines, *conclusion_lines],
                       largest)
    if lines:
        return Outcome(DIFFERENT, cls, departs + lines, largest)
    return Outcome(WITHIN_TOLERANCE, cls, departs + [f"largest deviation {largest:.2f} of its tolerance ({where})"],
                   largest)


def _first_departure(stage_lines: list[str], summary_lines: list[str], conclusion_lines: list[str]) -> str:
    """Where a run first parts from a record: a stage's fingerprint, else the evaluations (the summary rows: every
    stage before them is the same), else the report's tables (the same summary, other conclusions drawn)."""
    if stage_lines:
        return stage_lines[0]
    if summary_lines:
        return f"the evaluations (every stage before them is identical): {summary_lines[0]}"
    return f"the report's tables (the summary is identical): {conclusion_lines[0]}"


def compare(run: RunResults, path: str | Path) -> tuple[str, list[Outcome]]:
    """The run against every record of the expected file `path`: identical to one of them; different from its own
    class's record or from any record beyond tolerance; else within tolerance of them all."""
    records = read_expected(path)
    try:
        outcomes = [compare_with(run, record) for record in records]
    except KeyError as err:
        raise ExpectedError(f"{path}: a record lacks the key {err} (rerecord it with --write)") from None
    if any(o.verdict == IDENTICAL for o in outcomes):
        return IDENTICAL, [o for o in outcomes if o.verdict == IDENTICAL]
    if not outcomes or any(o.verdict == DIFFERENT for o in outcomes):
        return DIFFERENT, outcomes
    return WITHIN_TOLERANCE, outcomes

