"""The CPU image, built and run: `containers/build.sh cpu` builds it (a debootstrap base, the CPU lock, gcc), and the
smoke workflow (one algorithm's part of it) runs inside it and reproduces its rows of the host's smoke run exactly
(the same numbers as on the host).

Needs root, Docker's engine (started here, and stopped by PID afterwards, when it is installed but not running) and
debootstrap; it skips, saying which is missing, elsewhere. Layers are cached by the engine: after the first build
only the layers of what changed are rebuilt (the package's own code: seconds)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

from kalmanrl.reporting.expected import expected_rows
from smoke_runs import REPO, smoke_workdir

pytestmark = pytest.mark.slow

IMAGE = "kalmanrl-cpu:test"


def _engine_up() -> bool:
    return subprocess.run(["docker", "info"], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def docker_engine(tmp_path_factory):
    """A reachable Docker engine: the running one, or one started here (stopped by PID at the end)."""
    if os.environ.get("KALMANRL_CI_DOCKER") == "0":
        pytest.skip("KALMANRL_CI_DOCKER=0: the image test is switched off")
    if shutil.which("docker") is None:
        pytest.skip("no docker client (apt-get install docker.io)")
    if _engine_up():
        yield
        return
    if os.geteuid() != 0 or shutil.which("dockerd") is None:
        pytest.skip("no Docker engine running, and it cannot be started here (needs root and dockerd)")
    log = tmp_path_factory.mktemp("dockerd") / "dockerd.log"
    with log.open("w") as out:
        daemon = subprocess.Popen(["dockerd"], stdout=out, stderr=subprocess.STDOUT)
    try:
        for _ in range(60):
            if _engine_up() or daemon.poll() is not None:
                break
            time.sleep(1)
        if not _engine_up():
            pytest.skip(f"dockerd could not start here (an unprivileged container?): {log.read_text()[-1500:]}")
        yield
    finally:
        daemon.terminate()
        daemon.wait(timeout=60)


@pytest.fixture(scope="module")
def cpu_image(docker_engine) -> str:
    """The CPU image of this checkout, built without any image registry."""
    if shutil.which("debootstrap") is None:
        pytest.skip("debootstrap is not installed (apt-get install debootstrap): no base image can be made")
    started = time.monotonic()
    result = subprocess.run([str(REPO / "containers" / "build.sh"), "cpu", IMAGE], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    print(f"image build: {time.monotonic() - started:.0f} s")
    return IMAGE


def docker_run(image: str, *command: str, volumes: dict[Path, str] | None = None) -> subprocess.CompletedProcess:
    mounts = [arg for host, target in (volumes or {}).items() for arg in ("-v", f"{host}:{target}")]
    return subprocess.run(["docker", "run", "--rm", *mounts, "-w", "/smoke", image, *command],
                          capture_output=True, text=True)


def test_the_image_has_a_compiler_and_its_lock(cpu_image):
    """gcc is there (Triton builds kernels at run time), and the installed packages match the lock it names."""
    result = docker_run(cpu_image, "gcc", "--version")
    assert result.returncode == 0 and "gcc" in result.stdout, result.stderr
    check = ("from kalmanrl.runtime.provenance import lock_status; s = lock_status(); "
             "print(s['lock'], s['lock_matches'], s['lock_mismatches'])")
    result = docker_run(cpu_image, "python", "-c", check)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[:2] == ["cpu.txt", "True"], result.stdout


# The part of the smoke workflow run in the image: every stage, one algorithm (fewer jobs; the CI budget is tight).
IMAGE_ALGORITHMS = ["krpo"]


def test_the_smoke_workflow_runs_in_the_image_and_gives_the_hosts_numbers(cpu_image, smoke_run, tmp_path):
    """The smoke workflow for one algorithm, in the image: its summary has exactly the host's smoke run's rows of
    that algorithm and of the warm start (metrics and model hashes), whatever machine class the host is."""
    workdir = smoke_workdir(tmp_path / "work", IMAGE_ALGORITHMS, data={"local_dir": "/repo/tests/data"})
    volumes = {REPO: "/repo:ro", workdir: "/smoke"}
    started = time.monotonic()
    result = docker_run(cpu_image, "snakemake", "-s", "/repo/Snakefile", "-d", "/smoke", "--cores", "2",
                        volumes=volumes)
    print(f"smoke workflow in the image: {time.monotonic() - started:.0f} s")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    expected = expected_rows(pd.read_parquet(smoke_run / "results" / "report" / "summary.parquet"))
    expected["rows"] = [row for row in expected["rows"] if row["algorithm"] in ("sft", *IMAGE_ALGORITHMS)]
    assert expected_rows(pd.read_parquet(workdir / "results" / "report" / "summary.parquet")) == expected
