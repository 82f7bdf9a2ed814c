"""One writer per run directory: a second training job on it stops naming the holder's pid and host, a dead job's
lock is taken over, and the ranks a job starts hold its lock until they end."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from kalmanrl.configuration.config import stage_settings, validate_config
from kalmanrl.core.layout import run_lock_file
from kalmanrl.runtime.runlock import RunDirectoryBusy, run_writer


def test_a_second_writer_stops_naming_the_holder(tmp_path):
    with run_writer(tmp_path / "run"):
        started = time.monotonic()
        with pytest.raises(RunDirectoryBusy, match=rf"pid {os.getpid()} on host {socket.gethostname()} since "):
            with run_writer(tmp_path / "run", timeout=0.5):
                pass
        assert time.monotonic() - started >= 0.5  # it waited for the holder to end first
    with run_writer(tmp_path / "run"):  # released when the first writer's block ends
        pass
    assert run_lock_file(tmp_path / "run").read_text() == ""


def test_a_dead_jobs_lock_is_taken_over(tmp_path, caplog):
    lock = run_lock_file(tmp_path / "run")
    lock.parent.mkdir()
    lock.write_text(json.dumps({"pid": 4194304, "host": "gone", "since": "2026-12-01T00:00:00+00:00"}) + "\n")
    with caplog.at_level(logging.WARNING), run_writer(tmp_path / "run"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert "taking over the writer lock of pid 4194304 on host gone" in caplog.text


def test_a_child_given_the_lock_holds_it_until_it_ends(tmp_path):
    """What `kalmanrl train` does for the torchrun (or srun) it starts: the lock outlives the launcher's block."""
    with run_writer(tmp_path / "run") as lock:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], pass_fds=(lock.fileno(),))
    with pytest.raises(RunDirectoryBusy):
        with run_writer(tmp_path / "run", timeout=0.2):
            pass
    child.kill()
    child.wait()
    with run_writer(tmp_path / "run", timeout=0.2):
        pass


@pytest.mark.slow
def test_a_second_training_job_on_one_run_directory_stops_naming_the_first(tmp_path, tiny_model_dir,
                                                                            arithmetic_parquet):
    config = validate_config({"train": {"steps": 10000, "prompts_per_step": 2, "group_size": 2, "mini_batches": 1,
                                        "max_tokens": 4, "checkpoint_every": 10000},
                              "algorithms": {"grpo": {"advantage": "grpo", "ratio": "token"}},
                              "datasets": {"arith": {"loader": "arithmetic", "template": "krpo",
                                                     "reward": "krpo_arithmetic"}},
                              "tasks": ["arith"], "benchmarks": ["arith"]})
    settings = json.dumps(stage_settings(config, "train", model="tiny", task="arith", algorithm="grpo", seed="0"))
    command = ["kalmanrl", "train", "--settings", settings, "--model", str(tiny_model_dir), "--dataset",
               str(arithmetic_parquet), "--out", str(tmp_path / "run")]
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        lock = run_lock_file(tmp_path / "run")
        deadline = time.monotonic() + 120
        while not (lock.exists() and lock.read_text()):
            assert first.poll() is None and time.monotonic() < deadline, "the first job did not take the lock"
            time.sleep(0.05)
        second = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert first.poll() is None, "the first job ended before the second was refused"
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert second.returncode == 2
    assert f"pid {first.pid} on host {socket.gethostname()}" in second.stderr, second.stderr[-3000:]
