"""The CPU dispatch pin: which kernels torch, oneDNN and MKL use decides a training run's numbers, and the CLI fixes
that choice for every stage so that it no longer depends on what the host (or the caller's environment) offers."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from kalmanrl.runtime.cpu import DISPATCH_ENV, LEVELS, NUMPY_AVX512, DispatchError, cpu_flags, pin_cpu_dispatch

HOST_HAS_AVX2 = {"avx2", "fma"} <= cpu_flags()

# A few AdamW steps of a small Qwen2 through the CLI's own pin; prints torch's capability and a hash of the weights.
TRAIN = r"""
import hashlib, sys
from kalmanrl.runtime.cpu import pin_cpu_dispatch
pin_cpu_dispatch()
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM
torch.manual_seed(0)
torch.set_num_threads(1)
model = Qwen2ForCausalLM(Qwen2Config(vocab_size=256, hidden_size=128, num_hidden_layers=1, num_attention_heads=4,
                                     num_key_value_heads=2, intermediate_size=256, max_position_embeddings=64))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
tokens = torch.randint(0, 256, (8, 32))
for _ in range(3):
    model(input_ids=tokens, labels=tokens).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
weights = b"".join(p.detach().numpy().tobytes() for p in model.parameters())
print(torch.backends.cpu.get_cpu_capability(), hashlib.sha256(weights).hexdigest())
"""


def train(*, wrapper: tuple[str, ...] = (), **env: str) -> subprocess.Popen:
    """TRAIN started in a fresh process (through `wrapper`, a command that runs the one after it) with `env` on top of
    a clean environment; `finish` reads its result."""
    clean = {k: v for k, v in os.environ.items() if k not in {DISPATCH_ENV, *LEVELS["avx2"][1]}}
    return subprocess.Popen([*wrapper, sys.executable, "-c", TRAIN], env={**clean, "OMP_NUM_THREADS": "1", **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> tuple[str, str]:
    """(torch's CPU capability, weight hash) printed by a TRAIN process."""
    out, err = process.communicate()
    assert process.returncode == 0, err[-3000:]
    capability, digest = out.split()
    return capability, digest


def test_each_level_sets_every_library_and_overrides_the_callers_values():
    environ = {"ATEN_CPU_CAPABILITY": "avx512", "MKL_CBWR": "AUTO"}
    assert pin_cpu_dispatch(environ, flags={"avx2", "fma"}, machine="x86_64") == "avx2"
    assert environ == {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "COMPATIBLE,STRICT",
                       "NPY_DISABLE_CPU_FEATURES": NUMPY_AVX512, DISPATCH_ENV: "avx2"}
    environ = {DISPATCH_ENV: "baseline"}
    pin_cpu_dispatch(environ, flags=set(), machine="x86_64")
    assert environ["ATEN_CPU_CAPABILITY"] == "default" and environ["MKL_CBWR"] == "COMPATIBLE,STRICT"
    environ = {DISPATCH_ENV: "native", "ATEN_CPU_CAPABILITY": "avx512"}
    pin_cpu_dispatch(environ, flags=set(), machine="x86_64")
    assert environ == {DISPATCH_ENV: "native", "ATEN_CPU_CAPABILITY": "avx512"}


def test_a_cpu_without_the_pinned_instructions_or_an_unknown_level_fails_loudly():
    with pytest.raises(DispatchError, match="lacks avx2, fma, .*=baseline"):
        pin_cpu_dispatch({}, flags={"sse4_2"}, machine="x86_64")
    with pytest.raises(DispatchError, match="unknown level; known: avx2, baseline, native"):
        pin_cpu_dispatch({DISPATCH_ENV: "avx512"}, flags=set(), machine="x86_64")
    assert pin_cpu_dispatch({}, flags=set(), machine="aarch64") == "native"  # nothing to pin off x86


@pytest.mark.slow
@pytest.mark.skipif(not HOST_HAS_AVX2, reason="this CPU has no AVX2, so the avx2 level cannot run here")
def test_results_depend_on_the_dispatch_until_it_is_pinned():
    """Unpinned, the host's kernels decide the weights: the host's best kernels (native: AVX2 or AVX-512, and MKL's
    own choice) and the same host restricted to the x86-64 baseline kernels (ATen `default`, MKL `COMPATIBLE`: what a
    CPU without AVX2 runs) train different weights. Pinned, the caller's or host's choice no longer matters: the
    `avx2` pin gives one result whatever the environment asks for, and so does the `baseline` pin, which is what
    every x86-64 CPU can run. Which capability the host has natively does not matter to the test."""
    started = {  # one process each, all at once: they are single-threaded and deterministic
        "native": train(**{DISPATCH_ENV: "native"}),
        "weaker host": train(**{DISPATCH_ENV: "native", "ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE"}),
        "pinned": train(),
        "pinned, caller asks for baseline": train(ATEN_CPU_CAPABILITY="default", MKL_CBWR="COMPATIBLE",
                                                  ONEDNN_MAX_CPU_ISA="SSE41"),
        "pinned, caller asks for MKL's AVX2 branch": train(MKL_CBWR="AVX2"),
        "MKL's AVX2 branch (Intel only)": train(**{DISPATCH_ENV: "native", **LEVELS["avx2"][1], "MKL_CBWR": "AVX2"}),
        "baseline": train(**{DISPATCH_ENV: "baseline"}),
        "baseline, caller asks for avx2": train(**{DISPATCH_ENV: "baseline", "ATEN_CPU_CAPABILITY": "avx2",
                                                   "MKL_CBWR": "AVX2"}),
    }
    result = {name: finish(process) for name, process in started.items()}
    native, weaker_host = result["native"], result["weaker host"]
    assert native[0] in ("AVX2", "AVX512") and weaker_host[0] == "DEFAULT"
    assert native[1] != weaker_host[1], "the dispatch no longer changes results: this test cannot tell anything"

    pinned = {result[name] for name in result if name.startswith("pinned")}
    assert len(pinned) == 1 and next(iter(pinned))[0] == "AVX2"
    baseline = {result["baseline"], result["baseline, caller asks for avx2"]}
    assert len(baseline) == 1 and next(iter(baseline))[0] == "DEFAULT"
    assert pinned != baseline
    # MKL is on the path: its AVX2 branch (the same on Intel CPUs only; others run its AUTO branch) trains other
    # weights than the vendor-neutral COMPATIBLE branch the pin sets.
    assert result["MKL's AVX2 branch (Intel only)"][1] != next(iter(pinned))[1]


def test_every_pinned_level_uses_mkls_vendor_neutral_branch():
    """MKL documents only its COMPATIBLE branch as giving the same results on Intel and other vendors' CPUs."""
    for level, (_, variables) in LEVELS.items():
        if variables:
            assert variables["MKL_CBWR"] == "COMPATIBLE,STRICT", level


# benchmarks/other_vendor.py runs the command after it as on the other vendor's CPU.
OTHER_VENDOR = (sys.executable, str(Path(__file__).resolve().parents[1] / "benchmarks" / "other_vendor.py"))


def other_vendor() -> tuple[str, ...]:
    """The command prefix of the closest imitation of the other vendor's CPU this machine allows: every library seeing
    an Intel CPU (CPUID emulation), else MKL alone taking the CPU for the other vendor's; the test is skipped, with
    the script's reasons, where neither can be made to work (it exits 3 then)."""
    reasons = []
    for mode in ((), ("--mkl-only",)):
        done = subprocess.run([*OTHER_VENDOR, *mode, "--", "true"], capture_output=True, text=True)
        if done.returncode == 0:
            return (*OTHER_VENDOR, *mode, "--")
        assert done.returncode == 3, done.stderr[-3000:]
        reasons.append(done.stderr.strip())
    pytest.skip("; ".join(reasons))


@pytest.mark.slow
@pytest.mark.skipif(not HOST_HAS_AVX2, reason="this CPU has no AVX2, so the avx2 level cannot run here")
def test_the_other_vendors_cpu_identity_changes_no_bit_under_the_pin():
    """Libraries choose code by the CPU's identity, MKL by its vendor, a part of the dispatch the pin cannot set by
    instruction set: the same machine seen as the other vendor's CPU (CPUID answering as an Intel CPU where the
    kernel allows it, else MKL alone taking the CPU for the other vendor's) trains the same weights under the pin.
    The script checks before it runs TRAIN that MKL follows the imitation (it runs its AVX2 branch only on what it
    takes for an Intel CPU), and the run's provenance records the vendor MKL took the CPU for."""
    prefix = other_vendor()
    started = {"this vendor": train(), "the other vendor": train(wrapper=prefix)}
    result = {name: finish(process) for name, process in started.items()}
    print(f"imitated with {shlex.join(prefix[1:])}")
    assert result["this vendor"] == result["the other vendor"], shlex.join(prefix[1:])
    assert result["this vendor"][0] == "AVX2"

    vendor = "from kalmanrl.runtime.provenance import machine; print(machine()['cpu_vendor'])"
    own = subprocess.run([sys.executable, "-c", vendor], capture_output=True, text=True, check=True).stdout.strip()
    other = subprocess.run([*prefix, sys.executable, "-c", vendor], capture_output=True, text=True,
                           check=True).stdout.strip()
    assert "MKL takes it for" not in own
    assert other.startswith(f"{own} (MKL takes it for ") and other != own
