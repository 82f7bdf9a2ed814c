"""docs/architecture.md stays true: its module map names every module of the package and only modules that exist,
each row's public surface is really in that module, the repository paths it cites exist, and no module imports from
a layer after its own in the order the document gives (lowest first)."""

from __future__ import annotations

import ast
import importlib
import re
import shutil
from pathlib import Path

import pytest

ROW = re.compile(r"^\| `([\w.]+)` \| (.+?) \| (.+?) \|$", re.M)
TOP = "cli"  # above every layer: may import any


def section(repo_root: Path, title: str) -> str:
    text = (repo_root / "docs" / "architecture.md").read_text()
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def module_map(repo_root: Path) -> dict[str, list[str]]:
    """module (dotted, below kalmanrl) -> the names of its public-surface column."""
    rows = ROW.findall(section(repo_root, "Module map"))
    return {module: re.findall(r"`(\w+)`", surface) for module, _, surface in rows}


def layer_order(repo_root: Path) -> list[str]:
    """The layer folders, lowest first, as the document's numbered list gives them."""
    return re.findall(r"^\d+\. `(\w+)`", section(repo_root, "Layers"), re.M)


def modules(package: Path) -> list[str]:
    """Every module of the package, dotted below it (`core.io`, `cli`), `__init__` files left out."""
    return sorted(".".join(p.relative_to(package).with_suffix("").parts) for p in package.rglob("*.py")
                  if p.name != "__init__.py")


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, dotted name below kalmanrl) of every kalmanrl import in a file: top-level, inside functions and under
    TYPE_CHECKING alike, since each is a dependency."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name.removeprefix("kalmanrl.")) for a in node.names
                      if a.name.startswith("kalmanrl.")]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("kalmanrl"):
            base = node.module.removeprefix("kalmanrl").lstrip(".")
            found += [(node.lineno, f"{base}.{a.name}".lstrip(".")) for a in node.names]
    return found


def upward_imports(package: Path, order: list[str]) -> list[str]:
    """"file:line imports X" for every import of a module in a higher layer than the importer's (`order`: lowest
    first); `cli` is above them all, the package's own `__init__` below them all."""
    rank = {layer: i for i, layer in enumerate(order)} | {TOP: len(order)}
    found = []
    for path in sorted(package.rglob("*.py")):
        mine = rank.get(path.relative_to(package).with_suffix("").parts[0], -1)  # the package's __init__: -1
        for line, name in imported_modules(path):
            theirs = rank.get(name.split(".")[0])
            if theirs is not None and theirs > mine:
                found.append(f"{path.relative_to(package.parent)}:{line} imports kalmanrl.{name}")
    return found


def test_the_layers_are_exactly_the_packages_folders(repo_root):
    package = repo_root / "src" / "kalmanrl"
    folders = sorted(p.name for p in package.iterdir() if (p / "__init__.py").is_file())
    assert sorted(layer_order(repo_root)) == folders
    loose = [m for m in modules(package) if "." not in m and m != TOP]
    assert not loose, f"modules outside every layer folder: {loose}"


def test_no_module_imports_from_a_higher_layer(repo_root):
    assert not upward_imports(repo_root / "src" / "kalmanrl", layer_order(repo_root))


def test_an_upward_import_is_caught_naming_the_file_and_line(repo_root, tmp_path):
    """The check itself can fail: in a copy of the package, a lazy import of the trainer inside a function of
    `core.io` and a top-level import of the settings in `policy.batch` are both reported."""
    copy = tmp_path / "kalmanrl"
    shutil.copytree(repo_root / "src" / "kalmanrl", copy, ignore=shutil.ignore_patterns("__pycache__", "*.yaml"))
    io = copy / "core" / "io.py"
    io.write_text(io.read_text() + "\n\ndef late():\n    from kalmanrl.jobs import trainer\n    return trainer\n")
    (copy / "policy" / "batch.py").write_text("from kalmanrl.configuration.settings import Train\n")
    late = io.read_text().count("\n") - 1
    assert upward_imports(copy, layer_order(repo_root)) == [
        f"kalmanrl/core/io.py:{late} imports kalmanrl.jobs.trainer",
        "kalmanrl/policy/batch.py:1 imports kalmanrl.configuration.settings.Train"]


def test_the_module_map_names_exactly_the_modules_of_the_package(repo_root):
    named = set(module_map(repo_root))
    present = set(modules(repo_root / "src" / "kalmanrl"))
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
