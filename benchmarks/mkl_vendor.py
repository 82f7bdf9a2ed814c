"""Run a command with MKL taking this CPU for the other vendor's: an Intel CPU on an AMD (or any non-Intel) machine, a
non-Intel one on an Intel machine.

MKL is the one library of torch's CPU stack that chooses code by the CPU's vendor as well as its instruction set
(README, "Same numbers on any machine"), and it asks one function which vendor it runs on, `mkl_serv_intel_cpu_true`,
which torch's build exports. A one-line library preloaded (LD_PRELOAD) answers in its place, for the command and every
process it starts, so that one machine runs the code MKL gives the other vendor's CPUs:

    PYTHONPATH=src python benchmarks/mkl_vendor.py -- snakemake --cores all --configfile config/smoke.yaml
    kalmanrl compare-summary results/smoke/report/summary.parquet config/smoke.expected.json

Under the `avx2` pin MKL runs its COMPATIBLE branch, which its documentation says gives the same results on every
vendor's CPU; `identical` shows that for the whole run. What a CPU of the other vendor differs in beyond what MKL reads
(its instruction set, cache sizes) this does not imitate. Before the command starts, the script checks that MKL
follows the preloaded answer: asked for its AVX2 branch (MKL_CBWR=AVX2), MKL runs it on Intel CPUs and its AUTO
branch on others, and MKL_VERBOSE says which. The rows such a run writes say so: their `cpu_vendor` reads e.g.
"AuthenticAMD (MKL takes it for GenuineIntel)", a machine class of its own for `kalmanrl compare-summary`.
Needs a C compiler (`cc`, or $CC).
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

SHIM = "int mkl_serv_intel_cpu_true(void) {{ return {answer}; }}\n"
# One single-precision matrix product through MKL: MKL_VERBOSE prints a line for it with the branch it ran (CNR:).
PROBE = "import torch; torch.set_num_threads(1); torch.ones(64, 64) @ torch.ones(64, 64)"


def takes_for_intel(env: dict[str, str]) -> bool:
    """Whether MKL, in a fresh process with `env`, takes the CPU for an Intel one: asked for its AVX2 branch, it runs
    that branch on an Intel CPU and its AUTO branch on any other (MKL's documentation of MKL_CBWR)."""
    env = {key: value for key, value in env.items() if not key.startswith("MKL_")}
    done = subprocess.run([sys.executable, "-c", PROBE], env={**env, "MKL_CBWR": "AVX2", "MKL_VERBOSE": "1"},
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"mkl_vendor: the MKL probe failed:\n{done.stderr[-2000:]}")
    branches = set(re.findall(r"CNR:(\w+)", done.stdout + done.stderr))
    if branches not in ({"AVX2"}, {"AUTO"}):
        raise SystemExit(f"mkl_vendor: asked for its AVX2 branch, MKL reported running {sorted(branches) or 'nothing'}"
                         " (expected AVX2 on an Intel CPU, AUTO on another): is torch built with MKL, and does this "
                         "CPU have AVX2?")
    return branches == {"AVX2"}


def build_shim(directory: Path, intel: bool) -> Path:
    """The preloaded library: `mkl_serv_intel_cpu_true` answering `intel`."""
    source, library = directory / "mkl_vendor.c", directory / "libmkl_vendor.so"
    source.write_text(SHIM.format(answer=int(intel)))
    compiler = os.environ.get("CC", "cc")
    try:
        subprocess.run([compiler, "-shared", "-fPIC", "-O2", "-o", str(library), str(source)], check=True)
    except FileNotFoundError:
        raise SystemExit(f"mkl_vendor: no C compiler {compiler!r} to build the preloaded library (set $CC)") from None
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "),
                                     epilog="Example: python benchmarks/mkl_vendor.py -- snakemake --cores all "
                                            "--configfile config/smoke.yaml")
    parser.add_argument("--as", dest="vendor", choices=("intel", "other"),
                        help="the vendor MKL is to take the CPU for (default: the one it does not)")
    parser.add_argument("command", nargs="+", help="the command to run, after --")
    args = parser.parse_args(argv)
    native = takes_for_intel(dict(os.environ))
    intel = {"intel": True, "other": False, None: not native}[args.vendor]
    name = {True: "an Intel CPU", False: "a non-Intel CPU"}
    with tempfile.TemporaryDirectory(prefix="kalmanrl-mkl-vendor-") as tmp:
        library = build_shim(Path(tmp), intel)
        env = {**os.environ, "LD_PRELOAD": " ".join(filter(None, [str(library), os.environ.get("LD_PRELOAD")]))}
        if takes_for_intel(env) != intel:
            raise SystemExit(f"mkl_vendor: MKL did not follow the preloaded answer ({name[intel]}): its calls do not "
                             "go through the exported mkl_serv_intel_cpu_true in this build of torch")
        print(f"mkl_vendor: MKL takes this CPU for {name[native]}; running with it taken for {name[intel]}: "
              f"{shlex.join(args.command)}", file=sys.stderr, flush=True)
        return run(args.command, env)


if __name__ == "__main__":
    sys.exit(main())
