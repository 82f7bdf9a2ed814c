"""The results tree: every path the workflow writes under the config's `results_dir`, and the names inside a run, a
checkpoint and the report, in one place. The rules, common.smk, the trainer, the report and the results reader all take
their paths from here, so changing a template here changes it everywhere. Kept free of heavy imports: every Snakemake
start (and every cluster job) reads it.

The templates are `str.format` patterns whose fields are the workflow's wildcards. `ResultsTree` fills them under a
root: a field given a value becomes that value, a field left out stays a Snakemake wildcard (`{model}`), so
`tree.run_dir()` is the train rule's pattern and `tree.run_dir(model="tiny", ...)` one run's directory.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# The warm start: its model directory's name and the run name (and algorithm) its evaluations carry.
WARM_START = "sft"

# One training run and one evaluation, named the same under runs/ or eval/, logs/ and benchmarks/.
RUN = "{model}/{task}/{algorithm}/seed{seed}"
EVALUATION = "{model}/{task}/{run}/{benchmark}"
# What an evaluation's {run} is: the warm start, a trained policy, or one of its kept checkpoints (train.keep_every).
TRAINED_RUN = "{algorithm}/seed{seed}"
KEPT_STEP = TRAINED_RUN + "/step{step}"

# Files and directories under results_dir.
DATASET = "data/{dataset}.parquet"  # one dataset, all its splits
TRAIN_SPLIT = "data/{task}.train.parquet"  # a task's train split without the benchmarks' problems
BASE_MODEL = "models/{model}/base"
WARM_START_MODEL = "models/{model}/{task}/" + WARM_START
RUN_DIR = "runs/" + RUN
EVAL_FILE = "eval/" + EVALUATION + ".{kind}.parquet"
EVAL_KINDS = ("details", "summary")  # per-sample rows; the one summary row
REPORT_DIR = "report"
LOG = "logs/{job}.log"
BENCHMARK = "benchmarks/{job}.tsv"  # Snakemake's per-job time and memory

# Each stage's job name under logs/ and benchmarks/.
JOBS = {"data": "data/{dataset}", "decontaminate": "data/{task}.train", "model": "model/{model}",
        "sft": "sft/{model}/{task}", "train": "train/" + RUN, "evaluate": "evaluate/" + EVALUATION, "report": "report"}

# Inside a run directory (the trainer's out_dir).
FINAL = "final"  # the trained policy, save_pretrained
TRAINING_PROVENANCE = "provenance.json"  # inside final/: the environment of every start and resume of the run
METRICS = "metrics.parquet"  # one row per RL step
CHECKPOINTS = "checkpoints"  # not a workflow output, so Snakemake keeps it when a job fails
RUN_LOCK = "writer.lock"  # names the training job writing into the run directory (kalmanrl.runtime.runlock)
TRACKERS = "trackers"  # the experiment trackers' local files and run ids (train.loggers, kalmanrl.runtime.trackers)
TORCHRUN_LOGS = "torchrun"  # a job of several ranks: torchrun's error file of each rank that failed

# Inside the report directory.
# The report's pages, its summary (one row per evaluation) and its two tables as data (kalmanrl.reporting.comparisons):
# the accuracy table (every metric with its interval, and their confidence) and the comparisons (difference, interval,
# Holm p, alpha).
REPORT_FILES = {"html": "report.html", "markdown": "report.md", "summary": "summary.parquet",
                "accuracy": "accuracy.parquet", "comparisons": "comparisons.parquet"}
FIGURE_DIR = "figures/{kind}"
FIGURE_FILE = "{model}__{task}.png"  # one figure of a kind per (model, task)
# Report figure kinds: FIGURE_DIR/FIGURE_FILE, one directory each (Snakemake outputs, with a caption in
# workflow/report/<kind>.rst), and their titles.
FIGURES = {"differences": "Paired differences", "accuracy_vs_step": "Accuracy vs checkpoint step",
           "curves": "Training curves", "token_noise": "Token log-ratio noise"}

# What each wildcard matches (Snakemake's wildcard_constraints; also how paths are read back into their wildcards).
_PART_CONSTRAINTS = {"model": "[^/]+", "task": "[^/]+", "benchmark": "[^/.]+", "dataset": "[^/.]+",
                     "algorithm": "[^/]+", "seed": r"\d+", "step": r"\d+"}


def _regex(template: str, constraints: dict[str, str], *, named: bool = False) -> str:
    """A regular expression matching `template` filled with anything its fields' constraints allow (other fields:
    one path component); `named` captures each field under its name."""
    pattern = ""
    for literal, name, _, _ in string.Formatter().parse(template):
        pattern += re.escape(literal)
        if name:
            constraint = constraints.get(name, "[^/]+")
            pattern += f"(?P<{name}>{constraint})" if named else f"(?:{constraint})"
    return pattern


WILDCARD_CONSTRAINTS = {**_PART_CONSTRAINTS, "run": "|".join(
    [re.escape(WARM_START), _regex(KEPT_STEP, _PART_CONSTRAINTS), _regex(TRAINED_RUN, _PART_CONSTRAINTS)])}


def fields(template: str) -> list[str]:
    """A template's fields, in order."""
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def fill(template: str, **values: object) -> str:
    """`template` with the given fields filled in and every other field left as a Snakemake wildcard; a value for a
    field the template lacks is an error (a misspelt wildcard would otherwise vanish)."""
    names = fields(template)
    unknown = set(values) - set(names)
    if unknown:
        raise KeyError(f"{template!r} has no field {sorted(unknown)} (its fields: {names})")
    return template.format(**{name: values.get(name, f"{{{name}}}") for name in names})


def parse(template: str, path: str | Path) -> dict[str, str] | None:
    """The wildcards of a path whose end matches `template` (anything may come before it), as text; None when it does
    not match."""
    match = re.search(f"(?:^|/){_regex(template, WILDCARD_CONSTRAINTS, named=True)}$", Path(path).as_posix())
    return match.groupdict() if match else None


def run_name(algorithm: str, seed: object = None, step: object = None) -> str:
    """An evaluation's {run}: "sft" for the warm start (algorithm WARM_START), "<algorithm>/seed<n>" for a trained
    policy, and "<algorithm>/seed<n>/step<k>" for its kept checkpoint of step k."""
    if algorithm == WARM_START:
        return WARM_START
    return fill(KEPT_STEP if step is not None else TRAINED_RUN, algorithm=algorithm, seed=seed,
                **({"step": step} if step is not None else {}))


def parse_run_name(run: str) -> dict[str, str]:
    """{"algorithm"} of the warm start's run, {"algorithm", "seed"} of a trained policy's and {"algorithm", "seed",
    "step"} of a kept checkpoint's, as text (run_name's inverse)."""
    if run == WARM_START:
        return {"algorithm": WARM_START}
    for template in (KEPT_STEP, TRAINED_RUN):
        if (ident := parse(template, run)) is not None and fill(template, **ident) == run:
            return ident
    raise ValueError(f"{run!r} is not a run of the results tree ({WARM_START!r}, {TRAINED_RUN!r} or {KEPT_STEP!r})")


def kept_steps(train: dict) -> range:
    """The intermediate steps whose checkpoints are kept and evaluated (`train.keep_every`; the final step is the run
    itself)."""
    every = train["keep_every"]
    return range(every, train["steps"], every) if every else range(0)


def config_jobs(config: dict) -> Iterator[tuple[str, dict[str, str]]]:
    """("train", wildcards) and ("evaluate", wildcards) of every training and evaluation job of a validated config,
    the wildcards as text, as the rules match them: per model and task, each algorithm x seed trained ({model, task,
    algorithm, seed}), then the warm start, each trained policy and each of its kept checkpoints evaluated on every
    benchmark ({model, task, run, benchmark}). The one list of jobs: the workflow's targets (common.smk) and the
    memory plan (`kalmanrl plan`) both read it, so the plan covers exactly the jobs Snakemake runs."""
    trained = [(algorithm, str(seed)) for algorithm in config["algorithms"] for seed in config["seeds"]]
    runs = [run_name(WARM_START)] + [run_name(algorithm, seed, step) for algorithm, seed in trained
                                     for step in [None, *kept_steps(config["train"])]]
    for model in config["models"]:
        for task in config["tasks"]:
            for algorithm, seed in trained:
                yield "train", {"model": model, "task": task, "algorithm": algorithm, "seed": seed}
            for run in runs:
                for benchmark in config["benchmarks"]:
                    yield "evaluate", {"model": model, "task": task, "run": run, "benchmark": benchmark}


@dataclass(frozen=True)
class ResultsTree:
    """The results tree under `root` (the config's results_dir). Each method fills its template (see `fill`): the
    fields given become values, those left out stay Snakemake wildcards. Paths are plain strings joined with "/",
    exactly as the rules have always spelt them (Snakemake matches outputs as text)."""

    root: str

    def path(self, template: str, **values: object) -> str:
        return f"{self.root}/{fill(template, **values)}"

    def dataset(self, **values: object) -> str:
        return self.path(DATASET, **values)

    def train_split(self, **values: object) -> str:
        return self.path(TRAIN_SPLIT, **values)

    def base_model(self, **values: object) -> str:
        return self.path(BASE_MODEL, **values)

    def warm_start_model(self, **values: object) -> str:
        return self.path(WARM_START_MODEL, **values)

    def run_dir(self, **values: object) -> str:
        return self.path(RUN_DIR, **values)

    def final_model(self, **values: object) -> str:
        return f"{self.run_dir(**values)}/{FINAL}"

    def metrics(self, **values: object) -> str:
        return f"{self.run_dir(**values)}/{METRICS}"

    def kept_model(self, step: int, **values: object) -> str:
        """The model/ of a run's kept checkpoint of `step` (not an output of its own: the run's metrics are)."""
        return str(checkpoint_model_dir(checkpoint_dir(checkpoints_root(self.run_dir(**values)), step)))

    def evaluation(self, kind: str, **values: object) -> str:
        """An evaluation's `kind` file (EVAL_KINDS)."""
        if kind not in EVAL_KINDS:
            raise ValueError(f"unknown evaluation file kind {kind!r} (known: {', '.join(EVAL_KINDS)})")
        return self.path(EVAL_FILE, kind=kind, **values)

    def report_dir(self) -> str:
        return self.path(REPORT_DIR)

    def report_file(self, name: str) -> str:
        """One of REPORT_FILES ("html", "markdown", "summary", "accuracy", "comparisons")."""
        return f"{self.report_dir()}/{REPORT_FILES[name]}"

    def figure_dir(self, kind: str) -> str:
        return f"{self.report_dir()}/{fill(FIGURE_DIR, kind=kind)}"

    def log(self, stage: str, **values: object) -> str:
        return self.path(LOG, job=fill(JOBS[stage], **values))

    def benchmark(self, stage: str, **values: object) -> str:
        return self.path(BENCHMARK, job=fill(JOBS[stage], **values))


def parse_evaluation(path: str | Path) -> dict[str, str] | None:
    """{"model", "task", "run", "benchmark", "kind"} of an evaluation file of the tree (any root), as text; None for
    any other path."""
    return parse(EVAL_FILE, path)


def evaluation_sibling(path: str | Path, kind: str) -> Path:
    """The `kind` file of the evaluation that wrote `path` (its details beside its summary)."""
    ident = parse_evaluation(path)
    if ident is None:
        raise ValueError(f"{path} is not an evaluation file of the results tree ({EVAL_FILE})")
    name = Path(fill(EVAL_FILE, **{**ident, "kind": kind})).name
    return Path(path).with_name(name)


def final_model_dir(run_dir: str | Path) -> Path:
    """A training run's final policy (save_pretrained)."""
    return Path(run_dir) / FINAL


def run_lock_file(run_dir: str | Path) -> Path:
    """The run directory's writer lock (`kalmanrl.runtime.runlock`)."""
    return Path(run_dir) / RUN_LOCK


def trackers_dir(run_dir: str | Path) -> Path:
    """Where a training run's experiment trackers keep their local files and the ids of their runs."""
    return Path(run_dir) / TRACKERS


def metrics_file(run_dir: str | Path) -> Path:
    """A training run's metrics, one row per RL step."""
    return Path(run_dir) / METRICS


def report_file(report_dir: str | Path, name: str) -> Path:
    """One of REPORT_FILES in a report directory."""
    return Path(report_dir) / REPORT_FILES[name]


def figure_dir(report_dir: str | Path, kind: str) -> Path:
    """The directory of one FIGURES kind in a report directory."""
    return Path(report_dir) / fill(FIGURE_DIR, kind=kind)


def checkpoints_root(run_dir: str | Path) -> Path:
    """A training run's checkpoints (not a workflow output, so Snakemake keeps them when a job fails)."""
    return Path(run_dir) / CHECKPOINTS


def checkpoint_dir(root: Path, step: int) -> Path:
    """The checkpoint of one training step under a run's checkpoints/ directory: `model/` and, while it is the newest,
    `state/` (see `checkpoint_model_dir`, `checkpoint_state_dir`)."""
    return root / f"step_{step:06d}"


def checkpoint_model_dir(checkpoint: Path) -> Path:
    """The policy of a checkpoint as save_pretrained writes it, and nothing else: vLLM loads every *.safetensors of a
    model directory, so optimizer or RNG tensors beside the weights would reach its weight loader."""
    return checkpoint / "model"


def checkpoint_state_dir(checkpoint: Path) -> Path:
    """What only a resume needs (optimizer, RNG, scheduler, metrics so far, full-precision weights when the model
    directory holds a lower precision); removed from kept checkpoints once a newer one exists."""
    return checkpoint / "state"
