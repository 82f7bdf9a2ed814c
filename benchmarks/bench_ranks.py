"""A training step on 2 CPU ranks (FSDP2 over gloo, started by torchrun) against the same step in one process.

    python benchmarks/bench_ranks.py [--steps 4] [--prompts 8] [--group 8] [--max-tokens 32] [--hidden 128]
                                     [--layers 2]

Builds a tiny Qwen2 and an Arithmetic dataset in a temporary directory, then runs `kalmanrl.jobs.trainer.train` (KPO,
the same settings and seed, so the same global batch each step) three times, each in fresh processes:
1 rank with 1 torch thread, 1 rank with 2 threads, and `torchrun --standalone --nproc-per-node 2` with 1 thread per
rank (gloo). Prints per configuration the median wall time of a step and of its phases (the metrics rows' time_*
columns, rank 0's clock) over the steps after the first (warm-up), the peak RSS of each rank (VmHWM) and the
largest absolute difference of the final weights from the 1-rank, 1-thread run's.

The reward is the share of digits in a completion (`tests/digit_share.py`): the task's own reward is 0 for every
completion of a random model, which would leave all advantages 0 and the policy gradient empty.

Run as `bench_ranks.py worker <settings.json> <model> <dataset> <out> <threads>` this file is the training process
each configuration starts (one per rank).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file

HERE = Path(__file__).resolve()
TESTS = HERE.parent.parent / "tests"
PHASES = ["time_rollout", "time_reward", "time_score", "time_update"]
CONFIGURATIONS = [("1 rank, 1 thread", 1, 1), ("1 rank, 2 threads", 1, 2), ("2 ranks, 1 thread each", 2, 1)]


def worker(settings: Path, model: Path, data: Path, out: Path, threads: int) -> None:
    """One rank of a training run; writes this rank's peak RSS beside the run."""
    sys.path.insert(0, str(TESTS))
    import digit_share  # noqa: F401  (registers the "digit_share" reward)
    from bench_memory import peak_rss_bytes
    from kalmanrl.configuration.config import parse_settings
    from kalmanrl.jobs.trainer import train

    train(model, data, out, settings=parse_settings(f"@{settings}", "train"), threads=threads)
    rank = int(os.environ.get("RANK", "0"))
    peak_mib = peak_rss_bytes() / 2**20
    (out / f"peak_rss.rank{rank}.json").write_text(json.dumps({"rank": rank, "peak_rss_mib": peak_mib}))


def settings_for(args) -> dict:
    sys.path.insert(0, str(TESTS))
    import digit_share  # noqa: F401  (registers the "digit_share" reward)
    from kalmanrl.configuration.config import stage_settings, validate_config

    config = validate_config({
        "train": {"steps": args.steps, "prompts_per_step": args.prompts, "group_size": args.group,
                  "mini_batches": 2, "max_tokens": args.max_tokens, "checkpoint_every": args.steps},
        "datasets": {"arith": {"loader": "arithmetic", "template": "krpo", "reward": "digit_share"}},
        "tasks": ["arith"], "benchmarks": ["arith"]})
    return stage_settings(config, "train", model="tiny", task="arith", algorithm="kpo", seed="0")


def run(tmp: Path, name: str, ranks: int, threads: int, model: Path, data: Path, settings: Path) -> dict:
    from kalmanrl.runtime.distributed import launch_command

    out = tmp / name
    args = [str(HERE), "worker", str(settings), str(model), str(data), str(out), str(threads)]
    command = launch_command([sys.executable, *args], gpus=ranks, log_dir=str(tmp / f"{name}.torchrun"))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed ({' '.join(command)}):\n{done.stderr[-4000:]}")
    metrics = pd.read_parquet(out / "metrics.parquet")
    timed = metrics.iloc[1:]  # the first step is warm-up
    peaks = [json.loads((out / f"peak_rss.rank{r}.json").read_text())["peak_rss_mib"] for r in range(ranks)]
    return {"name": name, "process_s": time.perf_counter() - start, "step_s": timed["wall_time"].median(),
            **{p: timed[p].median() for p in PHASES}, "peaks": peaks,
            "reward_mean": metrics["reward_mean"].tolist(), "loss": metrics["loss"].tolist(),
            "weights": load_file(out / "final" / "model.safetensors")}


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    if list(a) != list(b):
        raise ValueError(f"the final models have different parameters: {sorted(set(a) ^ set(b))}")
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4, help="steps per run, the first one is warm-up")
    parser.add_argument("--prompts", type=int, default=8, help="train.prompts_per_step (global)")
    parser.add_argument("--group", type=int, default=8, help="train.group_size")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2: the first step is warm-up, the medians are of the others")
    from _setup import build_data_and_model, easy_arithmetic, tiny_spec

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build_data_and_model(tmp, easy_arithmetic(500), tiny_spec(args.hidden, args.layers))
        (tmp / "settings.json").write_text(json.dumps(settings_for(args)))

        results = [run(tmp, name.replace(" ", "_").replace(",", ""), ranks, threads, tmp / "model",
                       tmp / "data.parquet", tmp / "settings.json") | {"label": name}
                   for name, ranks, threads in CONFIGURATIONS]

    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}; "
          f"load average {os.getloadavg()}")
    print(f"KPO, {args.prompts} prompts x {args.group} completions, up to {args.max_tokens} tokens, "
          f"hidden {args.hidden}, {args.layers} layers; median of steps 2-{args.steps}")
    print("| configuration | step s | rollout s | reward s | scoring s | update s | peak RSS per rank (MiB) "
          "| max abs weight diff vs 1 rank, 1 thread | whole process s |")
    print("|---|---|---|---|---|---|---|---|---|")
    reference = results[0]["weights"]
    for r in results:
        print(f"| {r['label']} | {r['step_s']:.3f} | " + " | ".join(f"{r[p]:.3f}" for p in PHASES)
              + f" | {' / '.join(f'{p:.0f}' for p in r['peaks'])} | {max_difference(r['weights'], reference):.2e}"
              + f" | {r['process_s']:.1f} |")
    for r in results:
        print(f"{r['label']}: reward_mean per step {[round(x, 4) for x in r['reward_mean']]}, "
              f"loss {[round(x, 6) for x in r['loss']]}")


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "worker":
    worker(*map(Path, sys.argv[2:6]), int(sys.argv[6]))
elif __name__ == "__main__":
    main()
