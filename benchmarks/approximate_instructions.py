"""Which functions of the libraries a training job loads hold an instruction whose result the CPU's maker decides.

x86's approximate reciprocal and reciprocal square root (`rcpps`, `rcpss`, `rsqrtps`, `rsqrtss` and their VEX forms)
are specified only to a relative error: Intel's and AMD's hardware give different bits for the same input, whatever
code the libraries choose. A run gives the same numbers on both vendors only if no such instruction runs on its path.
This lists, per library, the functions that hold one (disassembled with binutils' `objdump -d`), so that a test or a
debugger can watch them; `tests/test_vendor_neutral.py` keeps MKL's vector math (VML), where torch's hold them, off
the path.

    python benchmarks/approximate_instructions.py            # about 2 min: libtorch_cpu.so is 400+ MB of code
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
from pathlib import Path

APPROXIMATE = re.compile(r"^v?(rcp|rsqrt)(ps|ss)$")
FUNCTION = re.compile(r"^[0-9a-f]+ <(.+)>:$")


def libraries() -> list[Path]:
    """The shared libraries a job's numbers go through: torch's, numpy's and scipy's extension modules and bundled
    libraries, and the libm and OpenMP runtime they load."""
    import numpy
    import scipy
    import torch

    found = sorted((Path(torch.__file__).parent / "lib").glob("*.so*"))
    for package in (numpy, scipy):  # their extension modules, and the libraries their wheels bring (OpenBLAS)
        root = Path(package.__file__).parent
        found += sorted(root.rglob("*.so")) + sorted((root.parent / f"{package.__name__}.libs").glob("*.so*"))
    # The C libraries this process has loaded from elsewhere: the system's libm among them.
    loaded = re.findall(r"(/\S+/lib(?:m|gomp)(?:-[0-9a-f]+)?\.so[.\d]*)$", Path("/proc/self/maps").read_text(),
                        re.MULTILINE)
    return list(dict.fromkeys([*found, *sorted(map(Path, set(loaded)))]))


def approximate_functions(library: Path) -> dict[str, collections.Counter]:
    """{function: Counter of its approximate instructions} of `library`'s code."""
    try:
        disassembly = subprocess.Popen(["objdump", "-d", "--no-show-raw-insn", str(library)], stdout=subprocess.PIPE,
                                       text=True, errors="replace")
    except FileNotFoundError:
        raise SystemExit("approximate_instructions: objdump (binutils) is not installed") from None
    found: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    function = "?"
    for line in disassembly.stdout:
        if match := FUNCTION.match(line):
            function = match.group(1)
            continue
        fields = line.split("\t")
        if len(fields) > 1 and APPROXIMATE.match(mnemonic := fields[1].split(" ")[0].strip()):
            found[function][mnemonic] += 1
    disassembly.wait()
    return dict(found)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--functions", action="store_true", help="list every function, not only a count per library")
    parser.add_argument("--only", metavar="TEXT", help="scan only the libraries whose path contains TEXT")
    args = parser.parse_args(argv)
    scanned = [library for library in libraries() if args.only is None or args.only in str(library)]
    holding = 0
    for library in scanned:
        if not (found := approximate_functions(library)):
            continue
        holding += 1
        print(f"{library}: {len(found)} functions")
        for function, mnemonics in sorted(found.items()) if args.functions else ():
            print(f"  {function}: {', '.join(f'{name} x{count}' for name, count in sorted(mnemonics.items()))}")
    print(f"{len(scanned)} libraries scanned, {holding} hold approximate instructions")


if __name__ == "__main__":
    main()
