"""What MKL's vector-math library (VML) does to torch's CPU exp, log, sqrt, cos and sin, and what
`kalmanrl.runtime.vendor_neutral` does instead: for each MKL setting, in a fresh process, the share of a million float32
results that differ from the correctly rounded value, and a hash of the results (the same hash under every setting
means VML did not follow it).

    PYTHONPATH=src python benchmarks/bench_vml.py        # about 1 min

The claims in kalmanrl.runtime.vendor_neutral's docstring and the README's "Same numbers on any machine" come from it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

# MKL settings tried, on top of the avx2 pin's ATen capability (ATEN_CPU_CAPABILITY=avx2).
SETTINGS = [{"MKL_CBWR": "COMPATIBLE,STRICT"}, {"MKL_CBWR": "AUTO"}, {"MKL_CBWR": "AVX2"},
            {"MKL_CBWR": "COMPATIBLE,STRICT", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}]

CHILD = r"""
import hashlib, json
import numpy as np, torch
from kalmanrl.runtime import vendor_neutral
torch.set_num_threads(1)
generator = np.random.default_rng(0)
positive = torch.from_numpy(generator.uniform(1e-30, 1e3, 1_000_000).astype(np.float32))
anywhere = torch.from_numpy(generator.uniform(-80, 80, 1_000_000).astype(np.float32))
cases = {"sqrt": (torch.sqrt, vendor_neutral.sqrt, np.sqrt, positive),
         "log": (torch.log, vendor_neutral.log, np.log, positive),
         "exp": (torch.exp, vendor_neutral.exp, np.exp, anywhere),
         "cos": (torch.cos, lambda x: vendor_neutral.cos_sin(x)[0], np.cos, anywhere),
         "sin": (torch.sin, lambda x: vendor_neutral.cos_sin(x)[1], np.sin, anywhere)}
out = {}
for name, (theirs, ours, reference, x) in cases.items():
    exact = reference(x.double().numpy()).astype(np.float32)  # float64 rounded once: correctly rounded but for ties
    for side, function in (("torch", theirs), ("vendor_neutral", ours)):
        y = function(x).numpy()
        out[f"{name} {side}"] = (float((y != exact).mean()), hashlib.sha256(y.tobytes()).hexdigest()[:12])
print(json.dumps(out))
"""


def main() -> None:
    print(f"torch in {sys.executable}; a million float32 values per function; share differing from the correctly "
          "rounded value, and a hash of the results")
    base = {k: v for k, v in os.environ.items() if not k.startswith("MKL_")}
    for setting in SETTINGS:
        env = {**base, "ATEN_CPU_CAPABILITY": "avx2", "OMP_NUM_THREADS": "1", **setting}
        done = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True)
        result = json.loads(done.stdout)
        print(" ".join(f"{k}={v}" for k, v in setting.items()))
        for key, (share, digest) in result.items():
            print(f"  {key:22s} {share:8.2%}  {digest}")


if __name__ == "__main__":
    main()
