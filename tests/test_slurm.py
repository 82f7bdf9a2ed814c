"""The SLURM profile against a real one-node SLURM on localhost: the smoke DAG (one algorithm's part of it) submitted
through `sbatch` gives the local smoke run's results to the last bit, and a train job killed by SLURM is reported,
leaves nothing that passes for a result, and resumes from its checkpoint when the workflow is run again.

The fixture starts munged, slurmctld and slurmd (tests/slurm_local.py; Debian's slurm-wlm and munge, which `.ci/run`
installs) and stops them by PID afterwards, also on failure. It skips, saying why, where that cannot work: not root,
the packages missing, or a SLURM configuration of a real cluster at /etc/slurm/slurm.conf (never overwritten)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

import slurm_local
from job_settings import job_inputs, job_settings
from smoke_runs import REPO, assert_part_of_the_smoke_run, smoke_workdir, snakemake

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def slurm_cluster():
    """A running one-node cluster (tests/slurm_local.py): one that `slurm_local.py up` started is used as it is;
    otherwise one is started here and stopped by PID afterwards, also on failure. Yields the state directory."""
    found = slurm_local.running()
    if found is not None and slurm_local.node_idle():
        yield found[0]
        return
    try:
        state, pids = slurm_local.start()
    except slurm_local.Unavailable as err:
        pytest.skip(str(err))
    try:
        yield state
    finally:
        slurm_local.stop(state, pids)


_queue = slurm_local.queue


# The profile as a user runs it, plus what this cluster needs: no accounts and no accounting (squeue instead of
# sacct), and quicker polling than a shared cluster wants.
SLURM_ARGS = ("--profile", str(REPO / "profiles" / "slurm"), "--slurm-no-account", "--slurm-status-command", "squeue",
              "--slurm-init-seconds-before-status-checks", "1", "--seconds-between-status-checks", "2")


def slurm_jobs_of(log: str) -> set[str]:
    """SLURM job ids the executor plugin reports submitting in a Snakemake log."""
    return set(re.findall(r"SLURM jobid (\d+)", log)) | set(re.findall(r"SLURM job ID:? (\d+)", log))


def test_cluster_runs_a_batch_job(slurm_cluster, tmp_path):
    out = tmp_path / "hello.txt"
    job = subprocess.run(["sbatch", "--parsable", "-o", str(out), "--wrap", "echo hello from $SLURM_JOB_ID"],
                         capture_output=True, text=True, check=True).stdout.strip()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (out.exists() and out.read_text().strip()):
        time.sleep(0.5)
    assert out.read_text().strip() == f"hello from {job}"


# The part of the smoke workflow run through SLURM: every stage, one algorithm (the one whose train job the
# cancellation test reruns), the kept step-1 checkpoint evaluated. Fewer jobs than the full grid: the executor plugin
# checks on running jobs 10 s less often each time none has finished, so every job costs waiting time.
CLUSTER_ALGORITHMS = ["krpo"]


@pytest.fixture(scope="module")
def cluster_run(slurm_cluster, tmp_path_factory) -> tuple[Path, str]:
    """Part of the smoke workflow (CLUSTER_ALGORITHMS) run through the SLURM profile: (working directory, log)."""
    workdir = smoke_workdir(tmp_path_factory.mktemp("cluster"), CLUSTER_ALGORITHMS)
    result = snakemake(workdir, *SLURM_ARGS)
    return workdir, result.stdout + result.stderr


def test_smoke_run_through_sbatch_equals_a_local_run(cluster_run, smoke_run):
    cluster, log = cluster_run
    assert len(slurm_jobs_of(log)) == 1 + 1 + 3 * 2, log[-3000:]  # sft, train, 3 policies x 2 benchmarks evaluated
    for rule in ("data", "decontaminate", "model", "report"):
        assert re.search(rf"localrule {rule}:", log), f"{rule} should run on the submit host"
    assert_part_of_the_smoke_run(cluster / "results", smoke_run / "results", CLUSTER_ALGORITHMS)


def _train_job_id() -> str | None:
    return next((job for job, state, comment in _queue() if "rule_train" in comment and state == "RUNNING"), None)


def test_a_cancelled_train_job_is_reported_and_the_rerun_resumes_from_its_checkpoint(cluster_run, tmp_path):
    # The finished cluster run with longer training: only the train job is out of date (its settings changed).
    workdir = tmp_path / "cancel"
    shutil.copytree(cluster_run[0], workdir, symlinks=True)
    shutil.rmtree(workdir / "config")
    smoke_workdir(workdir, CLUSTER_ALGORITHMS, train={"steps": 30, "checkpoint_every": 2, "keep_every": 0})
    run = workdir / "results" / "runs" / "tiny" / "arithmetic_easy" / "krpo" / "seed0"
    shutil.rmtree(run / "checkpoints")  # those of the short run; wait for the new run's own
    target = str((run / "metrics.parquet").relative_to(workdir))
    first = subprocess.Popen(["snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir), *SLURM_ARGS,
                              "--retries", "0", target], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not list(run.glob("checkpoints/step_*/trainer_state.json")):
            assert first.poll() is None, f"the workflow ended before a checkpoint was written:\n{first.stdout.read()}"
            time.sleep(0.2)
        job = _train_job_id()
        assert job is not None, _queue()
        subprocess.run(["scancel", job], check=True)
        log, _ = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()

    assert first.returncode != 0
    assert re.search(r"Error in rule train", log) and job in log, log[-3000:]
    assert not (run / "metrics.parquet").exists() and not (run / "final").exists()
    saved = sorted(run.glob("checkpoints/step_*"))
    assert len(saved) == 1
    resumed_from = int(saved[0].name.removeprefix("step_"))
    assert 0 < resumed_from < 30
    before = pd.read_parquet(saved[0] / "state" / "metrics.parquet")

    snakemake(workdir, *SLURM_ARGS, target)
    metrics = pd.read_parquet(run / "metrics.parquet")
    assert list(metrics["step"]) == list(range(1, 31))
    # Rows up to the checkpoint come back from it unchanged, wall times included: those steps were not run again.
    pd.testing.assert_frame_equal(metrics.iloc[:resumed_from], before)


class _Resources(dict):
    """A job's resources as the executor plugin reads them (`.get` and attributes)."""

    __getattr__ = dict.__getitem__


def planned_train_job(workdir: Path) -> tuple[dict, str]:
    """Resources and shell command of the first train job of a dry run."""
    out = snakemake(workdir, "-n", "-p").stdout
    block = out[out.index("rule train:"):]
    line = re.search(r"^\s*resources: (.*)$", block, re.M).group(1)
    resources = {}
    for item in line.split(", "):
        key, value = item.split("=", 1)
        resources[key] = int(value) if value.isdigit() else value
    return resources, re.search(r"^Shell command: (.*)$", block, re.M).group(1)


@pytest.mark.parametrize("gpus,nodes,expected", [
    (4, 1, ["--gpus=4"]),
    (4, 2, ["--nodes=2", "--gres=gpu:4"]),
])
def test_a_multi_gpu_train_job_is_submitted_as_one_task_per_node(tmp_path, gpus, nodes, expected):
    """The sbatch call the SLURM executor makes for a train job of G GPUs on N nodes asks for the nodes and every
    node's GPUs, and no task per GPU (which would start the command once per GPU); `kalmanrl train` gets the counts
    and starts the ranks itself (torchrun, srun torchrun across nodes)."""
    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    workdir = smoke_workdir(tmp_path, resources={"train": {"gpus": gpus, "nodes": nodes}})
    resources, shell = planned_train_job(workdir)  # a dry run: no data needed
    assert f"--gpus {gpus} --nodes {nodes}" in shell
    job = SimpleNamespace(resources=_Resources(resources), threads=1, name="train", is_group=lambda: False)
    params = {"run_uuid": "run", "slurm_logfile": "log", "comment_str": "train", "account": "", "partition": "",
              "workdir": str(workdir)}
    call = (get_submit_command(job, params) + set_gres_string(job)).split()
    assert set(expected) <= set(call), call
    assert not [arg for arg in call if arg.startswith(("--ntasks-per-gpu", "--ntasks="))], call
    assert ("--nodes=2" in call) == (nodes == 2)


def test_a_cpu_rank_train_job_is_submitted_as_one_task_per_rank(tmp_path):
    """Without GPUs, resources.train.cpu_ranks 2 asks sbatch for 2 tasks (and no GPU) and hands the count to
    `kalmanrl train`, which fills the tasks with srun."""
    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    workdir = smoke_workdir(tmp_path, resources={"train": {"cpu_ranks": 2}})
    resources, shell = planned_train_job(workdir)
    assert "--gpus 0 --nodes 1 --cpu-ranks 2" in shell
    job = SimpleNamespace(resources=_Resources(resources), threads=1, name="train", is_group=lambda: False)
    params = {"run_uuid": "run", "slurm_logfile": "log", "comment_str": "train", "account": "", "partition": "",
              "workdir": str(workdir)}
    call = (get_submit_command(job, params) + set_gres_string(job)).split()
    assert {"--ntasks=2", "--nodes=1", "--cpus-per-task=1"} <= set(call), call
    assert not [arg for arg in call if "gpu" in arg], call


TRAIN_RUN = Path("results/runs/tiny/arithmetic_easy/krpo/seed0")
TRAIN_LOG = Path("results/logs/train/tiny/arithmetic_easy/krpo/seed0.log")


def test_a_two_task_cpu_training_job_trains_like_one_rank(slurm_cluster, smoke_run, tmp_path):
    """The distributed launch path on the local SLURM: a train job with resources.train.cpu_ranks 2 is submitted
    through the SLURM profile as one job of 2 tasks; `kalmanrl train` runs `srun torchrun`, one torchrun (one gloo
    rank) per task, meeting at a c10d rendezvous on the job's node, as a multi-node job's torchruns do across nodes.
    Its final weights and metrics equal the 1-rank run of the local smoke run."""
    from test_distributed import assert_same_run

    # The smoke run's warm start, the training again as a 2-task SLURM job: only the train job is out of date.
    two = tmp_path / "two"
    shutil.copytree(smoke_run, two, symlinks=True)
    shutil.rmtree(two / "config")
    shutil.rmtree(two / TRAIN_RUN)
    smoke_workdir(two, resources={"train": {"cpu_ranks": 2}})
    result = snakemake(two, *SLURM_ARGS, str(TRAIN_RUN / "metrics.parquet"))
    log = result.stdout + result.stderr

    jobs = slurm_jobs_of(log)
    assert len(jobs) == 1, log[-3000:]  # the train job, one submission
    job = jobs.pop()
    details = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, check=True).stdout
    assert re.search(r"\bNumTasks=2\b", details) and re.search(r"\bNumNodes=1\b", details), details
    train_log = (two / TRAIN_LOG).read_text()
    launched = (rf"2 ranks, 1 threads each: srun --nodes=1 --ntasks=2 .*torchrun --nnodes=2 --nproc-per-node=1 "
                rf"--rdzv-backend=c10d --rdzv-endpoint=localhost:\d+ --rdzv-id={job} ")
    assert re.search(launched, train_log), train_log[-3000:]
    assert_same_run(smoke_run / TRAIN_RUN, two / TRAIN_RUN, atol=1e-5)  # final weights to 1e-5, metrics


def test_cpu_ranks_with_gpus_are_refused_by_the_config():
    from kalmanrl.configuration.config import ConfigError, validate_config

    with pytest.raises(ConfigError, match=r"config\.resources\.train\.cpu_ranks: 2 with gpus = 1"):
        validate_config({"resources": {"train": {"cpu_ranks": 2, "gpus": 1}}})


@pytest.mark.parametrize("slurm, expected", [
    (False, ["torchrun", "--standalone", "--nproc-per-node=2", "--log-dir={out}/torchrun", "--no-python", "kalmanrl",
             "train"]),
    (True, ["srun", "--nodes=1", "--ntasks=2", "--ntasks-per-node=2", "--overlap", "--kill-on-bad-exit=1", "torchrun",
            "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d", "--rdzv-endpoint=node7:29542", "--rdzv-id=7042",
            "--log-dir={out}/torchrun", "--no-python", "kalmanrl", "train"]),
])
def test_kalmanrl_train_starts_cpu_ranks_with_torchrun_or_one_srun_task_each(monkeypatch, tmp_path, slurm, expected):
    """`kalmanrl train --gpus 0 --cpu-ranks 2`: outside SLURM one standalone torchrun of 2 ranks; inside a SLURM job
    srun with one task (one torchrun of one rank) per CPU rank. torchrun keeps its ranks' error files in the run
    directory. The ranks see no GPU; torchrun or srun holds the run directory's writer lock and ends with the
    launching process."""
    from kalmanrl import cli
    from kalmanrl.runtime import distributed

    started = []
    monkeypatch.setattr(cli.subprocess, "run", lambda command, env, **options: started.append((command, env, options))
                        or SimpleNamespace(returncode=0))
    monkeypatch.setattr(distributed, "slurm_first_node", lambda: "node7")
    for name in ("LOCAL_RANK", "SLURM_JOB_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KALMANRL_CPU_DISPATCH", "native")  # torch is loaded already: pin nothing
    if slurm:
        monkeypatch.setenv("SLURM_JOB_ID", "7042")
        monkeypatch.setenv("PATH", f"{slurm_client(tmp_path)}{os.pathsep}{os.environ['PATH']}")
    assert cli.main(["train", "--settings", job_settings("train"), *job_inputs(tmp_path),
                     "--out", str(tmp_path), "--gpus", "0", "--cpu-ranks", "2", "--threads", "5"]) == 0
    [(command, env, options)] = started
    rank_options = command.index("train") + 1
    assert command[:rank_options] == [part.format(out=tmp_path) for part in expected]
    assert command[command.index("--threads") + 1] == "2"  # the node's two ranks share the job's threads
    assert "--cpu-ranks" not in command and "--gpus" not in command and env["CUDA_VISIBLE_DEVICES"] == ""
    assert len(options["pass_fds"]) == 1 and callable(options["preexec_fn"])


def slurm_client(tmp_path) -> Path:
    """A folder with stand-in `srun` and `scontrol` executables (only found, never run, by these tests)."""
    folder = tmp_path / "slurm-bin"
    folder.mkdir(exist_ok=True)
    for tool in ("srun", "scontrol"):
        (folder / tool).write_text("#!/bin/sh\nexit 1\n")
        (folder / tool).chmod(0o755)
    return folder


def test_several_nodes_without_a_slurm_client_are_refused_naming_the_fix(monkeypatch, tmp_path, capsys):
    """Inside an Apptainer image there is no srun or scontrol: the job stops before starting anything and says how to
    run it instead."""
    from kalmanrl import cli

    monkeypatch.setattr(cli.subprocess, "run", lambda *a, **k: pytest.fail("nothing may start"))
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv("KALMANRL_CPU_DISPATCH", "native")
    monkeypatch.setenv("SLURM_JOB_ID", "7042")
    monkeypatch.setenv("APPTAINER_CONTAINER", "/images/kalmanrl-cpu.sif")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert cli.main(["train", "--settings", job_settings("train"), *job_inputs(tmp_path),
                     "--out", str(tmp_path / "run"), "--gpus", "0", "--cpu-ranks", "1", "--nodes", "2",
                     "--threads", "1"]) == 2
    assert re.search(r"srun and scontrol are not on PATH inside the image /images/kalmanrl-cpu\.sif.*rather than "
                     r"`--sdm apptainer`", capsys.readouterr().err)
