"""Throughput of the math_verify reward: rewards per second on realistic completions.

Completions are built from the MATH500 gold answers: about 1,500 characters of step-by-step text with inline LaTeX,
ending in a boxed answer that is the gold as written (40%), an equivalent form of it (20%: \\dfrac, spacing,
decimals for fractions, 1/2 for \\frac12, a trailing .0, \\left( \\right)), or a wrong answer (40%: a nearby integer
or another problem's answer). The worker pool is started and warmed up before timing.

    PYTHONPATH=src python benchmarks/bench_rewards.py [--n 10000] [--workers 2] [--seed 0]

MATH-500 is read as `kalmanrl data` reads it: from $KALMANRL_DATA_DIR/math500/test.jsonl when $KALMANRL_DATA_DIR
names a directory of local copies, else from the Hugging Face hub.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import re
import time

from kalmanrl.data.loaders import build_dataset
from kalmanrl.data.rewards import Check, get_reward
from kalmanrl.data.sources import resolve_local_dir

STEPS = [
    r"First, we rewrite the equation as $x^2 + {a}x = {b}$ and complete the square.",
    r"Substituting $y = {a}$ gives $\frac{{{a}}}{{{b}}} + {a} = {c}$, which we simplify step by step.",
    r"Notice that $\sqrt{{{a}}} \cdot \sqrt{{{b}}} = \sqrt{{{c}}}$, so the product is unchanged.",
    r"The number of ways is $\binom{{{a}}}{{{b}}}$, since order does not matter here.",
    r"Let me double-check: ${a} \times {b} = {c}$, and that matches the earlier computation.",
    r"By the triangle inequality, each side must be less than ${c}$, so the candidates are limited.",
    r"Hence the sum telescopes: $\sum_{{k=1}}^{{{a}}} \left(\frac{{1}}{{k}} - \frac{{1}}{{k+1}}\right)$.",
    r"Wait, I should be careful with the sign here; recomputing gives ${a} - {b} = {c}$.",
]


def equivalent(gold: str, rng: random.Random) -> str:
    """A differently written form of `gold` that is equal to it (or gold itself when no rewrite applies)."""
    if (m := re.fullmatch(r"\\frac\{(\d+)\}\{(\d+)\}", gold)) is not None:
        num, den = int(m[1]), int(m[2])
        return rng.choice([rf"\dfrac{{{num}}}{{{den}}}", f"{num}/{den}", f"{num / den:.6f}".rstrip("0"),
                           rf"\frac{{{2 * num}}}{{{2 * den}}}"])
    if re.fullmatch(r"-?\d+", gold):
        return rng.choice([f"{gold}.0", f" {gold} ", rf"{gold}\,", f"0{gold}" if gold[0] != "-" else gold])
    rewrites = [gold.replace(r"\frac", r"\dfrac"), gold.replace(" ", ""), gold.replace(",", ", "),
                gold.replace("(", r"\left(").replace(")", r"\right)")]
    return rng.choice([r for r in rewrites if r != gold] or [gold])


def wrong(gold: str, golds: list[str], rng: random.Random) -> str:
    if re.fullmatch(r"-?\d+", gold) and rng.random() < 0.6:
        return str(int(gold) + rng.choice([-2, -1, 1, 2, 10]))
    return rng.choice([g for g in golds if g != gold])


def completions(golds: list[str], n: int, seed: int) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    texts, targets = [], []
    for _ in range(n):
        gold = rng.choice(golds)
        kind = rng.random()
        answer = gold if kind < 0.4 else equivalent(gold, rng) if kind < 0.6 else wrong(gold, golds, rng)
        steps = " ".join(rng.choice(STEPS).format(a=rng.randint(2, 99), b=rng.randint(2, 99), c=rng.randint(2, 999))
                         for _ in range(12))
        texts.append(f"Let's think step by step. {steps}\n\nTherefore, the final answer is $\\boxed{{{answer}}}$.")
        targets.append(gold)
    return texts, targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    # As `kalmanrl data` reads MATH-500: the local copy $KALMANRL_DATA_DIR/math500/test.jsonl, else the hub.
    golds = build_dataset({"loader": "math500"}, local_dir=resolve_local_dir(None), seed=0,
                          arithmetic_presets={})[0].column("answer").to_pylist()
    texts, targets = completions(golds, args.n, args.seed)
    with get_reward("math_verify", num_workers=args.workers) as reward:
        reward(*completions(golds, 200, args.seed + 1))  # start and warm the workers
        start = time.perf_counter()
        verdicts = reward.judge(texts, targets)
        elapsed = time.perf_counter() - start
        checks = sum(isinstance(reward.screen(t, g), Check) for t, g in zip(texts, targets, strict=True))
    print(f"machine: {platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} CPUs, "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"{args.n} completions (mean {sum(map(len, texts)) / len(texts):.0f} chars), "
          f"workers={reward._pool.num_workers}: {elapsed:.2f} s, {args.n / elapsed:.0f} rewards/s")
    print(f"settled without parsing: {1 - checks / args.n:.1%}; math-verify checks: {checks} "
          f"({checks / elapsed:.0f}/s); accuracy {sum(v.correct for v in verdicts) / len(verdicts):.3f}")


if __name__ == "__main__":
    main()
