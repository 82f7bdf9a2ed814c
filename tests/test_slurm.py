"""The SLURM profile against a real one-node SLURM on localhost: the smoke DAG submitted through `sbatch` gives the
same results as a local run, and a train job killed by SLURM is reported, leaves nothing that passes for a result,
and resumes from its checkpoint when the workflow is run again.

The fixture starts munged, slurmctld and slurmd (Debian's slurm-wlm and munge; `.ci/run` installs them) and stops
them by PID afterwards, also on failure. It skips, saying why, where that cannot work: not root, the packages
missing, or a SLURM configuration of a real cluster at /etc/slurm/slurm.conf (never overwritten)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SLURM_CONF = Path("/etc/slurm/slurm.conf")
MARKER = "# one-node test cluster written by kalmanrl tests/test_slurm.py"
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "sinfo")
# Columns that measure time or speed, not results: they differ between any two runs.
TIMING = re.compile(r"time|seconds|duration|per_s|elapsed|timestamp|hostname|created")

pytestmark = pytest.mark.slow


def _slurm_conf(state: Path, memory_mb: int, cpus: int, munge_socket: Path) -> str:
    return f"""{MARKER}
ClusterName=kalmanrl
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket={munge_socket}
StateSaveLocation={state}/ctld
SlurmdSpoolDir={state}/d
SlurmctldPidFile={state}/slurmctld.pid
SlurmdPidFile={state}/slurmd.pid
SlurmctldLogFile={state}/slurmctld.log
SlurmdLogFile={state}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
MpiDefault=none
ReturnToService=2
MinJobAge=600
KillWait=5
InactiveLimit=0
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
JobAcctGatherType=jobacct_gather/none
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


def _wait_for(check, timeout: float, what: str, logs: list[Path]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    tails = "\n".join(f"--- {p}\n{p.read_text()[-2000:]}" for p in logs if p.exists())
    pytest.skip(f"SLURM could not start on localhost: {what} not ready after {timeout:.0f} s\n{tails}")


def _idle() -> bool:
    result = subprocess.run(["sinfo", "-h", "-n", "localhost", "-o", "%T"], capture_output=True, text=True)
    return result.returncode == 0 and result.stdout.strip() in ("idle", "mixed", "allocated")


@pytest.fixture(scope="module")
def slurm_cluster():
    """A running one-node cluster (munged, slurmctld, slurmd on 127.0.0.1); yields the state directory."""
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("a local SLURM needs Linux and root (slurmd starts jobs as their users)")
    missing = [name for name in DAEMONS if shutil.which(name) is None]
    if missing:
        pytest.skip(f"SLURM not installed (missing {', '.join(missing)}): apt-get install slurm-wlm munge")
    if SLURM_CONF.exists() and MARKER not in SLURM_CONF.read_text():
        pytest.skip(f"{SLURM_CONF} belongs to a real SLURM installation; not replacing it")

    # Not under pytest's tmp_path: its 0700 parents would keep the munge user from its socket.
    state = Path(tempfile.mkdtemp(prefix="kalmanrl-slurm-"))
    state.chmod(0o755)
    munge_dir = state / "munge"
    munge_dir.mkdir()
    shutil.chown(munge_dir, "munge", "munge")
    socket = munge_dir / "munge.socket"
    node = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout
    cpus = int(re.search(r"CPUs=(\d+)", node).group(1))
    memory_mb = int(re.search(r"RealMemory=(\d+)", node).group(1)) - 512
    # The executor plugin's job step drops SLURM_CONF before its nested srun, so the config must be at the default path.
    SLURM_CONF.parent.mkdir(parents=True, exist_ok=True)
    SLURM_CONF.write_text(_slurm_conf(state, memory_mb, cpus, socket))

    procs: list[subprocess.Popen] = []
    logs = [state / "munged.log", state / "slurmctld.log", state / "slurmd.log"]
    try:
        procs.append(subprocess.Popen(
            ["munged", "--foreground", f"--socket={socket}", f"--pid-file={munge_dir}/munged.pid",
             f"--log-file={munge_dir}/munged.log", f"--seed-file={munge_dir}/munged.seed"],
            user="munge", group="munge", extra_groups=[], stderr=subprocess.DEVNULL))
        _wait_for(socket.exists, 20, "munged", [munge_dir / "munged.log"])
        procs.append(subprocess.Popen(["slurmctld", "-D", "-i"], stderr=subprocess.DEVNULL))
        procs.append(subprocess.Popen(["slurmd", "-D", "-N", "localhost"], stderr=subprocess.DEVNULL))
        _wait_for(_idle, 60, "node localhost", logs)
        yield state
    finally:
        subprocess.run(["scancel", "--full", "--user", "root"], capture_output=True)
        deadline = time.monotonic() + 30
        while procs and time.monotonic() < deadline and _queue():
            time.sleep(0.5)
        for proc in reversed(procs):
            _stop(proc)
        SLURM_CONF.unlink(missing_ok=True)
        shutil.rmtree(state, ignore_errors=True)


def _queue() -> list[tuple[str, str, str]]:
    """(job id, state, comment) of every job SLURM still lists."""
    result = subprocess.run(["squeue", "-h", "-o", "%i|%T|%k"], capture_output=True, text=True)
    return [tuple(line.split("|", 2)) for line in result.stdout.splitlines()] if result.returncode == 0 else []


def snakemake(workdir: Path, *args: str, check: bool = True, **popen) -> subprocess.CompletedProcess:
    result = subprocess.run(["snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir), *args],
                            capture_output=True, text=True, **popen)
    if check:
        assert result.returncode == 0, f"snakemake {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


# The profile as a user runs it, plus what this cluster needs: no accounts and no accounting (squeue instead of
# sacct), and quicker polling than a shared cluster wants.
SLURM_ARGS = ("--profile", str(REPO / "profiles" / "slurm"), "--slurm-no-account", "--slurm-status-command", "squeue",
              "--slurm-init-seconds-before-status-checks", "1", "--seconds-between-status-checks", "2")


def smoke_workdir(root: Path, **overrides) -> Path:
    """A working directory whose config/config.yaml is the smoke config (its data shipped in tests/data)."""
    config = yaml.safe_load((REPO / "config" / "smoke.yaml").read_text())
    config.update(results_dir="results", data={"local_dir": str(REPO / config["data"]["local_dir"])})
    for key, value in overrides.items():
        config[key] = {**config.get(key, {}), **value}
    (root / "config").mkdir(parents=True)
    (root / "config" / "config.yaml").write_text(yaml.safe_dump(config))
    return root


def parquet_results(results: Path) -> dict[str, pd.DataFrame]:
    """Every Parquet result (not checkpoints) by relative path, without the columns that measure time."""
    frames = {}
    for path in sorted(results.rglob("*.parquet")):
        if "checkpoints" in path.parts:
            continue
        frame = pd.read_parquet(path)
        frames[str(path.relative_to(results))] = frame.drop(columns=[c for c in frame.columns if TIMING.search(c)])
    return frames


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


@pytest.fixture(scope="module")
def cluster_run(slurm_cluster, tmp_path_factory) -> tuple[Path, str]:
    """The smoke config run through the SLURM profile: (working directory, Snakemake's log)."""
    workdir = smoke_workdir(tmp_path_factory.mktemp("cluster"))
    result = snakemake(workdir, *SLURM_ARGS)
    return workdir, result.stdout + result.stderr


def test_smoke_run_through_sbatch_equals_a_local_run(cluster_run, tmp_path):
    cluster, log = cluster_run
    local = smoke_workdir(tmp_path / "local")
    snakemake(local, "--cores", "2")

    assert len(slurm_jobs_of(log)) >= 1 + 1 + 3 + 8, log[-3000:]  # model, sft, 3 x train, 8 x evaluate
    for rule in ("data", "decontaminate", "report"):
        assert re.search(rf"localrule {rule}:", log), f"{rule} should run on the submit host"
    expected, got = parquet_results(local / "results"), parquet_results(cluster / "results")
    assert sorted(got) == sorted(expected)
    for name, frame in expected.items():
        pd.testing.assert_frame_equal(got[name], frame, obj=name)


def _train_job_id() -> str | None:
    return next((job for job, state, comment in _queue() if "rule_train" in comment and state == "RUNNING"), None)


def test_a_cancelled_train_job_is_reported_and_the_rerun_resumes_from_its_checkpoint(cluster_run, tmp_path):
    # The finished cluster run with longer training: only the train job is out of date (its settings changed).
    workdir = tmp_path / "cancel"
    shutil.copytree(cluster_run[0], workdir, symlinks=True)
    shutil.rmtree(workdir / "config")
    smoke_workdir(workdir, train={"steps": 30, "checkpoint_every": 2, "keep_every": 0})
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

    config = yaml.safe_load((REPO / "config" / "smoke.yaml").read_text())
    config.update(results_dir="results", resources={"train": {"gpus": gpus, "nodes": nodes}})
    workdir = tmp_path
    (workdir / "config").mkdir()
    (workdir / "config" / "config.yaml").write_text(yaml.safe_dump(config))
    resources, shell = planned_train_job(workdir)  # a dry run: no data needed
    assert f"--gpus {gpus} --nodes {nodes}" in shell
    job = SimpleNamespace(resources=_Resources(resources), threads=1, name="train", is_group=lambda: False)
    params = {"run_uuid": "run", "slurm_logfile": "log", "comment_str": "train", "account": "", "partition": "",
              "workdir": str(workdir)}
    call = (get_submit_command(job, params) + set_gres_string(job)).split()
    assert set(expected) <= set(call), call
    assert not [arg for arg in call if arg.startswith(("--ntasks-per-gpu", "--ntasks="))], call
    assert ("--nodes=2" in call) == (nodes == 2)
