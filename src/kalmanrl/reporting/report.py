"""The report: every evaluation summary in one Parquet, the accuracy and comparison tables as readers see them, the
figures, and the papers' published numbers beside ours (marked as published), rendered once as Markdown and once as
self-contained HTML. Works on whatever has finished: cells whose inputs are still missing are listed and shown as
"missing"."""

from __future__ import annotations

import base64
import html
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from kalmanrl.core.io import atomic_path, write_parquet
from kalmanrl.core.layout import (
    FIGURES,
    REPORT_FILES,
    ResultsTree,
    evaluation_sibling,
    figure_dir,
    report_file,
    run_name,
)
from kalmanrl.reporting.comparisons import (
    POOLED,
    accuracy_table,
    family_tests,
    paired_differences,
    seeds_for,
    with_pooled_benchmark,
)
from kalmanrl.reporting.figures import (
    TOKEN_NOISE_NOTE,
    plot_accuracy_vs_step,
    plot_curves,
    plot_differences,
    plot_token_noise,
)
from kalmanrl.reporting.published import (
    SECONDARY_NOTE,
    paper_column,
    paper_matches,
    published_display,
    published_numbers,
    published_sources,
)
from kalmanrl.reporting.results import CELL, NO_SEED, RUN, final_steps, load_frames, summary_ident, with_seed_label
from kalmanrl.reporting.stats import NO_SEED_EFFECT_COVERAGE, SEED_EFFECT_COVERAGE, Interval
from kalmanrl.runtime.provenance import ENVIRONMENT_COLUMNS

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------- tables
def accuracy_display(table: pd.DataFrame, published: pd.DataFrame, confidence: float) -> pd.DataFrame:
    """The accuracy table as readers see it: percent, the interval, published values in their own columns (marked
    where checked only against a secondary source)."""
    ci = f"avg@k (%) [{round(100 * confidence)}% CI]"
    shown = table[[*CELL, "algorithm", "step", "seeds"]].copy()
    shown["step"] = [str(int(s)) if pd.notna(s) else "missing" for s in table["step"]]
    shown[ci] = [str(Interval(*v))
                 for v in zip(table["avg_at_k"], table["avg_at_k_low"], table["avg_at_k_high"], strict=True)]
    percent = [c for c in table.columns if re.fullmatch(r"pass_at_\d+", c)] + ["maj_at_k", "truncation_rate"]
    for column in [c for c in percent if c in table]:
        name = column.replace("pass_at_", "pass@").replace("maj_at_k", "maj@k").replace("truncation_rate", "truncated")
        shown[f"{name} (%)"] = [f"{100 * v:.1f}" if pd.notna(v) else "missing" for v in table[column]]
    if "mean_length" in table:
        shown["mean length (tokens)"] = [f"{v:.1f}" if pd.notna(v) else "missing" for v in table["mean_length"]]
    keys = [*CELL, "algorithm"]
    for column in ["avg_at_k", *[c for c in published.columns if c.startswith("pass_at_")]]:
        name = column.replace("avg_at_k", "avg@k").replace("pass_at_", "pass@")
        shown[f"paper {name} (%), published"] = paper_column(paper_matches(table, published, keys, column), column)
    return without_empty_paper_columns(shown)


def without_empty_paper_columns(shown: pd.DataFrame) -> pd.DataFrame:
    """A published-value column no row of this table has a value in says nothing: leave it out."""
    empty = [c for c in shown.columns if c.startswith("paper ") and not any(shown[c])]
    return shown.drop(columns=empty)


def differences_display(table: pd.DataFrame, published: pd.DataFrame, *, confidence: float, alpha: float,
                        power: float, detect: list[float]) -> pd.DataFrame:
    """The comparisons as readers see them: the difference with its interval, the Holm-adjusted p-value, the
    smallest difference this grid detects beside the published difference, and the seeds a grid would need for the
    published and the observed difference and for each `detect` difference (points). Columns no row fills are left
    out."""
    shown = table[[*CELL, "comparison", "seeds", "problems"]].copy()
    shown[f"difference (points) [{round(100 * confidence)}% CI]"] = [
        str(Interval(*v)) for v in zip(table["difference"], table["low"], table["high"], strict=True)]
    shown["p (Holm)"] = [f"{p:.3g}" + (" *" if p <= alpha else "") for p in table["p_holm"]]
    shown[f"detects (points, {round(100 * power)}% power)"] = [f"{100 * d:.1f}" if d <= 1 else "nothing (> 100)"
                                                                for d in table["detectable"]]
    matches = paper_matches(table, published, [*CELL, "comparison"], "difference")
    shown["paper difference (points), published"] = paper_column(matches, "difference")
    paper = [None if m is None else m["difference"] / 100 for m in matches]
    shown["seeds for the published difference"] = [
        _seeds(n, seeds) if p is not None else ""
        for n, seeds, p in zip(seeds_for(table, paper, power=power), table["seeds"], paper, strict=True)]
    shown["seeds for the observed difference"] = [
        _seeds(n, seeds) if d != 0 else ""
        for n, seeds, d in zip(table["seeds_for_observed"], table["seeds"], table["difference"], strict=True)]
    for points in detect:
        shown[f"seeds to detect {points:g} points"] = [
            _seeds(n, seeds) for n, seeds in zip(seeds_for(table, [points / 100] * len(table), power=power),
                                                 table["seeds"], strict=True)]
    empty = [c for c in ("seeds for the published difference",) if not any(shown[c])]
    return without_empty_paper_columns(shown.drop(columns=empty))


def _seeds(needed: float | None, seeds: int) -> str:
    """Seeds needed as shown: a number, "> 100", or unknown when the grid has one seed (no run-to-run variance)."""
    if seeds == 1:
        return "unknown (1 seed)"
    return "> 100" if needed is None or pd.isna(needed) else str(int(needed))


def tests_note(differences: pd.DataFrame, alpha: float, power: float) -> str:
    """How the comparisons were tested, in the report's words."""
    if differences.empty:
        return ""
    m = len(differences)
    one_seed = " Comparisons with one seed hold the run fixed: their run-to-run variance is unknown." \
        if (differences["seeds"] == 1).any() else ""
    return (f"p (Holm): a paired test over problems with seeds as blocks, seeds and problems both random (the mean "
            f"difference over its crossed random-effects standard error, Clark's quasi-F with Satterthwaite's degrees "
            f"of freedom; stats.paired_test), Holm-adjusted over the report's {m} comparisons; * marks p <= {alpha:g}. "
            f"'detects' is the smallest true difference this grid (its seeds, problems and k samples per problem) "
            f"finds with {power:.0%} probability at the Bonferroni level {alpha:g}/{m} (Holm never asks for less), "
            f"from the observed variance of the paired differences, on simulated grids; a published difference "
            f"below it could not have been confirmed here. 'Seeds for ...': the fewest seeds (same problems and k) "
            f"whose grid would detect that difference with the same power; with few seeds they rest on a rough "
            f"estimate of the run-to-run variance.{one_seed}")


def provenance_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Distinct environments (commit, lock and whether it matched, machine, package versions) and how many result
    rows each produced: two rows here are two environments, and a difference between their numbers may be theirs."""
    columns = [c for c in summary.columns if c.startswith("version_") or c in ENVIRONMENT_COLUMNS]
    if not columns:
        return pd.DataFrame()
    return summary.groupby(columns, dropna=False).size().rename("rows").reset_index()


def left_out_table(summary: pd.DataFrame, curves: pd.DataFrame) -> pd.DataFrame | None:
    """What the numbers above do not cover: per training run (`curves`, all its steps) and per evaluation
    (`summary`, final steps), the prompts dropped as longer than the length limit (rollout.overlong_prompts) and the
    samples scored 0 because they hit a reward limit."""
    frames = []
    if "overlong_prompts_dropped" in curves:
        runs = curves.groupby(RUN, dropna=False).agg(
            overlong_prompts_dropped=("overlong_prompts_dropped", "last"),
            **({"limit_hits": ("limit_hits", "sum")} if "limit_hits" in curves else {})).reset_index()
        frames.append(runs.assign(stage="train", benchmark=""))
    if "overlong_prompts_dropped" in summary:
        frames.append(summary[[*RUN, "benchmark", "overlong_prompts_dropped",
                               *(["limit_hits"] if "limit_hits" in summary else [])]].assign(stage="evaluate"))
    if not frames:
        return None
    table = pd.concat(frames, ignore_index=True)
    table["seed"] = table["seed"].astype(object).mask(table["seed"] == NO_SEED, "-")  # the warm start has none
    return table[["stage", *RUN, "benchmark", *[c for c in ("overlong_prompts_dropped", "limit_hits") if c in table]]]


def reproduce_text(reproduce: dict | None) -> tuple[str, str]:
    """(commands, config YAML) for "how to reproduce this". The cell path is the results tree's, under the config's
    results_dir."""
    reproduce = reproduce or {}
    tree = ResultsTree(reproduce.get("config", {}).get("results_dir", "<results_dir>"))
    cell = tree.evaluation("summary", model="<model>", task="<task>", run=run_name("<algorithm>", "<seed>"),
                           benchmark="<benchmark>")
    configfiles = " ".join(reproduce.get("configfiles", [])) or "<the config of this run>"
    commands = "\n".join([
        "# the whole grid, from this config (at the git commit in the provenance table):",
        f"snakemake --cores all --configfile {configfiles}",
        # The target before --configfile, which takes every word after it as a config file.
        "# any one cell (its path is the cell's model/task/algorithm/seed/benchmark):",
        f"snakemake --cores all {cell} --configfile {configfiles}",
        f"# or without Snakemake: {REPORT_FILES['summary']} holds each row's `command` (exact settings and inputs)"])
    config = yaml.safe_dump(reproduce["config"], sort_keys=False) if "config" in reproduce else ""
    return commands, config


# ---------------------------------------------------------------------------------------------------------- report
def build_report(summaries: list[Path], metrics: list[Path], out_dir: Path, *, settings: dict,
                 published: Path | None = None) -> None:
    """Write out_dir's summary, accuracy and comparison tables (Parquet), Markdown and HTML
    (kalmanrl.core.layout.REPORT_FILES) and its figures, one directory per kind (kalmanrl.core.layout.FIGURES), from the
    inputs that exist.

    settings: {"report": {"bootstrap_samples", "confidence", "alpha", "power", "detect", "pooled_benchmarks"},
    optional "reproduce": {"configfiles", "config"}}.
    published: a published-numbers YAML in the package's format, every number with its paper version, table and
    how it was checked (default: the package's own)."""
    cfg = settings["report"]
    samples, confidence, alpha, power = cfg["bootstrap_samples"], cfg["confidence"], cfg["alpha"], cfg["power"]
    out_dir = Path(out_dir)
    summary = with_seed_label(load_frames(summaries))
    if summary.empty:  # nothing finished yet: still one (missing) row per expected cell
        summary = pd.DataFrame(columns=[*RUN, "benchmark", "step", "avg_at_k"])
    details = with_seed_label(load_frames([evaluation_sibling(p, "details") for p in summaries]))
    curves = load_frames(metrics)
    missing = [str(p) for p in [*summaries, *metrics] if not Path(p).exists()]
    expected = pd.DataFrame([i for p in summaries if (i := summary_ident(p))], columns=[*RUN, "benchmark"])
    write_parquet(summary.assign(seed=summary["seed"].replace(NO_SEED, None).astype("Int64"))
                  if len(summary) else summary, report_file(out_dir, "summary"))

    for kind in FIGURES:  # every figure directory exists, also when there is nothing to plot in it yet
        figure_dir(out_dir, kind).mkdir(parents=True, exist_ok=True)
    final, final_details = final_steps(summary), final_steps(details)
    # The tables' benchmarks: the evaluated ones, and with report.pooled_benchmarks all of a run's pooled as one.
    table_summary, table_details, table_expected = (with_pooled_benchmark(final, final_details, expected)
                                                    if cfg["pooled_benchmarks"] else (final, final_details, expected))
    paper_accuracy, paper_differences = published_numbers(published)
    accuracy = accuracy_table(table_summary, table_details, table_expected, samples=samples, confidence=confidence) \
        if len(table_summary) or len(table_expected) else pd.DataFrame()
    differences = family_tests(paired_differences(table_details, samples=samples, confidence=confidence),
                               alpha=alpha, power=power)
    write_parquet(accuracy.assign(confidence=confidence) if len(accuracy) else accuracy,
                  report_file(out_dir, "accuracy"))
    write_parquet(differences.assign(alpha=alpha) if len(differences) else differences,
                  report_file(out_dir, "comparisons"))
    ci = (f"{round(100 * confidence)}% intervals: hierarchical percentile bootstrap over seeds, then over problems "
          f"({samples} resamples); each problem's correctness is first averaged over its samples. Differences are "
          f"paired by seed and problem (against the warm start, by problem). With few seeds the seed part of the "
          f"interval is narrow (3 seeds that differ with a standard deviation of 10 points: a nominal 95% interval "
          f"covers {SEED_EFFECT_COVERAGE:.0%} of the time; seeds that do not differ, {NO_SEED_EFFECT_COVERAGE:.0%}: "
          f"measured in tests/test_stats.py).")
    sources = "; ".join(f"{p}: {s}" for p, s in published_sources(paper_accuracy, paper_differences).items())
    pooled = (f'Benchmark "{POOLED}" pools every benchmark of a run as one, each problem weighed the same '
              "(report.pooled_benchmarks), as the KPO authors' verl logs do; its comparisons are in the Holm family."
              if cfg["pooled_benchmarks"] else "")
    sections = [
        Section("Accuracy per benchmark and algorithm", " ".join(filter(None, [ci, pooled, SECONDARY_NOTE])),
                accuracy_display(accuracy, paper_accuracy, confidence) if len(accuracy) else None),
        Section("Differences to GRPO and to the warm start",
                " ".join(filter(None, [ci, tests_note(differences, alpha, power), SECONDARY_NOTE])),
                differences_display(differences, paper_differences, confidence=confidence, alpha=alpha, power=power,
                                    detect=cfg["detect"]) if len(differences) else None),
        Section(FIGURES["differences"], "Each difference with its interval; a cross marks the published one (red: "
                "checked against the paper, orange: only against a secondary source); a grey bar spans the "
                "differences too small for the grid to detect ('detects' in the table).",
                figures=plot_differences(differences, paper_differences, figure_dir(out_dir, "differences"))),
        Section(FIGURES["accuracy_vs_step"], "avg@k of every evaluated checkpoint; step 0 is the warm start.",
                figures=plot_accuracy_vs_step(summary, figure_dir(out_dir, "accuracy_vs_step"))),
        Section(FIGURES["curves"], "Per RL step, mean and ±1 std over seeds.",
                figures=plot_curves(curves, figure_dir(out_dir, "curves")) if len(curves) else []),
        Section(FIGURES["token_noise"], TOKEN_NOISE_NOTE,
                figures=plot_token_noise(curves, figure_dir(out_dir, "token_noise")) if len(curves) else []),
        Section("Published numbers (not reproduced here)",
                f"Published by the papers, NOT reproduced by this pipeline; shown beside ours only where model, "
                f"task, benchmark and algorithm match. {SECONDARY_NOTE} Sources, each with the paper version and table "
                f"its numbers were taken from and how they were checked: {sources}.",
                published_display(paper_accuracy, paper_differences)),
        Section("Left out", "Prompts longer than the length limit are dropped before sampling (the counts are "
                "problems of the task's train split, or of the benchmark) and samples that hit a reward limit score "
                "0 unjudged (limit_hits); a benchmark's numbers cover only the problems it kept.",
                left_out_table(final, curves)),
        Section("Provenance", f"Every row of {REPORT_FILES['summary']} also carries its settings hash, input file "
                "hashes and the exact command that reruns it.", provenance_table(summary) if len(summary) else None)]
    page = Page(sections, missing, *reproduce_text(settings.get("reproduce")))
    for name, render in (("markdown", page.markdown), ("html", page.html)):
        with atomic_path(report_file(out_dir, name)) as tmp:
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
