"""Processes end with the process that started them, however it ends: a child started with
`ending_with_this_process`, a torchrun rank, a reward worker; and a 2-rank training whose Snakemake is killed leaves
no rank behind, then resumes from its last checkpoint to the uninterrupted result."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from smoke_runs import REPO, TIMING, smoke_workdir, snakemake

CHILD = """
import subprocess, sys, time
from kalmanrl.runtime.lifetime import ending_with_this_process
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], preexec_fn=ending_with_this_process())
print(child.pid, flush=True)
time.sleep(120)
"""

POOL = """
import time
from kalmanrl.runtime.workers import WorkerPool
if __name__ == "__main__":
    pool = WorkerPool(time.sleep, 1, timeout_s=600, max_memory_mb=4096)
    print("running", flush=True)
    pool.run([(120,)])
"""


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, killed but not yet reaped by its parent, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def process_tree(root: int) -> dict[int, list[str]]:
    """`root` and every process below it (also those in sessions of their own), pid -> argv."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            pass
    tree, grew = {root}, True
    while grew:
        below = {pid for pid, parent in parents.items() if parent in tree} - tree
        tree |= below
        grew = bool(below)
    return {pid: [arg.decode(errors="replace") for arg in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")]
            for pid in tree if alive(pid)}


def is_kalmanrl_train(argv: list[str]) -> bool:
    """`python .../kalmanrl train ...`: the launching command or one of its ranks (not a shell, not torchrun)."""
    return len(argv) > 2 and Path(argv[1]).name == "kalmanrl" and argv[2] == "train"


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_child_ends_when_the_process_that_started_it_is_killed():
    parent = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    assert alive(child)
    parent.kill()
    parent.wait()
    wait_until(lambda: not alive(child), 5, f"child {child} to end with its parent")


def test_a_process_whose_parent_already_ended_exits_at_once():
    """The parent it names is not its parent (any more): it must not run on as an orphan."""
    done = subprocess.run([sys.executable, "-c", "from kalmanrl.runtime.lifetime import end_with_parent\n"
                           "end_with_parent(parent=1)\nprint('ran on')"], capture_output=True, text=True)
    assert done.returncode == 1 and "ran on" not in done.stdout
    assert "its parent 1 ended before it could follow it" in done.stderr


def test_a_rank_whose_torchrun_has_ended_exits_at_once_and_other_processes_run_on():
    code = "from kalmanrl.runtime.lifetime import end_with_torchrun\nend_with_torchrun()\nprint('ran on')"
    rank = subprocess.run([sys.executable, "-c", code], env={**os.environ, "TORCHELASTIC_RUN_ID": "test"},
                          capture_output=True, text=True)
    assert rank.returncode == 1 and "the torchrun that started it has ended" in rank.stderr
    env = {key: value for key, value in os.environ.items() if key != "TORCHELASTIC_RUN_ID"}
    plain = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert plain.returncode == 0 and plain.stdout == "ran on\n"


def test_reward_workers_end_with_the_process_that_owns_them(tmp_path):
    """A worker busy with an item that never ends (it would ignore its closed pipe) goes when its owner is killed."""
    script = tmp_path / "owner.py"
    script.write_text(POOL)
    # TMPDIR: the killed owner's forkserver cannot remove its folder (pymp-*); it stays in this test's.
    owner = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "TMPDIR": str(tmp_path)})
    assert owner.stdout.readline() == "running\n"
    # The forkserver, the worker it forked and multiprocessing's resource tracker.
    wait_until(lambda: len(process_tree(owner.pid)) >= 4, 60, "the worker to start")
    time.sleep(1)  # the worker takes its item
    workers = [pid for pid in process_tree(owner.pid) if pid != owner.pid]
    owner.kill()
    owner.wait()
    wait_until(lambda: not any(alive(pid) for pid in workers), 5, f"workers {workers} to end with their owner")


@pytest.mark.slow
def test_killing_snakemake_ends_every_rank_and_the_rerun_resumes_to_the_uninterrupted_result(tmp_path):
    """SIGKILL to Snakemake's process group (an out-of-memory kill, a closed terminal) while 2 CPU ranks train: 5 s
    later no process of the job is left and no checkpoint has been written since; the rerun resumes from the last
    checkpoint and ends where an uninterrupted run does."""
    workdir = smoke_workdir(tmp_path / "work", ["kpo"], train={"steps": 8, "checkpoint_every": 2, "keep_every": 0},
                            resources={"train": {"cpu_ranks": 2}})
    run = "results/runs/tiny/arithmetic_easy/kpo/seed0"
    checkpoints = workdir / run / "checkpoints"
    snakemake(workdir, "--cores", "2", "results/models/tiny/arithmetic_easy/sft")
    with open(tmp_path / "killed.log", "w") as log:
        # TMPDIR: the killed Snakemake cannot remove its folder (snakemake*); it stays in this test's.
        job = subprocess.Popen(["snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
                                "--cores", "2", f"{run}/metrics.parquet"], stdout=log, stderr=log,
                               start_new_session=True, env={**os.environ, "TMPDIR": str(tmp_path)})
    wait_until(lambda: (checkpoints / "step_000004" / "trainer_state.json").exists(), 600, "the step-4 checkpoint")
    tree = process_tree(job.pid)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    written = sorted(path.name for path in checkpoints.glob("step_*"))
    assert sum(map(is_kalmanrl_train, tree.values())) == 3, tree  # the launcher and its 2 ranks
    time.sleep(5)
    assert not {pid: argv for pid, argv in tree.items() if alive(pid)}
    assert sorted(path.name for path in checkpoints.glob("step_*")) == written, "a rank wrote on after the kill"
    assert not (workdir / run / "metrics.parquet").exists(), "the run finished before it could be killed"

    snakemake(workdir, "--unlock")
    snakemake(workdir, "--cores", "2", f"{run}/metrics.parquet")
    resumed = finished_run(workdir / run)
    assert resumed["from_steps"] == [0, int(written[-1].removeprefix("step_"))]
    assert not (workdir / run / "torchrun").exists()  # no rank failed: torchrun's folders (the killed run's too) go
    shutil.rmtree(checkpoints)  # else the uninterrupted run would resume from the finished one's last checkpoint
    snakemake(workdir, "--cores", "2", "--forcerun", "train", f"{run}/metrics.parquet")
    uninterrupted = finished_run(workdir / run)
    assert uninterrupted["from_steps"] == [0]
    pd.testing.assert_frame_equal(resumed["metrics"], uninterrupted["metrics"], check_exact=False, atol=1e-6, rtol=0)
    for name, tensor in uninterrupted["weights"].items():
        torch.testing.assert_close(resumed["weights"][name], tensor, atol=1e-6, rtol=0, msg=name)


def finished_run(run_dir: Path) -> dict:
    """The steps a finished run started from, its metrics (no timing columns) and its final weights."""
    metrics = pd.read_parquet(run_dir / "metrics.parquet")
    return {"from_steps": [start["from_step"] for start in
                           json.loads((run_dir / "final" / "provenance.json").read_text())["environments"]],
            "metrics": metrics.drop(columns=[c for c in metrics.columns if TIMING.search(c)]),
            "weights": load_file(run_dir / "final" / "model.safetensors")}
