"""GPU placement: concurrent GPU jobs on one machine get disjoint CUDA_VISIBLE_DEVICES, on a fake device pool."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kalmanrl.devices import DevicesBusy, VISIBLE, claim_devices, gpu_placement, machine_devices

REPO = Path(__file__).resolve().parents[1]
FOUR = ["0", "1", "2", "3"]


def start_job(count: int, lock_dir: Path, devices: list[str]) -> tuple[subprocess.Popen, str]:
    """A separate process that claims `count` devices, prints its CUDA_VISIBLE_DEVICES, and holds them until its
    stdin closes (or it is killed)."""
    code = textwrap.dedent(f"""
        import os, sys
        from pathlib import Path
        from kalmanrl.devices import gpu_placement
        env = {{k: v for k, v in os.environ.items() if k not in ("SLURM_JOB_ID", "CUDA_VISIBLE_DEVICES")}}
        with gpu_placement({count}, env=env, lock_dir=Path({str(lock_dir)!r}), devices={devices!r}, timeout=30):
            print(env["CUDA_VISIBLE_DEVICES"], flush=True)
            sys.stdin.read()
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    return proc, proc.stdout.readline().strip()


def finish(proc: subprocess.Popen) -> None:
    proc.stdin.close()
    proc.wait(timeout=30)


def test_concurrent_jobs_get_disjoint_devices(tmp_path):
    jobs = [start_job(n, tmp_path, FOUR) for n in (1, 2, 1)]
    try:
        claimed = [visible.split(",") for _, visible in jobs]
        assert sorted(sum(claimed, [])) == FOUR
        assert [len(c) for c in claimed] == [1, 2, 1]
    finally:
        for proc, _ in jobs:
            finish(proc)


def test_released_devices_are_reused_after_the_job_ends(tmp_path):
    first, visible = start_job(2, tmp_path, ["0", "1"])
    finish(first)
    second, again = start_job(2, tmp_path, ["0", "1"])
    finish(second)
    assert visible == again == "0,1"


def test_a_killed_job_does_not_leak_its_device(tmp_path):
    holder, visible = start_job(1, tmp_path, ["0"])
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    with claim_devices(1, ["0"], tmp_path, timeout=5, poll=0.05) as claimed:
        assert claimed == ["0"] == [visible]


def test_waits_while_every_device_is_busy_then_gives_up(tmp_path):
    with claim_devices(1, ["0"], tmp_path):
        with pytest.raises(DevicesBusy, match="1 GPU"):
            with claim_devices(1, ["0"], tmp_path, timeout=0.3, poll=0.05):
                pass


def test_more_gpus_than_the_pool_fails_at_once_naming_the_pool(tmp_path):
    with pytest.raises(ValueError, match=r"3 GPU\(s\) requested but only 2 available: \['0', '1'\]"):
        with claim_devices(3, ["0", "1"], tmp_path):
            pass


def test_cpu_job_sees_no_gpu_and_the_environment_is_restored(tmp_path):
    env = {VISIBLE: "0,1"}
    with gpu_placement(0, env=env, lock_dir=tmp_path) as visible:
        assert visible == env[VISIBLE] == ""
    assert env == {VISIBLE: "0,1"}


def test_gpu_job_claims_from_the_user_narrowed_pool(tmp_path):
    env, other = {VISIBLE: "2,3"}, {VISIBLE: "2,3"}
    with gpu_placement(1, env=env, lock_dir=tmp_path) as first, gpu_placement(1, env=other, lock_dir=tmp_path) as second:
        assert {first, second} == {"2", "3"}
    assert env == other == {VISIBLE: "2,3"}


def test_a_stage_run_by_hand_keeps_the_users_devices(tmp_path):
    env = {VISIBLE: "1"}
    with gpu_placement(None, env=env, lock_dir=tmp_path) as visible:
        assert visible is None and env == {VISIBLE: "1"}


def test_slurm_placement_is_left_alone(tmp_path):
    env = {"SLURM_JOB_ID": "42", VISIBLE: "0"}
    with gpu_placement(1, env=env, lock_dir=tmp_path) as visible:
        assert visible is None and env[VISIBLE] == "0"
    assert not any(tmp_path.iterdir())


def test_machine_devices_come_from_device_nodes_without_cuda(tmp_path):
    for name in ("nvidia0", "nvidia1", "nvidia10", "nvidiactl", "nvidia-uvm"):
        (tmp_path / name).touch()
    assert machine_devices({}, dev_dir=tmp_path) == ["0", "1", "10"]
    assert machine_devices({VISIBLE: "3,1"}, dev_dir=tmp_path) == ["3", "1"]
    assert machine_devices({VISIBLE: ""}, dev_dir=tmp_path) == []
