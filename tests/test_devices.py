"""Devices: concurrent GPU jobs on one machine get disjoint CUDA_VISIBLE_DEVICES (on a fake device pool), devices are
named by UUID from NVML / nvidia-smi enumerations (fake ones here: this machine has no GPU), a stage given GPUs that
CUDA cannot provide refuses to run on the CPU, and a local run that could not give every GPU job its devices is
refused up front."""

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from kalmanrl.runtime.devices import (
    VISIBLE,
    CudaUnavailable,
    DevicesBusy,
    Gpu,
    claim_devices,
    cuda_unavailable_message,
    gpu_placement,
    local_gpu_problem,
    machine_devices,
    parse_nvidia_smi_list,
    resolve_device,
    visible_pool,
)

REPO = Path(__file__).resolve().parents[1]
FOUR = ["0", "1", "2", "3"]


def start_job(count: int, lock_dir: Path, devices: list[str]) -> tuple[subprocess.Popen, str]:
    """A separate process that claims `count` devices, prints its CUDA_VISIBLE_DEVICES, and holds them until its
    stdin closes (or it is killed)."""
    code = textwrap.dedent(f"""
        import os, sys
        from pathlib import Path
        from kalmanrl.runtime.devices import gpu_placement
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
    with (gpu_placement(1, env=env, lock_dir=tmp_path) as first,
          gpu_placement(1, env=other, lock_dir=tmp_path) as second):
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


# A host's `nvidia-smi -L`: GPU 1 is in MIG mode with two instances, which CUDA sees instead of the whole GPU.
HOST_SMI = """\
GPU 0: NVIDIA A100-SXM4-80GB (UUID: GPU-aaaaaaaa-0000-0000-0000-000000000000)
GPU 1: NVIDIA A100-SXM4-80GB (UUID: GPU-bbbbbbbb-0000-0000-0000-000000000000)
  MIG 3g.40gb     Device  0: (UUID: MIG-cccccccc-0000-0000-0000-000000000000)
  MIG 3g.40gb     Device  1: (UUID: MIG-dddddddd-0000-0000-0000-000000000000)
GPU 2: NVIDIA A100-SXM4-80GB (UUID: GPU-eeeeeeee-0000-0000-0000-000000000000)
GPU 3: NVIDIA A100-SXM4-80GB (UUID: GPU-ffffffff-0000-0000-0000-000000000000)
"""
# The same host's GPUs 2 and 3 as NVML shows them inside a container given only those: numbered from 0.
CONTAINER = [Gpu("GPU-eeeeeeee-0000-0000-0000-000000000000", "0", "A100"),
             Gpu("GPU-ffffffff-0000-0000-0000-000000000000", "1", "A100")]


def test_nvidia_smi_listing_gives_whole_gpus_and_mig_instances_in_place_of_their_gpu():
    gpus = parse_nvidia_smi_list(HOST_SMI)
    assert [(g.index, g.uuid[:12]) for g in gpus] == [
        ("0", "GPU-aaaaaaaa"), ("1:0", "MIG-cccccccc"), ("1:1", "MIG-dddddddd"), ("2", "GPU-eeeeeeee"),
        ("3", "GPU-ffffffff")]
    assert parse_nvidia_smi_list("") == []


def test_in_a_container_jobs_get_uuids_never_the_hosts_device_numbers(tmp_path):
    """The old pool took numbers from /dev/nvidia2 and /dev/nvidia3; CUDA_VISIBLE_DEVICES=2 inside the container
    hides every device, since CUDA numbers the two it is shown 0 and 1."""
    env: dict[str, str] = {}
    pool = machine_devices(env, gpus=CONTAINER)
    assert pool == [g.uuid for g in CONTAINER]
    with gpu_placement(2, env=env, lock_dir=tmp_path, devices=pool) as visible:
        assert visible.split(",") == pool  # CUDA numbers them cuda:0 and cuda:1, in this order


def test_user_narrowed_devices_map_by_cuda_index_or_uuid():
    assert visible_pool(CONTAINER, "1") == [CONTAINER[1].uuid]
    assert visible_pool(CONTAINER, "GPU-ffffffff,0") == [CONTAINER[1].uuid, CONTAINER[0].uuid]
    assert visible_pool(CONTAINER, "") == []
    mig = parse_nvidia_smi_list(HOST_SMI)
    assert visible_pool(mig, "MIG-dddddddd-0000-0000-0000-000000000000") == [mig[2].uuid]


def test_an_index_names_the_gpu_of_that_index_also_beside_a_gpu_in_mig_mode():
    """GPU 1's two MIG instances stand in its place in the list: index 2 took GPU 1's second instance, not GPU 2."""
    mig = parse_nvidia_smi_list(HOST_SMI)
    assert visible_pool(mig, "2,3,0") == ["GPU-eeeeeeee-0000-0000-0000-000000000000",
                                          "GPU-ffffffff-0000-0000-0000-000000000000",
                                          "GPU-aaaaaaaa-0000-0000-0000-000000000000"]
    with pytest.raises(ValueError, match="'1' names more than one device"):
        visible_pool(mig, "1")


@pytest.mark.parametrize("visible, problem", [
    ("2", "'2' names no device"),                     # a host number inside the container
    ("GPU-aaaaaaaa", "'GPU-aaaaaaaa' names no device"),  # a GPU the container was not given
    ("GPU-", "names more than one device"),
])
def test_a_claimed_device_that_is_not_visible_fails_naming_the_visible_ones(visible, problem):
    with pytest.raises(ValueError, match=problem) as err:
        visible_pool(CONTAINER, visible)
    assert CONTAINER[0].uuid in str(err.value) and "numbers the visible devices from 0" in str(err.value)


def test_a_gpu_in_mig_mode_cannot_be_claimed_whole():
    with pytest.raises(ValueError, match="'GPU-bbbbbbbb' names no device"):
        visible_pool(parse_nvidia_smi_list(HOST_SMI), "GPU-bbbbbbbb")


@pytest.mark.parametrize("gpus, visible, repeated", [
    (None, "0,0", "entry '0' names a device an earlier entry ('0') names"),  # no enumeration: taken as given
    (CONTAINER, "1,GPU-ffffffff", "entry 'GPU-ffffffff' names a device an earlier entry ('1') names"),
])
def test_a_device_named_twice_fails_the_claim_at_once_naming_the_entry(tmp_path, monkeypatch, gpus, visible,
                                                                       repeated):
    """The pool held the device twice, and a claim of both waited out its timeout for the lock it held itself."""
    monkeypatch.setattr("kalmanrl.runtime.devices.enumerate_gpus", lambda: gpus)
    start = time.monotonic()
    with pytest.raises(ValueError, match=re.escape(f"{VISIBLE}={visible!r}: {repeated}")):
        with gpu_placement(2, env={VISIBLE: visible}, lock_dir=tmp_path, timeout=20):
            pass
    assert time.monotonic() - start < 5


def test_without_nvml_or_nvidia_smi_the_users_devices_are_taken_as_given():
    assert visible_pool(None, "3,1") == ["3", "1"]
    assert visible_pool(None, None) == []


def test_this_machine_enumerates_its_devices_without_initialising_cuda():
    import torch

    from kalmanrl.runtime.devices import enumerate_gpus

    found = enumerate_gpus()
    if found is None:  # no NVML and no nvidia-smi (this CPU machine): nothing to hand out but what the user names
        assert machine_devices({}) == [] and machine_devices({VISIBLE: "0"}) == ["0"]
    else:
        assert machine_devices({}) == [g.uuid for g in found]
    assert not torch.cuda.is_initialized()


def test_stages_without_gpus_compute_on_the_cpu():
    assert resolve_device(0).type == "cpu"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a usable GPU")
def test_gpus_without_usable_cuda_raise_instead_of_falling_back_to_the_cpu():
    import torch

    assert resolve_device(None).type == "cpu"  # a stage run by hand without --gpus
    with pytest.raises(CudaUnavailable, match="2 GPU\\(s\\) requested") as err:
        resolve_device(2)
    assert torch.__version__ in str(err.value)
    if torch.version.cuda is None:
        assert "CPU-only build" in str(err.value)
    else:
        assert f"built for CUDA {torch.version.cuda}" in str(err.value)


def test_the_message_names_the_builds_cuda_version_and_the_driver_it_needs():
    message = cuda_unavailable_message(1, "2.13.0", "13.0", "12.4")
    assert "built for CUDA 13.0" in message and "Linux driver 580 or newer" in message
    assert "the driver here supports CUDA 12.4 at most" in message
    assert "no NVIDIA driver was found" in cuda_unavailable_message(1, "2.13.0", "12.8", None)


def test_every_stage_given_gpus_refuses_without_cuda(tiny_model_dir, arithmetic_parquet, tmp_path):
    """sft, train and evaluate, as `kalmanrl <stage> --gpus 1` calls them, on this machine (no usable CUDA)."""
    import torch

    from kalmanrl.configuration.config import stage_settings, validate_config
    from kalmanrl.configuration.settings import Sft
    from kalmanrl.data.prompts import get_template
    from kalmanrl.jobs.evaluate import evaluate
    from kalmanrl.jobs.sft import run_sft
    from kalmanrl.jobs.trainer import train

    if torch.cuda.is_available():
        pytest.skip("this machine has a usable GPU")
    config = validate_config({"datasets": {"arith": {"loader": "arithmetic", "template": "krpo"}},
                              "tasks": ["arith"], "benchmarks": ["arith"]})
    sft = stage_settings(config, "sft", model="tiny", task="arith")
    stages = {
        "sft": lambda: run_sft(tiny_model_dir, arithmetic_parquet, tmp_path / "sft",
                               template=get_template(sft["template"]), settings=Sft(**sft["sft"]), seed=0,
                               dtype=sft["dtype"], gpus=1),
        "train": lambda: train(tiny_model_dir, arithmetic_parquet, tmp_path / "run", gpus=1,
                               settings=stage_settings(config, "train", model="tiny", task="arith", algorithm="grpo",
                                                       seed="0")),
        "evaluate": lambda: evaluate(tiny_model_dir, arithmetic_parquet, out_details=tmp_path / "d.parquet",
                                     out_summary=tmp_path / "s.parquet", gpus=1,
                                     settings=stage_settings(config, "evaluate", model="tiny", task="arith",
                                                             algorithm="sft", benchmark="arith")),
    }
    for run in stages.values():
        with pytest.raises(CudaUnavailable, match="1 GPU"):
            run()
    assert not any(tmp_path.iterdir()), "a stage wrote output before refusing"


def test_a_local_run_that_could_not_place_its_gpu_jobs_is_refused():
    assert local_gpu_problem({}, None, 0) is None  # no stage needs a GPU
    assert "--resources gpu=4" in local_gpu_problem({"train": 1, "evaluate": 1}, None, 4)
    assert local_gpu_problem({"train": 1}, 4, 4) is None
    assert "--resources gpu=2" in local_gpu_problem({"train": 1}, 8, 2)
    assert "shows 0" in local_gpu_problem({"train": 1}, 1, 0)
    assert "a train job needs 2 GPU(s)" in local_gpu_problem({"train": 2, "evaluate": 1}, None, 1)


class FakeNvml:
    """A stand-in for nvidia-ml-py's `pynvml` (no driver here) with the host of HOST_SMI: GPU 1 in MIG mode with
    instances in slots 0 and 2 (slot 1 empty), GPU 0 without MIG support."""

    NVML_DEVICE_MIG_ENABLE = 1

    class NVMLError(Exception):
        pass

    def __init__(self):
        self.gpus = parse_nvidia_smi_list(HOST_SMI)
        self.open = 0

    def nvmlInit(self):
        self.open += 1

    def nvmlShutdown(self):
        self.open -= 1

    def nvmlDeviceGetCount(self):
        return 4

    def nvmlDeviceGetHandleByIndex(self, i):
        return ("gpu", i)

    def nvmlDeviceGetUUID(self, handle):
        uuids = {("gpu", 0): "GPU-aaaaaaaa", ("gpu", 1): "GPU-bbbbbbbb", ("gpu", 2): "GPU-eeeeeeee",
                 ("gpu", 3): "GPU-ffffffff", ("mig", 0): "MIG-cccccccc", ("mig", 2): "MIG-dddddddd"}
        return uuids[handle].encode()  # older bindings return bytes

    def nvmlDeviceGetName(self, handle):
        return "NVIDIA A100-SXM4-80GB"

    def nvmlDeviceGetMigMode(self, handle):
        if handle == ("gpu", 0):
            raise self.NVMLError("Not Supported")
        return (1 if handle == ("gpu", 1) else 0, 0)

    def nvmlDeviceGetMaxMigDeviceCount(self, handle):
        return 3

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle, j):
        if j == 1:
            raise self.NVMLError("Not Found")
        return ("mig", j)


def test_nvml_enumeration_lists_whole_gpus_and_the_mig_instances_of_gpus_in_mig_mode(monkeypatch):
    from kalmanrl.runtime.devices import enumerate_gpus, nvml_gpus

    fake = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    found = nvml_gpus()
    assert [(g.index, g.uuid) for g in found] == [
        ("0", "GPU-aaaaaaaa"), ("1:0", "MIG-cccccccc"), ("1:2", "MIG-dddddddd"), ("2", "GPU-eeeeeeee"),
        ("3", "GPU-ffffffff")]
    assert fake.open == 0, "NVML was left initialised"
    assert enumerate_gpus() == found
