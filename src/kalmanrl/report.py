"""The report: every evaluation summary in one Parquet, accuracy tables with bootstrap confidence intervals, paired
differences to GRPO and to the warm start, figures (training curves, accuracy vs step, differences), and the papers'
published numbers beside ours, marked as published. Works on whatever has finished: cells whose inputs are still
missing are listed and shown as "missing"."""

from __future__ import annotations

import base64
import html
import logging
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402

from kalmanrl.io import atomic_path, read_parquet, write_parquet  # noqa: E402
from kalmanrl.layout import FIGURES  # noqa: E402

log = logging.getLogger(__name__)
CURVES = {"reward_mean": "reward", "accuracy": "training accuracy", "kl": "KL to the reference (k3)",
          "clip_frac": "clip fraction", "response_length": "response length (tokens)", "entropy": "entropy"}
BASELINE = "grpo"
WARM_START = "sft"
CELL = ["model", "task", "benchmark"]
RUN = ["model", "task", "algorithm", "seed"]
NO_SEED = -1  # the warm start has no RL seed; it is the same policy for every seed of every algorithm


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float

    def __str__(self) -> str:
        """Percent (or percentage points) with the interval, or "missing"."""
        if np.isnan(self.mean):
            return "missing"
        if np.isnan(self.low):
            return f"{100 * self.mean:.1f}"
        return f"{100 * self.mean:.1f} [{100 * self.low:.1f}, {100 * self.high:.1f}]"


# ---------------------------------------------------------------------------------------------------------- inputs
def load_frames(paths: list[Path]) -> pd.DataFrame:
    """Concatenate the Parquet files that exist (a grid may still be running)."""
    frames = [read_parquet(p) for p in paths if Path(p).exists()]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def summary_ident(path: str | Path) -> dict | None:
    """The identification a summary path encodes in the workflow layout
    `.../{model}/{task}/{sft | <algorithm>/seed<n>}/{benchmark}.summary.parquet`; None for any other layout."""
    parts = Path(path).parts
    if not parts[-1].endswith(".summary.parquet"):
        return None
    benchmark = parts[-1].removesuffix(".summary.parquet")
    if len(parts) >= 4 and parts[-2] == WARM_START:
        return {"model": parts[-4], "task": parts[-3], "algorithm": WARM_START, "seed": NO_SEED, "benchmark": benchmark}
    if len(parts) >= 5 and parts[-2].startswith("seed") and parts[-2][4:].isdigit():
        return {"model": parts[-5], "task": parts[-4], "algorithm": parts[-3], "seed": int(parts[-2][4:]),
                "benchmark": benchmark}
    return None


def final_steps(frame: pd.DataFrame) -> pd.DataFrame:
    """Keep each run's last evaluated step per benchmark (intermediate checkpoints feed only the step curves)."""
    if frame.empty:
        return frame
    keys = [*RUN, "benchmark"]
    last = frame.groupby(keys, dropna=False)["step"].transform("max")
    return frame[frame["step"] == last]


def _with_seed_label(frame: pd.DataFrame) -> pd.DataFrame:
    """Seed as a plain int column, NO_SEED for the warm start, so groupby and joins treat it like any other run."""
    if frame.empty:
        return frame
    return frame.assign(seed=frame["seed"].astype("Int64").fillna(NO_SEED).astype(int))


# ------------------------------------------------------------------------------------------------------ statistics
def correctness_matrix(details: pd.DataFrame) -> pd.DataFrame:
    """Mean correctness over samples per (seed, problem): rows are seeds, columns problem ids, shape [S, P]."""
    return details.pivot_table(index="seed", columns="problem_id", values="correct", aggfunc="mean")


def bootstrap(matrices: list[np.ndarray], *, samples: int, confidence: float, seed: int = 0) -> Interval:
    """Hierarchical percentile bootstrap of mean(matrices[0]) - mean(matrices[1]) (or of the mean of a single
    matrix): resample seeds (rows), then problems (columns), both with replacement. Matrices are [S, P] and aligned
    by seed and problem, so one index draw serves both and a difference is paired. NaN (a problem one seed did not
    evaluate) is skipped."""
    rng = np.random.default_rng(seed)
    first = matrices[0]
    seeds = rng.integers(first.shape[0], size=(samples, first.shape[0]))
    problems = rng.integers(first.shape[1], size=(samples, first.shape[1]))

    def statistic(m: np.ndarray) -> np.ndarray:
        return np.nanmean(m[seeds[:, :, None], problems[:, None, :]], axis=(1, 2))

    values = statistic(first) - (statistic(matrices[1]) if len(matrices) > 1 else 0)
    point = np.nanmean(first) - (np.nanmean(matrices[1]) if len(matrices) > 1 else 0)
    tail = (1 - confidence) / 2
    return Interval(float(point), *map(float, np.quantile(values, [tail, 1 - tail])))


def accuracy_table(summary: pd.DataFrame, details: pd.DataFrame, expected: pd.DataFrame, *, samples: int,
                   confidence: float) -> pd.DataFrame:
    """One row per (model, task, benchmark, algorithm) expected or found: avg@k with its bootstrap interval over
    seeds and problems, the other metrics averaged over seeds, and seeds done / expected. Missing cells are NaN."""
    runs = pd.concat([expected, summary.reindex(columns=[*RUN, "benchmark"])]).drop_duplicates()
    rows = []
    for (model, task, benchmark, algorithm), group in runs.groupby([*CELL, "algorithm"], sort=False):
        key = {"model": model, "task": task, "benchmark": benchmark, "algorithm": algorithm}
        part = _select(summary, key)
        row = {**key, "step": part["step"].max() if len(part) else np.nan,
               "seeds": f"{part['seed'].nunique()}/{group['seed'].nunique()}"}
        row.update({c: part[c].mean() if len(part) else np.nan for c in summary.columns
                    if c.startswith("pass_at_") or c in ("maj_at_k", "mean_length", "truncation_rate")})
        matrix = correctness_matrix(_select(details, key)) if len(details) else pd.DataFrame()
        interval = (bootstrap([matrix.to_numpy(float)], samples=samples, confidence=confidence) if matrix.size
                    else Interval(part["avg_at_k"].mean() if len(part) else np.nan, np.nan, np.nan))
        rows.append({**row, "avg_at_k": interval.mean, "avg_at_k_low": interval.low, "avg_at_k_high": interval.high})
    table = pd.DataFrame(rows)
    order = {WARM_START: 0, BASELINE: 1}
    rank = table["algorithm"].map(lambda a: f"{order.get(a, 2)}{a}")
    return table.assign(rank=rank).sort_values([*CELL, "rank"]).drop(columns="rank").reset_index(drop=True)


def _select(frame: pd.DataFrame, key: dict) -> pd.DataFrame:
    if frame.empty:
        return frame
    mask = np.logical_and.reduce([frame[k] == v for k, v in key.items()])
    return frame[mask]


def comparisons(algorithms: set[str]) -> list[tuple[str, str]]:
    """(algorithm, reference) pairs: every algorithm against GRPO, and every RL algorithm against the warm start."""
    pairs = [(a, BASELINE) for a in sorted(algorithms - {BASELINE, WARM_START}) if BASELINE in algorithms]
    return pairs + [(a, WARM_START) for a in sorted(algorithms - {WARM_START}) if WARM_START in algorithms]


def paired_differences(details: pd.DataFrame, *, samples: int, confidence: float) -> pd.DataFrame:
    """avg@k(algorithm) - avg@k(reference) per cell, paired by seed and problem, with a hierarchical bootstrap
    interval. The warm start has one row (no seed): against it the pairing is by problem, its row shared by all
    seeds."""
    rows = []
    if details.empty:
        return pd.DataFrame(rows)
    for cell, cell_details in details.groupby(CELL):
        for algorithm, reference in comparisons(set(cell_details["algorithm"])):
            other = correctness_matrix(cell_details[cell_details["algorithm"] == algorithm])
            base = correctness_matrix(cell_details[cell_details["algorithm"] == reference])
            if reference == WARM_START:
                base = pd.DataFrame(np.repeat(base.to_numpy(), len(other), axis=0), index=other.index,
                                    columns=base.columns)
            seeds = other.index.intersection(base.index)
            problems = other.columns.intersection(base.columns)
            if seeds.empty or problems.empty:
                continue
            interval = bootstrap([frame.loc[seeds, problems].to_numpy(float) for frame in (other, base)],
                                 samples=samples, confidence=confidence)
            rows.append({**dict(zip(CELL, cell)), "comparison": f"{algorithm} - {reference}", "seeds": len(seeds),
                         "problems": len(problems), "difference": interval.mean, "low": interval.low,
                         "high": interval.high})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------------ published numbers
def published_numbers(path: Path | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(accuracy, differences) the papers publish, one row per setting, each with its source. Accuracy is percent,
    differences percentage points. Reads the package's published.yaml unless `path` is given."""
    text = Path(path).read_text() if path else resources.files("kalmanrl").joinpath("published.yaml").read_text()
    accuracy, differences = [], []
    for paper in yaml.safe_load(text):
        context = {k: paper[k] for k in ("paper", "source", "model", "task") if k in paper}
        accuracy += [{**context, **row} for row in paper.get("accuracy", [])]
        differences += [{**context, **row} for row in paper.get("differences", [])]
    return pd.DataFrame(accuracy), pd.DataFrame(differences)


def _paper_column(table: pd.DataFrame, published: pd.DataFrame, keys: list[str], value: str) -> list[str]:
    """The published value where (model, task, benchmark, algorithm or comparison) match, else blank."""
    if published.empty or value not in published:
        return [""] * len(table)
    rows = published.dropna(subset=[value])
    for key in {"task", "benchmark"} & set(rows):  # a published number may stand for several names
        rows = rows.explode(key)
    found = {tuple(str(v).lower() for v in row[keys]): row[value] for _, row in rows.iterrows()}
    return [f"{found[k]:.2f}" if k in found else "" for k in
            (tuple(str(v).lower() for v in row[keys]) for _, row in table.iterrows())]


# ---------------------------------------------------------------------------------------------------------- figures
def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path


def _panels(n: int, *, columns: int = 3, size: tuple[float, float] = (4.5, 3.2)) -> tuple[plt.Figure, list]:
    rows = -(-n // columns)
    cols = min(n, columns)
    fig, axes = plt.subplots(rows, cols, figsize=(size[0] * cols, size[1] * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, list(axes.flat[:n])


def _band(ax, frame: pd.DataFrame, column: str, label: str) -> None:
    """Mean over seeds with a +-1 std band (no band for a single seed)."""
    stats = frame.groupby("step")[column].agg(["mean", "std"]).fillna({"std": 0})
    line, = ax.plot(stats.index, stats["mean"], label=label, marker="o" if len(stats) < 8 else None, markersize=3)
    ax.fill_between(stats.index, stats["mean"] - stats["std"], stats["mean"] + stats["std"], alpha=0.2,
                    color=line.get_color())


def _figure_per_run(frame: pd.DataFrame, panels: Callable, draw: Callable, out: Path) -> list[Path]:
    """out/{model}__{task}.png for each (model, task) of `frame`: one panel per item of `panels(run)`, drawn by
    `draw(ax, run, item)`, with a grid and the legend in the first panel."""
    written = []
    for (model, task), run in frame.groupby(["model", "task"]) if len(frame) else []:
        items = panels(run)
        fig, axes = _panels(len(items))
        for ax, item in zip(axes, items):
            draw(ax, run, item)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"{model}, {task}", fontsize=10)
        fig.tight_layout()
        written.append(_save(fig, out / f"{model}__{task}.png"))
    return written


def plot_curves(metrics: pd.DataFrame, out: Path) -> list[Path]:
    """figures/curves/{model}__{task}.png: one panel per training metric present, one line per algorithm."""
    columns = [c for c in CURVES if c in metrics and metrics[c].notna().any()]

    def draw(ax, runs: pd.DataFrame, column: str) -> None:
        for algorithm, frame in runs.groupby("algorithm"):
            _band(ax, frame, column, algorithm)
        ax.set(xlabel="RL step", ylabel=CURVES[column])

    return _figure_per_run(metrics, lambda runs: columns, draw, out) if columns else []


def plot_accuracy_vs_step(summary: pd.DataFrame, out: Path) -> list[Path]:
    """figures/accuracy_vs_step/{model}__{task}.png: avg@k against the checkpoint step, one panel per benchmark;
    every algorithm starts from the warm start at step 0."""

    def draw(ax, frame: pd.DataFrame, benchmark: str) -> None:
        part = frame[frame["benchmark"] == benchmark]
        start = part[part["algorithm"] == WARM_START]
        for algorithm, runs in part[part["algorithm"] != WARM_START].groupby("algorithm"):
            seeds = runs["seed"].unique()
            anchored = pd.concat([runs] + [start.assign(seed=s) for s in seeds])
            _band(ax, anchored.assign(avg=100 * anchored["avg_at_k"]), "avg", algorithm)
        if len(start):
            ax.scatter([0], [100 * start["avg_at_k"].mean()], color="black", zorder=3, label=WARM_START)
        ax.set(title=benchmark, xlabel="checkpoint step", ylabel="avg@k (%)")

    return _figure_per_run(summary, lambda frame: sorted(frame["benchmark"].unique()), draw, out)


def plot_differences(differences: pd.DataFrame, published: pd.DataFrame, out: Path) -> list[Path]:
    """figures/differences/{model}__{task}.png: each paired difference with its interval, in points; a cross marks
    the published difference where the setting matches."""
    written = []
    for (model, task), frame in differences.groupby(["model", "task"]) if len(differences) else []:
        frame = frame.iloc[::-1]
        labels = [f"{b}: {c}" for b, c in zip(frame["benchmark"], frame["comparison"])]
        fig, ax = plt.subplots(figsize=(7, 1.2 + 0.4 * len(frame)))
        y = np.arange(len(frame))
        mean, low, high = (100 * frame[c].to_numpy(float) for c in ("difference", "low", "high"))
        ax.errorbar(mean, y, xerr=[mean - low, high - mean], fmt="o", capsize=3, label="ours (CI)")
        paper = _paper_column(frame, published, [*CELL, "comparison"], "difference")
        marked = [(float(p), i) for i, p in enumerate(paper) if p]
        if marked:
            ax.scatter(*zip(*marked), marker="x", color="red", zorder=3, label="published (not reproduced)")
        ax.axvline(0, color="gray", lw=1)
        ax.set(yticks=y, yticklabels=labels, xlabel="avg@k difference (percentage points)",
               title=f"{model}, {task}")
        ax.legend(fontsize=8)
        ax.grid(axis="x", alpha=0.3)
        fig.tight_layout()
        written.append(_save(fig, out / f"{model}__{task}.png"))
    return written


# ----------------------------------------------------------------------------------------------------------- tables
def accuracy_display(table: pd.DataFrame, published: pd.DataFrame, confidence: float) -> pd.DataFrame:
    """The accuracy table as readers see it: percent, the interval, published values in their own columns."""
    ci = f"avg@k (%) [{round(100 * confidence)}% CI]"
    shown = table[[*CELL, "algorithm", "step", "seeds"]].copy()
    shown["step"] = [str(int(s)) if pd.notna(s) else "missing" for s in table["step"]]
    shown[ci] = [str(Interval(*v)) for v in zip(table["avg_at_k"], table["avg_at_k_low"], table["avg_at_k_high"])]
    percent = [c for c in table.columns if c.startswith("pass_at_")] + ["maj_at_k", "truncation_rate"]
    for column in [c for c in percent if c in table]:
        name = column.replace("pass_at_", "pass@").replace("maj_at_k", "maj@k").replace("truncation_rate", "truncated")
        shown[f"{name} (%)"] = [f"{100 * v:.1f}" if pd.notna(v) else "missing" for v in table[column]]
    if "mean_length" in table:
        shown["mean length (tokens)"] = [f"{v:.1f}" if pd.notna(v) else "missing" for v in table["mean_length"]]
    keys = [*CELL, "algorithm"]
    shown["paper avg@k (%), published"] = _paper_column(table, published, keys, "avg_at_k")
    for column in [c for c in published.columns if c.startswith("pass_at_")]:
        shown[f"paper {column.replace('pass_at_', 'pass@')} (%), published"] = _paper_column(table, published, keys,
                                                                                           column)
    return shown


def differences_display(table: pd.DataFrame, published: pd.DataFrame, confidence: float) -> pd.DataFrame:
    shown = table[[*CELL, "comparison", "seeds", "problems"]].copy()
    shown[f"difference (points) [{round(100 * confidence)}% CI]"] = [
        str(Interval(*v)) for v in zip(table["difference"], table["low"], table["high"])]
    shown["paper difference (points), published"] = _paper_column(table, published, [*CELL, "comparison"],
                                                                  "difference")
    return shown


def published_sources(*tables: pd.DataFrame) -> dict[str, str]:
    return {p: s for t in tables if len(t) for p, s in zip(t["paper"], t["source"])}


def published_display(accuracy: pd.DataFrame, differences: pd.DataFrame) -> pd.DataFrame:
    """Both kinds of published numbers in one table (sources in the note), several names joined by " / "."""
    table = pd.concat([accuracy, differences], ignore_index=True).drop(columns="source", errors="ignore")
    return table.map(lambda v: " / ".join(v) if isinstance(v, list) else v).fillna("")


def provenance_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Distinct (commit, package versions) combinations and how many result rows each produced."""
    columns = [c for c in summary.columns if c.startswith("version_") or c == "git_commit"]
    if not columns:
        return pd.DataFrame()
    return summary.groupby(columns, dropna=False).size().rename("rows").reset_index()


def reproduce_text(reproduce: dict | None) -> tuple[str, str]:
    """(commands, config YAML) for "how to reproduce this"."""
    reproduce = reproduce or {}
    configfiles = " ".join(reproduce.get("configfiles", [])) or "<the config of this run>"
    commands = "\n".join([
        "# the whole grid, from this config (at the git commit in the provenance table):",
        f"snakemake --cores all --configfile {configfiles}",
        "# any one cell (its path is the cell's model/task/algorithm/seed/benchmark):",
        f"snakemake --cores all --configfile {configfiles} "
        "results/eval/<model>/<task>/<algorithm>/seed<seed>/<benchmark>.summary.parquet",
        "# or without Snakemake: summary.parquet holds each row's `command` (exact settings and inputs)"])
    config = yaml.safe_dump(reproduce["config"], sort_keys=False) if "config" in reproduce else ""
    return commands, config


# ---------------------------------------------------------------------------------------------------------- report
def build_report(summaries: list[Path], metrics: list[Path], out_dir: Path, *, settings: dict,
                 published: Path | None = None) -> None:
    """Write out_dir/summary.parquet, report.md, report.html and figures/{kind}/*.png from the inputs that exist.

    settings: {"report": {"bootstrap_samples", "confidence"}, optional "reproduce": {"configfiles", "config"}}.
    published: a published-numbers YAML in the package's format (default: the package's own)."""
    cfg = settings["report"]
    samples, confidence = cfg["bootstrap_samples"], cfg["confidence"]
    out_dir = Path(out_dir)
    summary = _with_seed_label(load_frames(summaries))
    if summary.empty:  # nothing finished yet: still one (missing) row per expected cell
        summary = pd.DataFrame(columns=[*RUN, "benchmark", "step", "avg_at_k"])
    details = _with_seed_label(load_frames([str(p).replace(".summary.parquet", ".details.parquet")
                                            for p in summaries]))
    curves = load_frames(metrics)
    missing = [str(p) for p in [*summaries, *metrics] if not Path(p).exists()]
    expected = pd.DataFrame([i for p in summaries if (i := summary_ident(p))], columns=[*RUN, "benchmark"])
    write_parquet(summary.assign(seed=summary["seed"].replace(NO_SEED, None).astype("Int64"))
                  if len(summary) else summary, out_dir / "summary.parquet")

    for kind in FIGURES:  # every figure directory exists, also when there is nothing to plot in it yet
        (out_dir / "figures" / kind).mkdir(parents=True, exist_ok=True)
    final, final_details = final_steps(summary), final_steps(details)
    paper_accuracy, paper_differences = published_numbers(published)
    accuracy = accuracy_table(final, final_details, expected, samples=samples, confidence=confidence) \
        if len(final) or len(expected) else pd.DataFrame()
    differences = paired_differences(final_details, samples=samples, confidence=confidence)
    ci = (f"{round(100 * confidence)}% intervals: hierarchical percentile bootstrap over seeds, then over problems "
          f"({samples} resamples); each problem's correctness is first averaged over its samples. Differences are "
          f"paired by seed and problem (against the warm start, by problem). With few seeds the seed part of the "
          f"interval is narrow (3 seeds with a real seed effect: about 85% coverage in tests/test_report.py).")
    sources = "; ".join(f"{p}: {s}" for p, s in published_sources(paper_accuracy, paper_differences).items())
    sections = [
        Section("Accuracy per benchmark and algorithm", ci,
                accuracy_display(accuracy, paper_accuracy, confidence) if len(accuracy) else None),
        Section("Differences to GRPO and to the warm start", ci,
                differences_display(differences, paper_differences, confidence) if len(differences) else None),
        Section(FIGURES["differences"], "Each difference with its interval; a red cross marks the published one.",
                figures=plot_differences(differences, paper_differences, out_dir / "figures" / "differences")),
        Section(FIGURES["accuracy_vs_step"], "avg@k of every evaluated checkpoint; step 0 is the warm start.",
                figures=plot_accuracy_vs_step(summary, out_dir / "figures" / "accuracy_vs_step")),
        Section(FIGURES["curves"], "Per RL step, mean and ±1 std over seeds.",
                figures=plot_curves(curves, out_dir / "figures" / "curves") if len(curves) else []),
        Section("Published numbers (not reproduced here)",
                f"Published by the papers, NOT reproduced by this pipeline; shown beside ours only where model, "
                f"task, benchmark and algorithm match. Sources: {sources}.",
                published_display(paper_accuracy, paper_differences)),
        Section("Provenance", "Every row of summary.parquet also carries its settings hash, input file hashes and "
                "the exact command that reruns it.", provenance_table(summary) if len(summary) else None)]
    page = Page(sections, missing, *reproduce_text(settings.get("reproduce")))
    for name, render in (("report.md", page.markdown), ("report.html", page.html)):
        with atomic_path(out_dir / name) as tmp:
            tmp.write_text(render(out_dir))
    log.info("report: %d summary rows, %d training runs, %d missing inputs", len(summary),
             len(curves.drop_duplicates(RUN)) if len(curves) else 0, len(missing))


@dataclass
class Section:
    """One heading of the report: a table, or figures (None / [] render as "missing")."""
    title: str
    note: str
    table: pd.DataFrame | None = None
    figures: list[Path] | None = None


@dataclass
class Page:
    """The report's content, rendered once as Markdown and once as self-contained HTML."""
    sections: list[Section]
    missing: list[str]
    commands: str
    config: str

    def markdown(self, out_dir: Path) -> str:
        lines = ["# kalmanrl report", ""]
        if self.missing:
            lines += [f"**Partial results**: {len(self.missing)} expected inputs are missing; their cells show "
                      "`missing`.", "", *[f"- `{p}`" for p in self.missing], ""]
        for section in self.sections:
            lines += [f"## {section.title}", "", section.note, ""]
            if section.figures is not None:
                lines += [f"![{p.stem}]({p.relative_to(out_dir).as_posix()})" for p in section.figures] or ["missing"]
            elif section.table is not None and len(section.table):
                lines.append(section.table.to_markdown(index=False, disable_numparse=True))
            else:
                lines.append("missing")
            lines.append("")
        lines += ["## How to reproduce this", "", "```bash", self.commands, "```", ""]
        if self.config:
            lines += ["Config:", "", "```yaml", self.config.rstrip(), "```", ""]
        return "\n".join(lines)

    def html(self, out_dir: Path) -> str:
        """Self-contained: figures are embedded as data URIs, so the file can be mailed or archived alone."""
        parts = ["<!doctype html><html><head><meta charset='utf-8'><title>kalmanrl report</title><style>"
                 "body{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}"
                 "table{border-collapse:collapse;font-size:13px;margin-bottom:1em}"
                 "td,th{border:1px solid #ccc;padding:3px 6px;text-align:left}th{background:#f3f3f3}"
                 "img{max-width:100%;display:block;margin:1em 0}"
                 "pre{background:#f6f6f6;padding:1em;overflow-x:auto}.note{color:#555}"
                 ".partial{background:#fff3cd;padding:.5em 1em;border:1px solid #e0c36c}</style></head><body>",
                 "<h1>kalmanrl report</h1>"]
        if self.missing:
            items = "".join(f"<li><code>{html.escape(p)}</code></li>" for p in self.missing)
            parts.append(f"<div class='partial'><b>Partial results</b>: {len(self.missing)} expected inputs are "
                         f"missing; their cells show “missing”.<details><summary>missing inputs</summary>"
                         f"<ul>{items}</ul></details></div>")
        for section in self.sections:
            parts += [f"<h2>{html.escape(section.title)}</h2>", f"<p class='note'>{html.escape(section.note)}</p>"]
            if section.figures is not None:
                parts += [f"<img alt='{html.escape(p.parent.name)}: {html.escape(p.stem)}' "
                          f"src='data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}'>"
                          for p in section.figures] or ["<p>missing</p>"]
            elif section.table is not None and len(section.table):
                parts.append(section.table.to_html(index=False, escape=True, na_rep=""))
            else:
                parts.append("<p>missing</p>")
        parts += ["<h2>How to reproduce this</h2>", f"<pre>{html.escape(self.commands)}</pre>"]
        if self.config:
            parts += ["<p>Config:</p>", f"<pre>{html.escape(self.config)}</pre>"]
        parts.append("</body></html>")
        return "\n".join(parts)
