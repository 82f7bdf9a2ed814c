# Config -> target lists. All validation and every default come from kalmanrl.configuration.config and the schema.
import json
import sys

from kalmanrl.configuration.config import (check_data_dir, read_config_file, stage_settings, validate_config,
                                           validation_benchmarks)
from kalmanrl.core.layout import (FIGURES, REPORT_FILES, RUN, WARM_START, WILDCARD_CONSTRAINTS, ResultsTree,
                                  config_jobs, fields, parse_run_name)
from kalmanrl.runtime.devices import local_gpu_problem, machine_devices

for _path in workflow.configfiles:  # Snakemake's reader keeps the last of a repeated key; ours refuses it
    read_config_file(_path)
_validated = validate_config(config)
if workflow.is_main_process:  # not in a cluster job: its node need not see the dataset copies
    check_data_dir(_validated)
config.clear()
config.update(_validated)

# Every path of the results tree, as a Snakemake pattern or a file (kalmanrl.core.layout).
TREE = ResultsTree(config["results_dir"])


wildcard_constraints:
    **WILDCARD_CONSTRAINTS,


def settings(stage, **wildcards):
    """The stage's settings as JSON: a Snakemake param, so changing a value reruns exactly the affected jobs."""
    return json.dumps(stage_settings(config, stage, **wildcards), sort_keys=True)


def report_settings():
    """The report's settings and what it prints under "How to reproduce this": the config files, the merged config."""
    return json.dumps({**stage_settings(config, "report"),
                       "reproduce": {"configfiles": list(map(str, workflow.configfiles)), "config": config}},
                      sort_keys=True)


def res(stage, key):
    return config["resources"][stage][key]


def scaled(stage, key):
    """mem_mb or runtime times the attempt number, capped by max_mem_mb / max_runtime: a job retried after running
    out of memory or time asks for more, but never for more than a partition grants."""
    base, cap = res(stage, key), res(stage, {"mem_mb": "max_mem_mb", "runtime": "max_runtime"}[key])
    return lambda wildcards, attempt: min(base * attempt, cap)


def local_gpu_refusal():
    """Why a local run could not give all its GPU jobs devices (kalmanrl.runtime.devices.local_gpu_problem), or None."""
    needs = {stage: res(stage, "gpus") for stage in ("sft", "train", "evaluate") if res(stage, "gpus")}
    granted = workflow.global_resources.get("gpu")
    available = len(machine_devices()) if needs else 0  # NVML / nvidia-smi only when a stage needs GPUs
    return local_gpu_problem(needs, None if granted is None else granted.value, available)


# A dry run only warns, since it also plans cluster runs from a login node without GPUs (a cluster run sets nodes
# through --jobs). Not in the jobs a cluster run starts.
if workflow.is_main_process and workflow.output_settings.dryrun and workflow.resource_settings.nodes is None:
    if (_problem := local_gpu_refusal()) is not None:
        print(f"kalmanrl: WARNING: a local run would refuse to start: {_problem}", file=sys.stderr)


onstart:
    # Refuse a local run before any job starts. Here, not when the Snakefile is read: only now is the executor known,
    # and `snakemake -j N` with the default profile's `cores: all` sets nodes for a local run too.
    if workflow.is_main_process and workflow.local_exec and (_problem := local_gpu_refusal()) is not None:
        raise WorkflowError(f"kalmanrl: {_problem}")


def flavour(stage):
    """"gpu" where the config gives the stage GPUs, else "cpu": which image and conda environment it runs in."""
    return "gpu" if res(stage, "gpus") else "cpu"


def image(stage):
    """The container of a stage (`--sdm apptainer`)."""
    return config["containers"][flavour(stage)]


def conda_env(stage):
    """The conda environment of a stage (`--sdm conda`), relative to workflow/rules."""
    return f"../../envs/{flavour(stage)}.yaml"


def run_ident(wildcards):
    """An evaluation's model, task, benchmark and what its {run} names (algorithm, and seed and step where it has
    them), as text."""
    return {"model": wildcards.model, "task": wildcards.task, "benchmark": wildcards.benchmark,
            **parse_run_name(wildcards.run)}


def trained_run(ident):
    """The training run (kalmanrl.core.layout.RUN's fields) an evaluation of a trained policy or kept checkpoint belongs to."""
    return {key: ident[key] for key in fields(RUN)}


def eval_model(wildcards):
    """What an evaluation waits for: the warm start for its run, the trained policy of "<algorithm>/seed<n>", and
    for an intermediate step the finished run (its kept checkpoints are not outputs of their own)."""
    ident = run_ident(wildcards)
    if ident["algorithm"] == WARM_START:
        return TREE.warm_start_model(model=wildcards.model, task=wildcards.task)
    return TREE.metrics(**trained_run(ident)) if "step" in ident else TREE.final_model(**trained_run(ident))


def eval_model_dir(wildcards):
    """The model directory an evaluation loads (an intermediate step's is the model/ of its kept checkpoint, in the run
    that eval_model waits for)."""
    ident = run_ident(wildcards)
    if "step" not in ident:
        return eval_model(wildcards)
    return TREE.kept_model(int(ident["step"]), **trained_run(ident))


# The report's inputs: every evaluation's summary and every training run's metrics, from the one list of jobs that
# `kalmanrl plan` reads too (kalmanrl.core.layout.config_jobs).
_jobs = list(config_jobs(config))
SUMMARIES = [TREE.evaluation("summary", **wildcards) for stage, wildcards in _jobs if stage == "evaluate"]
METRICS = [TREE.metrics(**wildcards) for stage, wildcards in _jobs if stage == "train"]
REPORT_OUTPUTS = [TREE.report_file(name) for name in REPORT_FILES]
