"""`plugins:` make a user's registered parts nameable in a config: the README's `rloo` example runs as written, through
config validation, `kalmanrl settings`, a job's own settings parsing and a `snakemake -n`; a bad name in a plugin
config is refused by the dry run, naming the key."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kalmanrl.configuration.config import ConfigError, import_plugins, stage_settings, validate_config


def readme_example(repo_root: Path) -> tuple[str, dict]:
    """The README's estimator code and the config it says to add, exactly as written there."""
    readme = (repo_root / "README.md").read_text()
    section = readme.split("Adding one is a single decorated function", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    after = section.split("```", 2)[2]
    plugins, algorithms = (yaml.safe_load(s) for s in re.search(r"then `(plugins: [^`]+)` and `(algorithms: [^`]+)`",
                                                                after).groups())
    return code, {**plugins, **algorithms}


@pytest.fixture
def rloo_dir(tmp_path, repo_root, monkeypatch):
    code, config = readme_example(repo_root)
    (tmp_path / "rloo.py").write_text(code)
    (tmp_path / "my.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield tmp_path, config
    from kalmanrl.rl import algorithms

    if "rloo" in algorithms.ADVANTAGE_ESTIMATORS:
        algorithms.ADVANTAGE_ESTIMATORS.unregister("rloo")
    sys.modules.pop("rloo", None)


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=600)


def test_readme_example_names_a_plugin_and_its_estimator(repo_root):
    code, config = readme_example(repo_root)
    assert '@register_advantage_estimator("rloo")' in code
    assert config == {"plugins": ["rloo.py"], "algorithms": {"rloo": {"advantage": "rloo"}}}


def test_readme_rloo_validates_and_computes_leave_one_out(rloo_dir):
    import torch

    from kalmanrl.rl.algorithms import get_advantage_estimator

    workdir, config = rloo_dir
    validated = validate_config(config)
    assert validated["algorithms"]["rloo"]["advantage"] == "rloo"
    advantages = get_advantage_estimator("rloo")(torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 4.0]]))
    torch.testing.assert_close(advantages, torch.tensor([[1.0, -0.5, -0.5], [-1.5, -1.5, 3.0]]))
    validate_config(config)  # a second import (Snakefile, then a job) registers nothing twice
    settings = stage_settings(validated, "train", model="tiny", task="arithmetic_easy", algorithm="rloo", seed="0")
    assert settings["plugins"] == ["rloo.py"]
    assert "plugins" not in stage_settings(validate_config({}), "train", model="tiny", task="arithmetic_easy",
                                           algorithm="grpo", seed="0")  # no plugins: settings (and results) unchanged


def test_a_job_imports_the_plugins_its_settings_name(rloo_dir):
    """`kalmanrl settings` prints what the rule passes; `kalmanrl <stage>` parses it, importing the plugin first."""
    workdir, _ = rloo_dir
    printed = run(["kalmanrl", "settings", "train", "--configfile", "my.yaml", "model=tiny", "task=arithmetic_easy",
                   "algorithm=rloo", "seed=0"], workdir)
    assert printed.returncode == 0, printed.stderr
    (workdir / "settings.json").write_text(printed.stdout)
    job = run([sys.executable, "-c", "from kalmanrl.configuration.config import parse_settings\n"
               "from kalmanrl.rl.algorithms import get_advantage_estimator\nimport torch\n"
               "s = parse_settings('@settings.json', 'train')\n"
               "print(get_advantage_estimator(s['algorithm']['advantage'])(torch.tensor([[2.0, 0.0]])).tolist())"],
              workdir)
    assert job.returncode == 0, job.stderr
    assert json.loads(job.stdout) == [[2.0, -2.0]]
    without = run([sys.executable, "-c", "from kalmanrl.configuration.config import parse_settings\n"
                   "import json, sys\ns = json.load(open('settings.json')); del s['plugins']\n"
                   "from kalmanrl.rl.algorithms import get_advantage_estimator\n"
                   "get_advantage_estimator(s['algorithm']['advantage'])"], workdir)
    assert "unknown advantage estimator 'rloo'" in without.stderr  # the plugins list is what makes it known


def test_snakemake_dry_run_with_the_plugin_and_refusing_a_bad_name(rloo_dir, repo_root):
    workdir, config = rloo_dir
    snakemake = ["snakemake", "-n", "-s", str(repo_root / "Snakefile"), "-d", str(workdir)]
    result = run([*snakemake, "--configfile", str(workdir / "my.yaml")], workdir)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "runs/tiny/arithmetic_easy/rloo/seed0/metrics.parquet" in result.stdout
    (workdir / "bad.yaml").write_text(yaml.safe_dump({**config, "algorithms": {"foo": {"advantage": "nope"}}}))
    result = run([*snakemake, "--configfile", str(workdir / "bad.yaml")], workdir)
    assert result.returncode != 0
    assert ("config.algorithms.foo.advantage: unknown advantage estimator 'nope' (known: grpo, krpo, rloo)"
            in result.stdout + result.stderr)


def test_plugins_fail_naming_the_entry(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    with pytest.raises(ConfigError, match=r"config\.plugins\[0\]: no file 'missing\.py'"):
        import_plugins(["missing.py"])
    with pytest.raises(ConfigError, match=r"config\.plugins\[1\]: importing plugin 'no_such_module' failed: "
                                          r"ModuleNotFoundError"):
        import_plugins(["json", "no_such_module"])
    (tmp_path / "json.py").write_text("")
    with pytest.raises(ConfigError, match=r"config\.plugins\[0\]: plugin 'json\.py' is shadowed by the module 'json'"):
        import_plugins(["json.py"])
    (tmp_path / "clash.py").write_text("from kalmanrl.data.rewards import register_reward\n"
                                       "register_reward('math_verify')(object)\n")
    with pytest.raises(ConfigError, match=r"clash\.py' failed: DuplicateNameError: reward 'math_verify' is already"):
        import_plugins(["clash.py"])
    sys.modules.pop("clash", None)


def test_a_dotted_plugin_is_imported_from_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    (tmp_path / "mypkg" / "templates.py").write_text(
        "from kalmanrl.data.prompts import PromptTemplate, register_template\n"
        "register_template(PromptTemplate('plain_test', '', lambda answer, solution: answer))\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    from kalmanrl.data import prompts

    try:
        config = validate_config({"plugins": ["mypkg.templates"],
                                  "datasets": {"arithmetic_easy": {"loader": "arithmetic",
                                                                   "params": {"difficulty": "easy"},
                                                                   "template": "plain_test"}}})
        assert config["datasets"]["arithmetic_easy"]["template"] == "plain_test"
    finally:
        prompts.TEMPLATES.unregister("plain_test")
        for name in ("mypkg.templates", "mypkg"):
            sys.modules.pop(name, None)
