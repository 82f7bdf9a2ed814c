"""The report: every evaluation summary in one Parquet, accuracy tables with bootstrap confidence intervals, paired
differences to GRPO, training curves, and the papers' published numbers beside ours (marked as published). Works on
whatever has finished: missing cells are shown as missing."""

from __future__ import annotations

import base64
import html
import logging
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

log = logging.getLogger(__name__)
CURVES = {"reward_mean": "reward", "accuracy": "training accuracy", "kl": "KL to the start policy (k3)",
          "clip_frac": "clip fraction", "response_length": "response length (tokens)",
          "sign_switch_rate_raw": "token log-ratio sign-switch rate"}
BASELINE = "grpo"
CELL = ["model", "task", "benchmark"]


@dataclass
class Interval:
    mean: float
    low: float
    high: float

    def __str__(self) -> str:
        if np.isnan(self.mean):
            return "missing"
        return f"{100 * self.mean:.1f} [{100 * self.low:.1f}, {100 * self.high:.1f}]"


def load_frames(paths: list[Path]) -> pd.DataFrame:
    """Concatenate the Parquet files that exist (a grid may still be running)."""
    frames = [read_parquet(p) for p in paths if Path(p).exists()]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def correctness_matrix(details: pd.DataFrame) -> tuple[np.ndarray, list, list]:
    """Mean correctness per (seed, problem) [S, P] of one algorithm's details, with the seed and problem labels."""
    table = details.assign(seed=details["seed"].fillna(-1)).pivot_table(
        index="seed", columns="problem_id", values="correct", aggfunc="mean")
    return table.to_numpy(dtype=float), list(table.index), list(table.columns)


def bootstrap(matrices: list[np.ndarray], *, samples: int, confidence: float, seed: int = 0) -> Interval:
    """Hierarchical bootstrap (seeds, then problems) of mean(matrices[0]) - mean(matrices[1]) (or of the mean when one
    matrix is given). Matrices are [S, P] and aligned by seed and problem, so a difference is paired."""
    rng = np.random.default_rng(seed)
    first = matrices[0]
    seeds = rng.integers(first.shape[0], size=(samples, first.shape[0]))
    problems = rng.integers(first.shape[1], size=(samples, first.shape[1]))

    def statistic(m: np.ndarray) -> np.ndarray:
        return m[seeds[:, :, None], problems[:, None, :]].mean(axis=(1, 2))

    values = statistic(first) - (statistic(matrices[1]) if len(matrices) > 1 else 0)
    point = first.mean() - (matrices[1].mean() if len(matrices) > 1 else 0)
    tail = (1 - confidence) / 2
    return Interval(point, *np.quantile(values, [tail, 1 - tail]))


def accuracy_table(details: pd.DataFrame, summary: pd.DataFrame, *, samples: int, confidence: float) -> pd.DataFrame:
    """One row per (model, task, benchmark, algorithm): avg@k with its interval over seeds and problems, the other
    summary metrics averaged over seeds, and the number of seeds; missing cells of the grid appear as NaN."""
    rows = []
    algorithms = sorted(summary["algorithm"].unique(), key=lambda a: (a != "sft", a != BASELINE, a))
    for cell, cell_summary in summary.groupby(CELL):
        for algorithm in algorithms:
            part = cell_summary[cell_summary["algorithm"] == algorithm]
            row = dict(zip(CELL, cell), algorithm=algorithm, seeds=part["seed"].nunique(dropna=False) if len(part) else 0)
            metric_cols = [c for c in part.columns if c.startswith(("pass_at_", "maj_at_k", "mean_length",
                                                                    "truncation_rate"))]
            row.update({c: part[c].mean() for c in metric_cols})
            cell_details = details[(details[CELL] == pd.Series(cell, index=CELL)).all(axis=1)
                                   & (details["algorithm"] == algorithm)] if len(details) else details
            interval = (bootstrap([correctness_matrix(cell_details)[0]], samples=samples, confidence=confidence)
                        if len(cell_details) else Interval(part["avg_at_k"].mean() if len(part) else np.nan,
                                                           np.nan, np.nan))
            row.update(avg_at_k=interval.mean, avg_at_k_low=interval.low, avg_at_k_high=interval.high)
            rows.append(row)
    return pd.DataFrame(rows)


def paired_differences(details: pd.DataFrame, *, samples: int, confidence: float) -> pd.DataFrame:
    """avg@k(algorithm) - avg@k(GRPO) per cell, paired by seed and problem, with a hierarchical bootstrap interval."""
    rows = []
    if details.empty or BASELINE not in set(details["algorithm"]):
        return pd.DataFrame(rows)
    for cell, cell_details in details.groupby(CELL):
        base, base_seeds, base_problems = correctness_matrix(cell_details[cell_details["algorithm"] == BASELINE])
        for algorithm in sorted(set(cell_details["algorithm"]) - {BASELINE, "sft"}):
            other, seeds, problems = correctness_matrix(cell_details[cell_details["algorithm"] == algorithm])
            common_seeds = [s for s in seeds if s in base_seeds]
            common_problems = [p for p in problems if p in base_problems]
            if not common_seeds or not common_problems:
                continue
            pick = lambda m, s_labels, p_labels: m[np.ix_([s_labels.index(s) for s in common_seeds],  # noqa: E731
                                                          [p_labels.index(p) for p in common_problems])]
            interval = bootstrap([pick(other, seeds, problems), pick(base, base_seeds, base_problems)],
                                 samples=samples, confidence=confidence)
            rows.append({**dict(zip(CELL, cell)), "comparison": f"{algorithm} - {BASELINE}",
                         "seeds": len(common_seeds), "difference": interval.mean, "low": interval.low,
                         "high": interval.high})
    return pd.DataFrame(rows)


def published_numbers() -> tuple[str, str, pd.DataFrame]:
    data = yaml.safe_load(resources.files("kalmanrl").joinpath("published.yaml").read_text())
    return data["source"], data["model"], pd.DataFrame(data["rows"])


def plot_curves(metrics: pd.DataFrame, figures: Path) -> list[Path]:
    """One PNG per training metric: mean over seeds with a band of +-1 std, one line per algorithm and task."""
    written = []
    figures.mkdir(parents=True, exist_ok=True)
    for column, label in CURVES.items():
        if column not in metrics or metrics[column].isna().all():
            continue
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for (model, task, algorithm), runs in metrics.groupby(["model", "task", "algorithm"]):
            stats = runs.groupby("step")[column].agg(["mean", "std"]).fillna({"std": 0})
            ax.plot(stats.index, stats["mean"], label=f"{algorithm} ({model}, {task})")
            ax.fill_between(stats.index, stats["mean"] - stats["std"], stats["mean"] + stats["std"], alpha=0.2)
        ax.set_xlabel("RL step")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = figures / f"{column}.png"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _format_table(table: pd.DataFrame, percent: list[str]) -> pd.DataFrame:
    """Percentages with one decimal, missing cells spelled out, metric columns named for readers."""
    shown = table.copy()
    for column in percent:
        if column in shown:
            shown[column] = shown[column].map(lambda v: "missing" if pd.isna(v) else f"{100 * v:.1f}")
    names = {c: c.replace("pass_at_", "pass@").replace("maj_at_k", "maj@k") + (" (%)" if c in percent else "")
             for c in shown.columns}
    return shown.fillna("missing").rename(columns={**names, "mean_length": "mean length (tokens)"})


def _accuracy_display(table: pd.DataFrame, published: pd.DataFrame, paper_model: str) -> pd.DataFrame:
    shown = table.copy()
    shown["avg@k (%), CI"] = [str(Interval(m, lo, hi)) for m, lo, hi in
                              zip(table["avg_at_k"], table["avg_at_k_low"], table["avg_at_k_high"])]
    paper = {(r.benchmark, r.algorithm): r.avg_at_k for r in published.itertuples()}
    shown["paper avg@k (%), published"] = [
        f"{paper[(b, a)]:.2f}" if m.lower() == paper_model and (b, a) in paper else ""
        for m, b, a in zip(table["model"], table["benchmark"], table["algorithm"])]
    keep = [c for c in shown.columns if c not in ("avg_at_k", "avg_at_k_low", "avg_at_k_high")]
    return _format_table(shown[keep], [c for c in keep if c.startswith(("pass_at_", "maj_at_k", "truncation"))])


def build_report(summaries: list[Path], metrics: list[Path], out_dir: Path, *, settings: dict) -> None:
    """Write out_dir/summary.parquet, report.md, report.html and figures/*.png from the files that exist."""
    cfg = settings["report"]
    out_dir = Path(out_dir)
    summary = load_frames(summaries)
    details = load_frames([Path(str(p).replace(".summary.parquet", ".details.parquet")) for p in summaries])
    curves = load_frames(metrics)
    missing = [str(p) for p in [*summaries, *metrics] if not Path(p).exists()]
    write_parquet(summary, out_dir / "summary.parquet")

    source, paper_model, published = published_numbers()
    accuracy = accuracy_table(details, summary, samples=cfg["bootstrap_samples"], confidence=cfg["confidence"]) \
        if len(summary) else pd.DataFrame()
    differences = paired_differences(details, samples=cfg["bootstrap_samples"], confidence=cfg["confidence"])
    figures = plot_curves(curves, out_dir / "figures") if len(curves) else []

    ci = (f"{round(100 * cfg['confidence'])}% intervals: hierarchical bootstrap over seeds and then problems "
          f"({cfg['bootstrap_samples']} resamples); differences are paired by seed and problem.")
    sections = [("Accuracy per benchmark and algorithm", ci,
                 _accuracy_display(accuracy, published, paper_model) if len(accuracy) else None),
                ("Differences to GRPO", ci, _format_table(differences, ["difference", "low", "high"])
                 if len(differences) else None),
                ("Published numbers (not reproduced here)", source, published)]
    provenance = summary[[c for c in summary.columns if c.startswith(("version_", "git_commit", "settings_hash"))]] \
        .drop_duplicates() if len(summary) else pd.DataFrame()
    reproduce = ("snakemake --cores all --configfile <the config of this run>  # every cell: "
                 "snakemake --cores all results/eval/<model>/<task>/<algorithm>/seed<n>/<benchmark>.summary.parquet")
    _write_markdown(out_dir / "report.md", sections, figures, missing, provenance, reproduce)
    _write_html(out_dir / "report.html", sections, figures, missing, provenance, reproduce)
    log.info("report: %d summaries, %d training runs, %d missing inputs", len(summary),
             curves[["model", "task", "algorithm", "seed"]].drop_duplicates().shape[0] if len(curves) else 0,
             len(missing))


def _write_markdown(path: Path, sections, figures: list[Path], missing: list[str], provenance: pd.DataFrame,
                    reproduce: str) -> None:
    lines = ["# kalmanrl report", ""]
    if missing:
        lines += [f"**Partial results**: {len(missing)} expected inputs are missing (shown as `missing`).", ""]
    for title, note, table in sections:
        lines += [f"## {title}", "", note, "", table.to_markdown(index=False) if table is not None else "missing", ""]
    lines += ["## Training curves", ""] + [f"![{f.stem}](figures/{f.name})" for f in figures] + [""]
    if len(provenance):
        lines += ["## Provenance", "", provenance.to_markdown(index=False), ""]
    lines += ["## How to reproduce this", "", "```bash", reproduce, "```", ""]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines))


def _write_html(path: Path, sections, figures: list[Path], missing: list[str], provenance: pd.DataFrame,
                reproduce: str) -> None:
    """Self-contained HTML: figures embedded as data URIs."""
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>kalmanrl report</title><style>"
             "body{font-family:sans-serif;max-width:1100px;margin:2em auto;}table{border-collapse:collapse;"
             "font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px}img{max-width:49%}</style></head><body>",
             "<h1>kalmanrl report</h1>"]
    if missing:
        parts.append(f"<p><b>Partial results</b>: {len(missing)} expected inputs are missing.</p>")
    for title, note, table in sections:
        parts += [f"<h2>{html.escape(title)}</h2>", f"<p>{html.escape(note)}</p>",
                  table.to_html(index=False, escape=True) if table is not None else "<p>missing</p>"]
    parts.append("<h2>Training curves</h2>")
    for figure in figures:
        data = base64.b64encode(figure.read_bytes()).decode()
        parts.append(f"<img alt='{figure.stem}' src='data:image/png;base64,{data}'>")
    if len(provenance):
        parts += ["<h2>Provenance</h2>", provenance.to_html(index=False)]
    parts += ["<h2>How to reproduce this</h2>", f"<pre>{html.escape(reproduce)}</pre>", "</body></html>"]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(parts))
