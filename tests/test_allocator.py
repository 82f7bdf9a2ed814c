"""`keep_freed_memory`: after it, blocks a step frees are reused instead of being unmapped and faulted in again;
a user's own glibc malloc settings are left alone; every workflow stage of the CLI sets it up."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from job_settings import job_settings
from kalmanrl.runtime.cpu import GLIBC_SETTINGS, keep_freed_memory

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")

# Page faults per round of three 16 MiB tensors freed together (a step's temporaries, in miniature), with glibc's
# defaults and then after keep_freed_memory(), in one fresh process.
ROUNDS = r"""
import resource, torch
from kalmanrl.runtime.cpu import keep_freed_memory

def faults_per_round(rounds=5):
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(rounds):
        blocks = [torch.ones(4 << 20) for _ in range(3)]
        del blocks
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start) / rounds

faults_per_round(2)
default = faults_per_round()
assert keep_freed_memory()
faults_per_round(2)
print(default, faults_per_round())
"""


def test_freed_blocks_are_reused_instead_of_faulted_in_again():
    glibc_defaults = {k: v for k, v in os.environ.items() if k not in GLIBC_SETTINGS}
    result = subprocess.run([sys.executable, "-c", ROUNDS], capture_output=True, text=True,
                            env={**glibc_defaults, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    default, kept = map(float, result.stdout.split())
    assert default > 1000, "glibc's defaults no longer hand these blocks back: this test cannot tell anything"
    assert kept < default / 100


@pytest.mark.parametrize("setting", GLIBC_SETTINGS)
def test_a_users_own_malloc_settings_are_left_alone(setting):
    assert keep_freed_memory({setting: "1"}) is False


def test_every_workflow_stage_keeps_freed_memory(monkeypatch, tmp_path):
    from kalmanrl import cli

    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append("keep_freed_memory"))
    monkeypatch.setattr(cli, "pin_cpu_dispatch", lambda: calls.append("pin_cpu_dispatch"))
    monkeypatch.setattr(cli, "cmd_data", lambda args: calls.append("data"))
    assert cli.main(["data", "--settings", job_settings("data"), "--out", str(tmp_path / "data.parquet")]) == 0
    assert calls == ["pin_cpu_dispatch", "keep_freed_memory", "data"]
    calls.clear()
    monkeypatch.setattr(cli, "cmd_compare_summary", lambda args: calls.append("compare-summary"))
    assert cli.main(["compare-summary", "a.parquet", "b.json"]) == 0
    assert calls == ["compare-summary"]  # not a workflow stage: the process is left as it is
