"""`kalmanrl <stage>`: every workflow stage as a command that runs without Snakemake, so a stage can be run or
debugged by hand and containers can call it. Settings arrive as one JSON/YAML value (`--settings`), validated against
the config schema; `snakemake -n -p` prints the exact command of every job."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

from kalmanrl import __version__
from kalmanrl.configuration.config import (
    STAGE_SETTINGS_PARTS,
    ConfigError,
    check_data_dir,
    load_config,
    load_configs,
    load_schema,
    parse_settings,
    resolve_ref,
    stage_settings,
)
from kalmanrl.core.layout import CHECKPOINTS, FINAL, JOBS, METRICS, REPORT_FILES, TORCHRUN_LOGS, WARM_START, fields
from kalmanrl.runtime.cpu import DISPATCH_ENV, DispatchError, keep_freed_memory, pin_cpu_dispatch
from kalmanrl.runtime.devices import DeviceError, gpu_placement
from kalmanrl.runtime.runlock import RunDirectoryBusy, run_writer

log = logging.getLogger("kalmanrl")

DEFAULT_CONFIG = Path("config/config.yaml")  # what Snakemake reads without --configfile (the Snakefile's configfile)


def schema_reference(def_name: str, definition: dict | None = None) -> str:
    """Plain-text reference of one schema definition (or of `definition`, e.g. the top level): key, default,
    description."""
    definition = load_schema()["$defs"][def_name] if definition is None else definition
    lines = [f"{def_name}:"]
    if "properties" not in definition:  # a plain value (plugins)
        text = " ".join(str(definition.get("description", "")).split())
        return "\n".join([f"{def_name} (default {json.dumps(definition.get('default'))})",
                          *textwrap.wrap(text, 100, initial_indent="      ", subsequent_indent="      ")])
    for key, sub in definition.get("properties", {}).items():
        sub = resolve_ref(sub)
        # Without a default a key is required only where the schema says so; others may be left out (models' lora).
        default = (json.dumps(sub["default"]) if "default" in sub
                   else "required" if key in definition.get("required", ()) else "unset")
        text = " ".join(str(sub.get("description", "")).split())
        lines.append(f"  {key} (default {default})")
        if text:
            lines.extend(textwrap.wrap(text, 100, initial_indent="      ", subsequent_indent="      "))
    return "\n".join(lines)


def _settings_help(stage: str) -> str:
    schemas = dict.fromkeys(part.schema for part in STAGE_SETTINGS_PARTS[stage].values() if part.schema)
    parts = "\n\n".join(schema_reference(name) for name in schemas)
    return (f"Settings (--settings, JSON or @file; print them for a config with `kalmanrl settings {stage} ...`):\n\n"
            f"{parts}")


def cmd_data(args: argparse.Namespace) -> None:
    from kalmanrl.data.dataset import write_dataset
    from kalmanrl.data.loaders import build_dataset
    from kalmanrl.data.sources import resolve_local_dir

    s = args.settings
    local_dir = resolve_local_dir(s["data"]["local_dir"])
    log.info("dataset %s: rows from %s", s["name"], local_dir or "the Hugging Face hub (or the datasets cache)")
    table, stats = build_dataset(s["dataset"], local_dir=local_dir, seed=s["data"]["seed"],
                                 arithmetic_presets=s["data"]["arithmetic_presets"])
    write_dataset(table, args.out)
    log.info("dataset %s: %s -> %s", s["name"], json.dumps(stats), args.out)


def cmd_decontaminate(args: argparse.Namespace) -> None:
    from kalmanrl.data.dataset import read_dataset, write_dataset
    from kalmanrl.data.loaders import decontaminate

    benchmarks = [read_dataset(path, split="test") for path in args.exclude]
    table, dropped = decontaminate(read_dataset(args.dataset, split="train"), benchmarks)
    write_dataset(table, args.out)
    log.info("%s: kept %d training problems, dropped %d that appear in %s", args.dataset, table.num_rows, dropped,
             ", ".join(map(str, args.exclude)) or "no benchmark")


def cmd_model(args: argparse.Namespace) -> None:
    from kalmanrl.data.dataset import read_dataset
    from kalmanrl.policy.model import build_tiny_model, fetch_pretrained, tokenizer_corpus

    model = args.settings["model"]
    if model["source"] == "tiny":
        if "templates" not in args.settings:
            raise ConfigError("--settings: a tiny model's settings need 'templates' (the prompt templates its "
                              "tokenizer is trained on)")
        texts = [text for path in args.texts
                 for text in tokenizer_corpus(read_dataset(path), args.settings["templates"])]
        build_tiny_model(args.out, texts, spec=model["tiny"], seed=0)
    else:
        source = model["id"] if model["source"] == "hub" else model["path"]
        fetch_pretrained(source, args.out, revision=model["revision"], dtype=model["dtype"])


def cmd_sft(args: argparse.Namespace) -> None:
    from kalmanrl.configuration.settings import Sft
    from kalmanrl.data.prompts import get_template
    from kalmanrl.jobs.sft import run_sft

    s = args.settings
    _threads(args.threads)
    template = get_template(s["template"], s["chat_template_kwargs"], add_special_tokens=s["add_special_tokens"])
    metrics = run_sft(args.model, args.dataset, args.out, template=template, settings=Sft(**s["sft"]), seed=s["seed"],
                      dtype=s["dtype"], gpus=args.gpus)
    log.info("sft done: %s", json.dumps(metrics))


def cmd_train(args: argparse.Namespace) -> None:
    """One process, or, for more than one rank, the same command (without the rank options) as that many ranks under
    torchrun, on the devices this process claimed: --gpus x --nodes GPU ranks (one torchrun per node, started by
    srun on several nodes), or with no GPUs (--gpus 0 or unset) --cpu-ranks x --nodes CPU ranks (gloo), which inside a
    SLURM job are one task each, one torchrun per task started by srun (the multi-node launch path).

    The job holds the run directory's writer lock for its whole life (`kalmanrl.runtime.runlock`; the torchrun or srun
    it starts inherits it), and what it starts ends with it, however it ends (`kalmanrl.runtime.lifetime`)."""
    cpu = not args.gpus
    if not cpu and args.cpu_ranks != 1:
        raise ConfigError(f"--cpu-ranks {args.cpu_ranks} with --gpus {args.gpus}: CPU ranks are for jobs without GPUs")
    per_node = args.cpu_ranks if cpu else args.gpus
    if "LOCAL_RANK" in os.environ:  # a rank: the `kalmanrl train` that started it holds the run directory
        from torch.distributed.elastic.multiprocessing.errors import record

        # An exception leaves its traceback in the rank's error file, which torchrun prints as the job's root cause
        # (the first rank to fail), above the other ranks' interleaved output.
        record(_train_here)(args)
        return
    with run_writer(args.out) as lock:
        if per_node * args.nodes > 1:
            _launch_ranks(args, cpu, per_node, lock.fileno())
        else:
            _train_here(args)


def _launch_ranks(args: argparse.Namespace, cpu: bool, per_node: int, lock_fd: int) -> None:
    """Run this training job as per_node x --nodes ranks (see `cmd_train`). torchrun (or srun) gets SIGTERM when
    this process ends, so that it stops its ranks (which also end with it), and holds the writer lock `lock_fd`
    until it ends. The error files of ranks that failed stay in the run directory."""
    from kalmanrl.runtime.devices import resolve_device
    from kalmanrl.runtime.distributed import (
        launch_command,
        missing_slurm_client,
        remove_empty_folders,
        slurm_first_node,
    )
    from kalmanrl.runtime.lifetime import ending_with_this_process

    if not cpu:
        resolve_device(args.gpus)  # never a silent CPU run: each rank needs its CUDA device

    # The node's ranks share the job's threads: each taking all of them would oversubscribe its cores per_node times.
    rank_threads = max(1, args.threads // per_node)
    rank_command = ["kalmanrl", "train", "--settings", json.dumps(args.settings), "--model", str(args.model),
                    "--dataset", str(args.dataset), "--out", str(args.out), "--threads", str(rank_threads),
                    "--validation-data", *map(str, args.validation_data)]
    tasks_per_node = per_node if cpu and "SLURM_JOB_ID" in os.environ else 1
    several = args.nodes * tasks_per_node > 1
    if several and (missing := missing_slurm_client()):
        raise ConfigError(missing)
    logs = args.out / TORCHRUN_LOGS
    command = launch_command(rank_command, gpus=per_node // tasks_per_node, log_dir=str(logs),
                             nodes=args.nodes, tasks_per_node=tasks_per_node,
                             first_node=slurm_first_node() if several else None,
                             job_id=os.environ.get("SLURM_JOB_ID") if several else None)
    log.info("%d ranks, %d threads each: %s", per_node * args.nodes, rank_threads, shlex.join(command))
    # CPU ranks see no GPU (else each would take cuda:LOCAL_RANK and NCCL).
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""} if cpu else None
    code = subprocess.run(command, env=env, pass_fds=(lock_fd,), preexec_fn=ending_with_this_process()).returncode
    remove_empty_folders(logs)  # torchrun makes one per attempt and rank; only a failed rank's holds a file
    if code:
        raise SystemExit(code)


def _train_here(args: argparse.Namespace) -> None:
    """Train in this process: the only one, or one rank of several."""
    from kalmanrl.jobs.plan import check_fits
    from kalmanrl.jobs.trainer import train

    check_fits("train", args.settings, args.model)
    _threads(args.threads)
    train(args.model, args.dataset, args.out, settings=args.settings, threads=args.threads, gpus=args.gpus,
          validation_data=args.validation_data)


def cmd_evaluate(args: argparse.Namespace) -> None:
    from kalmanrl.jobs.evaluate import evaluate
    from kalmanrl.jobs.plan import check_fits

    check_fits("evaluate", args.settings, args.model)
    _threads(args.threads)
    evaluate(args.model, args.dataset, settings=args.settings, out_details=args.details, out_summary=args.summary,
             gpus=args.gpus)


def cmd_report(args: argparse.Namespace) -> None:
    from kalmanrl.reporting.report import build_report

    build_report(args.summaries, args.metrics, args.out, settings=args.settings)


def job_wildcards(config: dict, stage: str, select: list[str]) -> dict[str, str]:
    """The KEY=VALUE selectors of one job of `stage` (its job name's wildcards, an evaluation's run as algorithm and,
    for a trained policy, seed and step), checked against the config: a malformed, unknown or missing selector, or a
    value naming no job the workflow runs (a dataset that is not one of its tasks or benchmarks, a seed not in its
    seeds), is a ConfigError naming it."""
    parts = fields(JOBS[stage])
    required = [name for name in parts if name != "run"] + (["algorithm"] if "run" in parts else [])
    known = (*required, *(("seed", "step") if "run" in parts else ()))
    wildcards: dict[str, str] = {}
    for item in select:
        key, sep, value = item.partition("=")
        if not sep or key not in known:
            raise ConfigError(f"{item!r}: {stage} jobs are selected by "
                              f"{', '.join(f'{k}=...' for k in known) or 'nothing'}")
        wildcards[key] = value
    sections = {"model": "models", "task": "tasks", "dataset": "datasets", "benchmark": "benchmarks",
                "algorithm": "algorithms", "seed": "seeds"}
    names = {key: [*map(str, config[section]), *([WARM_START] if key == "algorithm" and stage == "evaluate" else [])]
             for key, section in sections.items()}
    needed = [*required, *(("seed",) if stage == "evaluate" and wildcards.get("algorithm") != WARM_START else ())]
    if missing := [key for key in needed if key not in wildcards]:
        raise ConfigError(f"the {stage} job needs {', '.join(f'{k}=...' for k in missing)}")
    for key, value in wildcards.items():
        if key in ("seed", "step") and not value.isdigit():
            raise ConfigError(f"{key}={value}: not a number")
        if key in names and value not in names[key]:
            raise ConfigError(f"{key}={value}: not in the config's {sections[key]} "
                              f"(known: {', '.join(sorted(names[key]))})")
    return wildcards


def cmd_settings(args: argparse.Namespace) -> None:
    config = load_configs(args.configfile or [DEFAULT_CONFIG], [])
    wildcards = job_wildcards(config, args.stage, args.select)
    settings = stage_settings(config, args.stage, **wildcards)
    if args.resolved:
        from kalmanrl.configuration.settings import Sft, as_dict, resolve_train

        if args.stage == "sft":
            sft = settings["sft"]
            settings = {**settings, "sft": {**sft, "precision": Sft(**sft).resolved_precision(args.resolved).name}}
        elif args.stage == "train":
            settings = as_dict(resolve_train(settings, args.resolved))
        else:
            raise ConfigError(f"--resolved resolves a training or warm-start job's settings, not a {args.stage} "
                              "job's")
    print(json.dumps(settings, indent=2, default=str))


def cmd_plan(args: argparse.Namespace) -> None:
    from kalmanrl.jobs.plan import run_plan

    if malformed := [item for item in args.model_config if "=" not in item]:
        raise ConfigError(f"--model-config {' '.join(malformed)}: expected NAME=DIR")
    config_dirs = dict(item.split("=", 1) for item in args.model_config)
    run_plan(args.configfile, args.config, config_dirs)


def cmd_config(args: argparse.Namespace) -> None:
    if args.config is None:
        schema = load_schema()
        print(schema["description"].strip(), end="\n\n")
        # The top-level keys (results_dir, seeds, models, ...), then each section's; a section given by $ref is
        # listed there by its definition.
        top = {key: sub for key, sub in schema["properties"].items() if "$ref" not in sub}
        print("\n\n".join([schema_reference("config", {"properties": top}),
                            *(schema_reference(name) for name in schema["$defs"])]))
        return
    config = load_config(args.config)
    check_data_dir(config)
    print(json.dumps(config, indent=2))


def cmd_compare_summary(args: argparse.Namespace) -> int:
    from kalmanrl.reporting.expected import (
        DIFFERENT,
        IDENTICAL,
        ExpectedError,
        RunResults,
        compare,
        machine_class,
        write_expected,
    )

    try:
        run = RunResults.load(args.summary)
        if args.write or args.add:
            records = write_expected(run, args.expected, add=args.add)
            log.info("%s: %s recorded (%d stage fingerprints, %d summary rows); %d record(s) in all", args.expected,
                     machine_class(run.summary), len(run.stages), len(run.summary), len(records))
            return 0
        verdict, outcomes = compare(run, args.expected)
    except ExpectedError as err:
        print(f"kalmanrl: {err}", file=sys.stderr)
        return 2
    print(f"{args.summary} ({machine_class(run.summary)}): {verdict}")
    for outcome in outcomes:
        print(f"- {outcome.verdict} against the record of {outcome.record}")
        shown = outcome.lines if args.all or outcome.verdict != DIFFERENT else outcome.lines[:20]
        print("".join(f"    {line}\n" for line in shown), end="")
        if len(shown) < len(outcome.lines):
            print(f"    ... {len(outcome.lines) - len(shown)} more (--all lists them)")
    if verdict != IDENTICAL:
        print("(a deliberate change of results is recorded with --write; a new machine class's numbers, when the "
              "code is unchanged, with --add)")
    return 1 if verdict == DIFFERENT else 0


def _at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least `low` (argparse names the option and exits 2 otherwise)."""
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise ValueError(text)
        return value

    parse.__name__ = f"integer >= {low}"  # argparse's message: "invalid integer >= 1 value: '0'"
    return parse


def _existing(kind: str) -> Callable[[str], Path]:
    """An argparse type: the path of an existing `kind` ("file" or "directory"), so that a mistyped input stops the
    command before it loads anything, with argparse's message naming the option (exit 2)."""
    def parse(text: str) -> Path:
        path = Path(text)
        if path.is_file() if kind == "file" else path.is_dir():
            return path
        found = f" (a {'directory' if path.is_dir() else 'file'})" if path.exists() else ""
        raise argparse.ArgumentTypeError(f"no {kind} {text}{found}")

    return parse


def _threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _stage(sub, name: str, help_text: str, func: Callable, paths: list[tuple[str, dict]]) -> None:
    parser = sub.add_parser(name, help=help_text, description=help_text, epilog=_settings_help(name),
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", required=True,
                        help="stage settings as JSON/YAML text or @path (see below)")
    for flag, kwargs in paths:
        parser.add_argument(flag, **kwargs)
    parser.set_defaults(func=func)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kalmanrl", description="GRPO, KRPO and KPO for language-model reasoning: each workflow stage by hand.",
        epilog=f"Every stage command first pins the CPU instruction set torch, oneDNN and MKL dispatch to, so that "
               f"CPU runs give the same numbers on any x86-64 machine: ${DISPATCH_ENV}=avx2 (default; any CPU with "
               f"AVX2), baseline (any x86-64, slower) or native (unpinned). It also keeps the memory a "
               f"step frees for the next step (glibc's malloc thresholds, unless MALLOC_*_ or GLIBC_TUNABLES set them: "
               f"same results, faster on the CPU). Both: kalmanrl.runtime.cpu.")
    parser.add_argument("--version", action="version", version=f"kalmanrl {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="<stage>")

    def path(h: str, **kw) -> dict:
        return {"type": Path, "required": True, "help": h, **kw}

    def existing(kind: str, h: str) -> dict:
        return path(h, type=_existing(kind))

    threads = ("--threads", {"type": _at_least(1), "default": 1, "help": "CPU threads for torch (default 1)"})
    gpus = ("--gpus", {"type": _at_least(0), "default": None,
                       "help": "GPUs this job was granted: claims that many free devices and sets CUDA_VISIBLE_DEVICES "
                               "(0 hides every GPU; default: leave CUDA_VISIBLE_DEVICES as it is)"})
    _stage(sub, "data", "Build one dataset as Parquet (hub or local files; synthetic arithmetic).", cmd_data, [
        ("--out", path("output Parquet file"))])
    decon = sub.add_parser("decontaminate", help="A dataset's train split without the problems of benchmarks.",
                           description="Write the train split of --dataset, dropping every problem whose normalised "
                                       "text appears in the test split of an --exclude dataset; logs the count.")
    decon.add_argument("--dataset", **existing("file", "dataset Parquet (all splits)"))
    decon.add_argument("--exclude", type=_existing("file"), nargs="*", default=[], help="benchmark Parquet files")
    decon.add_argument("--out", **path("output Parquet (train split)"))
    decon.set_defaults(func=cmd_decontaminate)
    _stage(sub, "model", "Build the tiny model (tokenizer + random Qwen2) or copy a hub/local model.", cmd_model, [
        ("--out", path("output save_pretrained directory")),
        ("--texts", {"type": _existing("file"), "nargs": "*", "default": [],
                     "help": "dataset Parquet files to train the tokenizer on"})])
    _stage(sub, "sft", "Supervised warm start on a dataset's train split.", cmd_sft, [
        ("--model", existing("directory", "base model directory")), ("--dataset", existing("file", "dataset Parquet")),
        ("--out", path("output directory")), threads, gpus])
    _stage(sub, "train", "RL training (GRPO / KRPO / KPO / GSPO); resumes from out/checkpoints.", cmd_train, [
        ("--model", existing("directory", "start policy directory (the warm start)")),
        ("--dataset", existing("file", "dataset Parquet")),
        ("--out", path(f"run directory ({FINAL}/, {CHECKPOINTS}/, {METRICS})")), threads, gpus,
        ("--nodes", {"type": _at_least(1), "default": 1,
                     "help": "nodes of this job (inside a SLURM allocation); --gpus x --nodes above 1 runs that many "
                             "ranks under torchrun with the policy sharded (FSDP2); default 1"}),
        ("--cpu-ranks", {"type": _at_least(1), "default": 1,
                         "help": "without GPUs (--gpus 0 or unset): CPU ranks (gloo) per node, sharded as GPU ranks "
                                 "are; inside a SLURM job one task each, started by srun (default 1)"}),
        ("--validation-data", {"type": _existing("file"), "nargs": "*", "default": [],
                               "help": "with train.validation: the dataset Parquet of each benchmark it validates on, "
                                       "in the order of the settings' validation datasets"})])
    _stage(sub, "evaluate", "Evaluate a model on a benchmark: avg@k, pass@k, maj@k, per-sample details.",
           cmd_evaluate, [
        ("--model", existing("directory", "model directory")), ("--dataset", existing("file", "benchmark Parquet")),
        ("--details", path("per-sample Parquet")), ("--summary", path("summary Parquet")), threads, gpus])
    _stage(sub, "report", "Aggregate summaries and training metrics into Parquet, HTML and Markdown.", cmd_report, [
        ("--summaries", {"type": _existing("file"), "nargs": "*", "default": [],
                         "help": "evaluation summary Parquet files"}),
        ("--metrics", {"type": _existing("file"), "nargs": "*", "default": [],
                       "help": "training metrics Parquet files"}),
        ("--out", path("report directory"))])

    settings = sub.add_parser("settings", help="Print the settings one job of a config gets.",
                              description="Print the --settings value the workflow passes to one stage job.")
    settings.add_argument("stage", choices=list(STAGE_SETTINGS_PARTS))
    settings.add_argument("--configfile", type=Path, action="append",
                          help="a config file; repeat it to merge several in order, as Snakemake's --configfile "
                               "does (default config/config.yaml)")
    settings.add_argument("select", nargs="*", metavar="KEY=VALUE",
                          help="wildcards of the job, e.g. model=tiny task=arithmetic_laptop algorithm=krpo seed=0")
    settings.add_argument("--resolved", choices=["cpu", "cuda"],
                          help="train: print the settings as the job resolves them on this device (precision, "
                               "gradient checkpointing, rollout backend as installed here); sft: its precision")
    settings.set_defaults(func=cmd_settings)
    plan = sub.add_parser(
        "plan", help="Estimated peak memory per GPU of every training and evaluation job of a config.",
        description="Print, for every training and evaluation job of a config, the estimated peak memory per GPU "
                    "broken down (weights, gradients, optimiser state, activations, logits, vLLM), next to the GPUs, "
                    "nodes and gpu_mem_gb the job asks for; exit 2 naming the setting to change when a job cannot "
                    "fit. Models' shapes come from their configs alone (no weights are loaded).")
    plan.add_argument("--configfile", nargs="+", default=[DEFAULT_CONFIG],
                      help="config files, merged in order as Snakemake does (default config/config.yaml)")
    plan.add_argument("--config", nargs="*", default=[], metavar="KEY=VALUE",
                      help="overrides, e.g. train.micro_batch_tokens=8192 resources.train.gpus=4")
    plan.add_argument("--model-config", nargs="*", default=[], metavar="NAME=DIR",
                      help="read model NAME's shape from DIR/config.json (plan hub models offline)")
    plan.set_defaults(func=cmd_plan)
    config = sub.add_parser("config", help="Validate a config file, or print the reference of every key.",
                            description="With a file: validate it and print it with defaults filled in. Without: "
                                        "print every config key with its default and description.")
    config.add_argument("config", type=Path, nargs="?")
    config.set_defaults(func=cmd_config)
    compare = sub.add_parser(
        "compare-summary", help="Compare a finished run with the numbers recorded for its config.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Compare the run whose report summary is SUMMARY (its results tree: the stage fingerprints of\n"
                    "datasets, tokenizer, base model, warm start and training runs; the summary rows; the report's\n"
                    "accuracy and comparison tables) with every record of EXPECTED (e.g. config/smoke.expected.json,\n"
                    "one record per machine class: CPU vendor, dispatch, threads). Prints one verdict:\n"
                    "  identical         equal to a record bit for bit (exit 0)\n"
                    "  within tolerance  no record of this machine class; every metric within its tolerance of the\n"
                    "                    recorded value (its interval x sqrt(2), Bonferroni over the metrics),\n"
                    "                    every comparison recorded as significant still significant with its sign,\n"
                    "                    and none recorded as not significant now a significant improvement (exit 0)\n"
                    "  different         anything else, e.g. not exactly its own class's record (exit 1)\n"
                    "with the first stage and step at which the run departs from each record. Provenance\n"
                    "(versions, paths, times) is not compared.")
    compare.add_argument("summary", type=Path, help=f"the run's report {REPORT_FILES['summary']}")
    compare.add_argument("expected", type=Path, help="the expected file (JSON)")
    record = compare.add_mutually_exclusive_group()
    record.add_argument("--write", action="store_true",
                        help="record the run as the only record of EXPECTED (after a deliberate change of results)")
    record.add_argument("--add", action="store_true",
                        help="add the run as its machine class's record, keeping the others (code unchanged; "
                             "refused unless the run is within tolerance of each)")
    compare.add_argument("--all", action="store_true", help="list every difference, not the first 20 per record")
    compare.set_defaults(func=cmd_compare_summary)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """argparse, except that `kalmanrl settings` takes its KEY=VALUE selectors before or after its options (argparse
    stops filling a positional list at the first option)."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command == "settings" and all("=" in item and not item.startswith("-") for item in rest):
        args.select += rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if hasattr(args, "settings"):  # a workflow stage: pin the CPU dispatch before anything loads numpy or torch
            log.debug("CPU dispatch pinned to %s ($%s)", pin_cpu_dispatch(), DISPATCH_ENV)
            keep_freed_memory()
            args.settings = parse_settings(args.settings, args.command)
        with gpu_placement(getattr(args, "gpus", None)):
            code = args.func(args)
    except (ConfigError, DispatchError, RunDirectoryBusy, DeviceError) as err:
        print(f"kalmanrl: {err}", file=sys.stderr)
        return 2
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
