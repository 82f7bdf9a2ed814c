"""Run a command on this machine as on another vendor's CPU: every library sees an Intel CPU on an AMD (or other
non-Intel) machine; or, with --mkl-only, MKL alone takes the CPU for the other vendor's, either way.

Libraries choose code by the CPU's identity as well as its instruction set: MKL by its vendor (README, "Same numbers
on any machine"), oneDNN, numpy and ATen's cpuinfo by what CPUID reports. Two ways to make one machine run the code
they give the other vendor's CPUs, each a small library preloaded (LD_PRELOAD) for the command and every process it
starts:
- CPUID (default): the process answers the CPUID instruction as an Intel CPU with this CPU's instruction set would
  (benchmarks/other_vendor.c). Needs Linux's CPUID faulting (/proc/cpuinfo flag cpuid_fault) and a non-Intel CPU.
- --mkl-only: MKL's one question, `mkl_serv_intel_cpu_true` (which torch's build exports), answered the other way:
  an Intel CPU on a non-Intel machine, a non-Intel one on an Intel machine. Runs anywhere.

    PYTHONPATH=src python benchmarks/other_vendor.py -- snakemake --cores all --configfile config/smoke.yaml
    kalmanrl compare-summary results/smoke/report/summary.parquet config/smoke.expected.json

`identical` shows that the run's numbers do not depend on what the libraries read of the CPU's identity. What it
cannot imitate is the hardware itself: instructions whose results are implementation-defined (rcpps, rsqrtps) give
this CPU's answers. Before the command starts the script checks that MKL follows the answer (asked for its AVX2
branch with MKL_CBWR=AVX2, MKL runs it on an Intel CPU and its AUTO branch on others; MKL_VERBOSE says which). The
rows such a run writes say so: their `cpu_vendor` reads e.g. "AuthenticAMD (MKL takes it for GenuineIntel)", a
machine class of its own for `kalmanrl compare-summary`. Needs a C compiler (`cc`, or $CC). Exits 3, without running
the command, where this machine cannot be made to look like the other vendor's.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from kalmanrl.runtime.cpu import cpu_flags

UNAVAILABLE = 3  # exit status where the other vendor cannot be imitated here
CPUID_SOURCE = Path(__file__).with_suffix(".c")
MKL_SOURCE = "int mkl_serv_intel_cpu_true(void) {{ return {answer}; }}\n"
# One single-precision matrix product through MKL: MKL_VERBOSE prints a line for it with the branch it ran (CNR:).
PROBE = "import torch; torch.set_num_threads(1); torch.ones(64, 64) @ torch.ones(64, 64)"


class Unavailable(Exception):
    """This machine cannot be made to look like the other vendor's in the way asked for."""


def takes_for_intel(env: dict[str, str]) -> bool:
    """Whether MKL, in a fresh process with `env`, takes the CPU for an Intel one: asked for its AVX2 branch, it runs
    that branch on an Intel CPU and its AUTO branch on any other (MKL's documentation of MKL_CBWR)."""
    env = {key: value for key, value in env.items() if not key.startswith("MKL_")}
    done = subprocess.run([sys.executable, "-c", PROBE], env={**env, "MKL_CBWR": "AVX2", "MKL_VERBOSE": "1"},
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise Unavailable(f"the MKL probe failed:\n{done.stderr[-2000:]}")
    branches = set(re.findall(r"CNR:(\w+)", done.stdout + done.stderr))
    if branches not in ({"AVX2"}, {"AUTO"}):
        raise Unavailable(f"asked for its AVX2 branch, MKL reported running {sorted(branches) or 'nothing'} "
                          "(expected AVX2 on an Intel CPU, AUTO on another): is torch built with MKL, and does this "
                          "CPU have AVX2?")
    return branches == {"AVX2"}


def compile_library(source: str, directory: Path) -> Path:
    """`source` (C) built into a shared library in `directory`."""
    path, library = directory / "other_vendor.c", directory / "libother_vendor.so"
    path.write_text(source)
    compiler = os.environ.get("CC", "cc")
    try:
        subprocess.run([compiler, "-shared", "-fPIC", "-O2", "-o", str(library), str(path), "-ldl"], check=True)
    except FileNotFoundError:
        raise Unavailable(f"no C compiler {compiler!r} to build the preloaded library (set $CC)") from None
    return library


def run(command: list[str], env: dict[str, str]) -> int:
    """Run `command` to its end and return its exit status; a SIGTERM or SIGHUP sent here goes on to it (Ctrl-C
    reaches it from the terminal), so that the library it preloads is removed only after it has ended."""
    child = subprocess.Popen(command, env=env)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, lambda received, _frame: child.send_signal(received))
    status = child.wait()
    return 128 - status if status < 0 else status


def prepare(mkl_only: bool, directory: Path) -> tuple[dict[str, str], str]:
    """The environment that makes the command see the other vendor's CPU, and what it imitates, in words."""
    native = takes_for_intel(dict(os.environ))
    if mkl_only:
        intel, library = not native, compile_library(MKL_SOURCE.format(answer=int(not native)), directory)
        what = f"MKL taking this CPU for {'an Intel' if intel else 'a non-Intel'} one"
    else:
        if native:
            raise Unavailable("MKL takes this CPU for an Intel one: the CPUID emulation imitates an Intel CPU on "
                              "another vendor's machine only (use --mkl-only)")
        if "cpuid_fault" not in cpu_flags():  # the kernel can turn this CPU's CPUID instructions into faults
            raise Unavailable("this kernel or CPU has no CPUID faulting (/proc/cpuinfo flag cpuid_fault; often "
                              "missing in virtual machines): use --mkl-only")
        intel, library = True, compile_library(CPUID_SOURCE.read_text(), directory)
        what = "CPUID answering as an Intel CPU with this CPU's instruction set"
    env = {**os.environ, "LD_PRELOAD": " ".join(filter(None, [str(library), os.environ.get("LD_PRELOAD")]))}
    if takes_for_intel(env) != intel:
        raise Unavailable(f"MKL did not follow the preloaded answer ({what})")
    return env, what


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "),
                                     epilog="Example: python benchmarks/other_vendor.py -- snakemake --cores all "
                                            "--configfile config/smoke.yaml")
    parser.add_argument("--mkl-only", action="store_true",
                        help="only MKL takes the CPU for the other vendor's (works without CPUID faulting, and on "
                             "Intel CPUs)")
    parser.add_argument("command", nargs="+", help="the command to run, after --")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="kalmanrl-other-vendor-") as tmp:
        try:
            env, what = prepare(args.mkl_only, Path(tmp))
        except Unavailable as error:
            print(f"other_vendor: {error}", file=sys.stderr)
            return UNAVAILABLE
        print(f"other_vendor: running with {what}: {shlex.join(args.command)}", file=sys.stderr, flush=True)
        return run(args.command, env)


if __name__ == "__main__":
    sys.exit(main())
