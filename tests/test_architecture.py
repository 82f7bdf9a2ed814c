"""docs/architecture.md stays true: its module map names every module of the package and only modules that exist,
each row's public surface is really in that module, and the repository paths it cites exist."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROW = re.compile(r"^\| `(\w+)` \| (.+?) \| (.+?) \|$", re.M)


def module_map(repo_root: Path) -> dict[str, list[str]]:
    """module -> the names of its public-surface column."""
    text = (repo_root / "docs" / "architecture.md").read_text()
    section = text.split("## Module map", 1)[1].split("\n## ", 1)[0]
    return {module: re.findall(r"`(\w+)`", surface) for module, _, surface in ROW.findall(section)}


def test_the_module_map_names_exactly_the_modules_of_the_package(repo_root):
    named = set(module_map(repo_root))
    present = {path.stem for path in (repo_root / "src" / "kalmanrl").glob("*.py")} - {"__init__"}
    assert not named - present, f"docs/architecture.md names modules that do not exist: {sorted(named - present)}"
    assert not present - named, f"modules missing from docs/architecture.md's module map: {sorted(present - named)}"


def test_every_public_name_is_where_the_map_says(repo_root):
    misplaced = []
    for module, names in module_map(repo_root).items():
        loaded = importlib.import_module(f"kalmanrl.{module}")
        misplaced += [f"{module}.{name}" for name in names if not hasattr(loaded, name)]
    assert not misplaced, f"docs/architecture.md places these in the wrong module: {misplaced}"


@pytest.mark.parametrize("top", ["workflow", "profiles", "containers", "envs"])
def test_repository_paths_it_cites_exist(repo_root, top):
    text = (repo_root / "docs" / "architecture.md").read_text()
    cited = set(re.findall(rf"`({top}/[^`\s]*)`", text))
    missing = [path for path in cited if not list(repo_root.glob(path.rstrip("/")))]
    assert not missing, f"docs/architecture.md cites missing paths: {missing}"


def test_the_default_configs_run_time_is_the_readmes_measured_one(repo_root):
    """config/config.yaml quotes the README's measurement instead of a guess of its own."""
    measured = re.search(r"\*\*(\d+ min \d+ s)\*\*", (repo_root / "README.md").read_text()).group(1)
    header = (repo_root / "config" / "config.yaml").read_text().splitlines()[0]
    assert f"(README: {measured})" in header, header
