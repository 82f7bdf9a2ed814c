"""The report's figures, one PNG per (model, task) and kind: training curves, avg@k against the checkpoint step,
and the paired differences with their intervals beside the published ones."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: chosen before pyplot is imported (ruff's E402 allows imports after this call)
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from kalmanrl.core.io import atomic_path
from kalmanrl.core.layout import FIGURE_FILE, WARM_START, fill
from kalmanrl.reporting.published import paper_matches
from kalmanrl.reporting.results import CELL

CURVES = {"reward_mean": "reward", "accuracy": "training accuracy", "kl": "KL to the reference (k3)",
          "clip_frac": "clip fraction", "response_length": "response length (tokens)", "entropy": "entropy",
          "token_mult_prob_error": "train/inference mismatch (mean exp|Δ log p|)",
          "val_accuracy": "validation accuracy (train.validation)"}

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


def _band(ax, frame: pd.DataFrame, column: str, label: str, **line_style) -> str:
    """Mean over seeds with a +-1 std band (no band for a single seed); returns the line's colour."""
    stats = frame.groupby("step")[column].agg(["mean", "std"]).fillna({"std": 0})
    line, = ax.plot(stats.index, stats["mean"], label=label, marker="o" if len(stats) < 8 else None, markersize=3,
                    **line_style)
    ax.fill_between(stats.index, stats["mean"] - stats["std"], stats["mean"] + stats["std"], alpha=0.2,
                    color=line.get_color())
    return line.get_color()


def _figure_per_run(frame: pd.DataFrame, panels: Callable, draw: Callable, out: Path) -> list[Path]:
    """out/{model}__{task}.png for each (model, task) of `frame`: one panel per item of `panels(run)`, drawn by
    `draw(ax, run, item)`, with a grid and the legend in the first panel."""
    written = []
    for (model, task), run in frame.groupby(["model", "task"]) if len(frame) else []:
        items = panels(run)
        fig, axes = _panels(len(items))
        for ax, item in zip(axes, items, strict=True):
            draw(ax, run, item)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"{model}, {task}", fontsize=10)
        fig.tight_layout()
        written.append(_save(fig, out / fill(FIGURE_FILE, model=model, task=task)))
    return written


def plot_curves(metrics: pd.DataFrame, out: Path) -> list[Path]:
    """figures/curves/{model}__{task}.png: one panel per training metric present, one line per algorithm."""
    columns = [c for c in CURVES if c in metrics and metrics[c].notna().any()]

    def draw(ax, runs: pd.DataFrame, column: str) -> None:
        for algorithm, frame in runs.groupby("algorithm"):
            _band(ax, frame.dropna(subset=[column]), column, algorithm)  # validation: only the steps validated
        ax.set(xlabel="RL step", ylabel=CURVES[column])

    return _figure_per_run(metrics, lambda runs: columns, draw, out) if columns else []


# The KPO paper's token-level noise diagnostic, as the trainer records it (algorithms.token_noise_stats on the
# token log-ratios z = logp - old_logp of each mini-batch, raw and after KPO's filter): column stem -> axis label.
TOKEN_NOISE = {"sign_switch_rate": "sign-switch rate of z", "sign_run_length": "same-sign run length (tokens)"}
TOKEN_NOISE_NOTE = ("The KPO paper's token-level noise diagnostic, per RL step (mean and ±1 std over seeds): how often "
                    "the sign of the token log-ratio z = log pi - log pi_old switches between adjacent tokens, and the "
                    "mean length of same-sign runs, on the raw z (solid) and on z after KPO's causal Kalman filter "
                    "(dashed), whatever the algorithm trained with. A filter that removes token noise switches less "
                    "and runs longer.")


def plot_token_noise(metrics: pd.DataFrame, out: Path) -> list[Path]:
    """figures/token_noise/{model}__{task}.png: one panel per diagnostic, raw (solid) and filtered (dashed) per
    algorithm; nothing when the runs did not record it."""
    stems = [s for s in TOKEN_NOISE if {f"{s}_raw", f"{s}_filtered"} <= set(metrics)
             and metrics[f"{s}_raw"].notna().any()]

    def draw(ax, runs: pd.DataFrame, stem: str) -> None:
        for algorithm, frame in runs.groupby("algorithm"):
            color = _band(ax, frame, f"{stem}_raw", f"{algorithm}, raw")
            _band(ax, frame, f"{stem}_filtered", f"{algorithm}, filtered", color=color, linestyle="--")
        ax.set(xlabel="RL step", ylabel=TOKEN_NOISE[stem])

    return _figure_per_run(metrics, lambda runs: stems, draw, out) if stems else []


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
    the published difference where the setting matches (red: checked against the paper, orange: only against a
    secondary source); a grey bar spans the differences the grid cannot detect
    (within +-`detectable`, when the table has it: comparisons.family_tests)."""
    written = []
    for (model, task), frame in differences.groupby(["model", "task"]) if len(differences) else []:
        frame = frame.iloc[::-1]
        labels = [f"{b}: {c}" for b, c in zip(frame["benchmark"], frame["comparison"], strict=True)]
        fig, ax = plt.subplots(figsize=(7, 1.2 + 0.4 * len(frame)))
        y = np.arange(len(frame))
        mean, low, high = (100 * frame[c].to_numpy(float) for c in ("difference", "low", "high"))
        if "detectable" in frame:
            reach = np.minimum(100 * frame["detectable"].to_numpy(float), 100)
            ax.barh(y, 2 * reach, left=-reach, height=0.6, color="gray", alpha=0.2,
                    label="too small for this grid to detect")
        ax.errorbar(mean, y, xerr=np.stack([mean - low, high - mean]), fmt="o", capsize=3, label="ours (CI)")
        matches = paper_matches(frame, published, [*CELL, "comparison"], "difference")
        for checked, color, label in (("paper", "red", "published (not reproduced)"),
                                      ("secondary", "orange", "published, secondary source only (not reproduced)")):
            marked = [(m["difference"], i) for i, m in enumerate(matches) if m is not None and m["checked"] == checked]
            if marked:
                ax.scatter(*zip(*marked, strict=True), marker="x", color=color, zorder=3, label=label)
        ax.axvline(0, color="gray", lw=1)
        ax.set(yticks=y, yticklabels=labels, xlabel="avg@k difference (percentage points)",
               title=f"{model}, {task}")
        ax.legend(fontsize=8)
        ax.grid(axis="x", alpha=0.3)
        fig.tight_layout()
        written.append(_save(fig, out / fill(FIGURE_FILE, model=model, task=task)))
    return written
