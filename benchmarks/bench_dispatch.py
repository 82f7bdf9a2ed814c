"""What the CPU dispatch pin costs: one supervised training step of the default study's model (a Qwen2 of hidden 128,
2 layers, vocabulary 512; a batch of 64 x 64 tokens, AdamW) under each kernel choice, each in a fresh process.

    python benchmarks/bench_dispatch.py [--steps 30] [--rounds 3] [--threads 1]

Choices: the `avx2` pin (ATen AVX2, MKL's vendor-neutral COMPATIBLE branch), the same with MKL's Intel-only AVX2 branch
(the pin until 2026-12-04), the `baseline` pin and nothing pinned (`native`). Rounds alternate the choices; printed
are the median seconds per step, the ratio to the pin, and a hash of the final weights (equal hashes: the same
numbers). Run it on an idle machine and write the CPU (`lscpu`) beside the figures.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

from kalmanrl.runtime.cpu import DISPATCH_ENV, LEVELS

STEP = r"""
import hashlib, os, sys, time
from kalmanrl.runtime.cpu import pin_cpu_dispatch
pin_cpu_dispatch()
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM
torch.manual_seed(0)
torch.set_num_threads(int(sys.argv[2]))
model = Qwen2ForCausalLM(Qwen2Config(vocab_size=512, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, intermediate_size=512, max_position_embeddings=64))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
tokens = torch.randint(0, 512, (64, 64))
times = []
for _ in range(int(sys.argv[1]) + 1):
    start = time.perf_counter()
    model(input_ids=tokens, labels=tokens).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    times.append(time.perf_counter() - start)
digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
print(sorted(times[1:])[len(times[1:]) // 2], torch.backends.cpu.get_cpu_capability(), digest[:12])
"""

CHOICES = {
    "avx2 pin (MKL COMPATIBLE,STRICT)": {DISPATCH_ENV: "avx2"},
    "avx2 with MKL's AVX2 branch": {DISPATCH_ENV: "native", **LEVELS["avx2"][1], "MKL_CBWR": "AVX2"},
    "baseline pin": {DISPATCH_ENV: "baseline"},
    "native (nothing pinned)": {DISPATCH_ENV: "native"},
}


def measure(env: dict[str, str], steps: int, threads: int) -> tuple[float, str, str]:
    clean = {k: v for k, v in os.environ.items() if k not in {DISPATCH_ENV, *LEVELS["avx2"][1]}}
    out = subprocess.run([sys.executable, "-c", STEP, str(steps), str(threads)], env={**clean, **env},
                         capture_output=True, text=True, check=True).stdout.split()
    return float(out[0]), out[1], out[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if min(args.steps, args.rounds) < 1:
        parser.error("--steps and --rounds must be at least 1 (the steps are timed after a warm-up step)")
    seconds: dict[str, list[float]] = {name: [] for name in CHOICES}
    seen: dict[str, tuple[str, str]] = {}
    for _ in range(args.rounds):
        for name, env in CHOICES.items():
            step, capability, digest = measure(env, args.steps, args.threads)
            seconds[name].append(step)
            seen[name] = (capability, digest)
    pinned = statistics.median(seconds[next(iter(CHOICES))])
    print(f"{'choice':36} {'s/step':>8} {'x pin':>6}  capability  weights")
    for name, values in seconds.items():
        median = statistics.median(values)
        print(f"{name:36} {median:8.4f} {median / pinned:6.2f}  {seen[name][0]:10}  {seen[name][1]}")


if __name__ == "__main__":
    main()
