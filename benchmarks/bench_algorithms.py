"""Cost of the algorithms' pieces on the CPU: the KPO ratio transform + loss against GRPO's token ratio + loss
(forward + backward), the vectorised Kalman filter against the plain sequential loop, and KRPO's advantages.

    PYTHONPATH=src python benchmarks/bench_algorithms.py [--threads 2] [--repeats 30]

Inputs are synthetic: old log-probs in [-3, 0], a policy 0.05 nats away per token, right-padded completions of
random length in [T/2, T], one advantage per sequence. Times are medians over --repeats rounds after warm-up;
ratios are medians of the ratio within each round (see `paired_ratio`).
"""

from __future__ import annotations

import argparse
import functools
import platform
import statistics
import time
from collections.abc import Callable

import torch

from kalmanrl.rl.algorithms import KPO_DEFAULTS as KPO
from kalmanrl.rl.algorithms import get_advantage_estimator, get_ratio_transform, policy_loss
from kalmanrl.rl.kalman import kalman_filter


def timings(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each function, `repeats` rounds after warm-up. Each round runs every function once, in an
    order that rotates from round to round, so that load from other processes and the allocator's state left by the
    previous call hit all alike."""
    for fn in fns.values():
        for _ in range(3):
            fn()
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(repeats):
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return times


def medians_ms(times: dict[str, list[float]]) -> dict[str, float]:
    """Median of each function's `timings` in ms."""
    return {name: 1e3 * statistics.median(values) for name, values in times.items()}


def paired_ratio(times: dict[str, list[float]], name: str, baseline: str) -> float:
    """Median over rounds of name's time / baseline's time in the same round: two calls microseconds apart share
    the machine's state, so a slow phase of a shared machine cancels out, unlike in a ratio of medians."""
    return statistics.median(a / b for a, b in zip(times[name], times[baseline], strict=True))


def batch(rows: int, steps: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    old = -3 * torch.rand(rows, steps, generator=gen)
    logp = old + 0.05 * torch.randn(rows, steps, generator=gen)
    lengths = torch.randint(steps // 2, steps + 1, (rows,), generator=gen)
    mask = (torch.arange(steps) < lengths[:, None]).float()
    advantages = torch.randn(rows, 1, generator=gen).expand(rows, steps)
    return logp, old, mask, advantages


def loss_step(ratio: str, clip: float, logp: torch.Tensor, old: torch.Tensor, mask: torch.Tensor,
              advantages: torch.Tensor):
    transform = get_ratio_transform(ratio)

    def step() -> None:
        leaf = logp.detach().requires_grad_()
        loss, _ = policy_loss(transform(leaf, old, mask), advantages, mask, eps_low=clip, eps_high=clip)
        loss.backward()
    return step


def sequential_filter(z: torch.Tensor, mask: torch.Tensor, q: float, r: float, x0: float, p0: float) -> torch.Tensor:
    """The plain loop the vectorised filter replaces (one Python iteration per token, all rows at once)."""
    out = torch.zeros_like(z)
    x = torch.full(z.shape[:1], x0, dtype=z.dtype)
    p = torch.full(z.shape[:1], p0, dtype=z.dtype)
    for t in range(z.shape[1]):
        valid = mask[:, t] > 0
        prior = p + q
        gain = prior / (prior + r)
        x = torch.where(valid, x + gain * (z[:, t] - x), x)
        p = torch.where(valid, (1 - gain) * prior, p)
        out[:, t] = torch.where(valid, x, 0.0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} threads\n")

    print("| B x T | GRPO token ratio + loss (ms) | KPO ratio + loss (ms) | KPO / GRPO | GSPO / GRPO |")
    print("|---|---|---|---|---|")
    for rows, steps in [(8, 512), (16, 1024), (32, 2048), (64, 4096), (64, 8192)]:
        data = batch(rows, steps)
        times = timings({"grpo": loss_step("token", 0.2, *data), "kpo": loss_step("kpo", 3e-4, *data),
                         "gspo": loss_step("sequence", 3e-4, *data)}, args.repeats)
        ms = medians_ms(times)
        print(f"| {rows} x {steps} | {ms['grpo']:.2f} | {ms['kpo']:.2f} | {paired_ratio(times, 'kpo', 'grpo'):.2f} | "
              f"{paired_ratio(times, 'gspo', 'grpo'):.2f} |")

    print("\n| B x T | sequential loop (ms) | vectorised filter (ms) | speed-up |")
    print("|---|---|---|---|")
    for rows, steps in [(64, 1024), (64, 4096)]:
        logp, old, mask, _ = batch(rows, steps)
        z = logp - old
        ms = medians_ms(timings({"naive": functools.partial(sequential_filter, z, mask, **KPO),
                                 "fast": functools.partial(kalman_filter, z, mask, **KPO)}, max(3, args.repeats // 5)))
        print(f"| {rows} x {steps} | {ms['naive']:.1f} | {ms['fast']:.3f} | {ms['naive'] / ms['fast']:.0f}x |")

    rewards = torch.rand(1024, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64).round()
    estimators = {name: functools.partial(get_advantage_estimator(name), rewards) for name in ("grpo", "krpo")}
    ms = medians_ms(timings(estimators, args.repeats))
    print(f"\nadvantages for 1024 groups of 12: GRPO {ms['grpo']:.3f} ms, KRPO {ms['krpo']:.3f} ms")

if __name__ == "__main__":
    main()
