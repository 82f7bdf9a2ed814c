"""One RL step split into rollout / reward / scoring / update, and the per-step overhead of KRPO and KPO over GRPO.

    python benchmarks/bench_train_step.py [--steps 6] [--hidden 128] [--layers 2] [--threads 2]

Builds a tiny model and an Arithmetic dataset in a temporary directory, trains each algorithm for --steps steps from
the same weights with the same seed, and prints the median time of each phase (the first step is dropped as warm-up).
The algorithms differ only in the advantage estimator and the ratio transform, so the update phase is where their
overhead shows; rollouts differ because the policies drift apart, so the overhead is reported on the update phase
per trained token as well as on the whole step.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
from pathlib import Path

import torch

from kalmanrl.config import stage_settings, validate_config
from kalmanrl.data import build_dataset, read_dataset, write_dataset
from kalmanrl.model import build_tiny_model
from kalmanrl.trainer import train

PHASES = ["time_rollout", "time_reward", "time_score", "time_update"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        presets = {"easy": [3, 3]}
        table, _ = build_dataset({"loader": "arithmetic", "params": {"difficulty": "easy", "train_size": 2000,
                                                                     "test_size": 10}},
                                 offline=True, local_dir=tmp, seed=0, arithmetic_presets=presets)
        write_dataset(table, tmp / "data.parquet")
        texts = read_dataset(tmp / "data.parquet").column("problem").to_pylist()
        spec = {"vocab_size": 512, "hidden_size": args.hidden, "num_layers": args.layers,
                "num_heads": args.hidden // 32, "num_kv_heads": max(1, args.hidden // 64),
                "intermediate_size": 4 * args.hidden, "max_position_embeddings": 512, "tie_word_embeddings": True}
        build_tiny_model(tmp / "model", texts, spec=spec, seed=0)

        config = validate_config({"train": {"steps": args.steps, "checkpoint_every": args.steps + 1}})
        rows = {}
        for algorithm in config["algorithms"]:
            settings = stage_settings(config, "train", model="tiny", task="arithmetic_easy", algorithm=algorithm,
                                      seed="0")
            metrics = train(tmp / "model", tmp / "data.parquet", tmp / algorithm, settings=settings,
                            threads=args.threads).iloc[1:]
            per_token = (metrics["time_update"] * metrics["train_tokens_per_s"]).sum()
            rows[algorithm] = {**{p: metrics[p].median() for p in PHASES}, "step": metrics["wall_time"].median(),
                               "update_s_per_1k_tokens": 1000 * metrics["time_update"].sum() / per_token}

    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}; model hidden {args.hidden} x {args.layers} layers; {args.steps - 1} timed steps")
    print(f"| algorithm | rollout s | reward s | scoring s | update s | step s | update s / 1k tokens | vs grpo |")
    print("|---|---|---|---|---|---|---|---|")
    base = rows["grpo"]["update_s_per_1k_tokens"]
    for name, row in rows.items():
        overhead = 100 * (row["update_s_per_1k_tokens"] / base - 1)
        print(f"| {name} | " + " | ".join(f"{row[p]:.3f}" for p in PHASES) +
              f" | {row['step']:.3f} | {row['update_s_per_1k_tokens']:.4f} | {overhead:+.1f}% |")


if __name__ == "__main__":
    main()
