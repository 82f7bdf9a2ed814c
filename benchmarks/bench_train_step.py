"""One RL step split into rollout / reward / scoring / update, and the per-step overhead of KRPO and KPO over GRPO.

    python benchmarks/bench_train_step.py [--steps 6] [--repeats 15] [--hidden 128] [--layers 2] [--threads 2]

Builds a tiny model and an Arithmetic dataset in a temporary directory, then
1. trains each algorithm for --steps steps from the same weights with the same seed and prints the median time of
   each phase (the first step is dropped as warm-up);
2. times the update phase of each algorithm on one and the same rollout batch, from the same weights, --repeats
   times with the algorithms interleaved, and prints the medians. The algorithms differ only in the advantage
   estimator and the ratio transform, so this is their overhead; in (1) the policies drift apart and sample batches
   of other lengths, which changes the update time more than the algorithm does.

    python benchmarks/bench_train_step.py --memory [--hidden 128] [--layers 2]

instead measures the peak memory of the tensors one training step creates (old log-probs and the update, on a
synthetic rollout batch of fixed lengths) against the rollout batch size, with the default train.micro_batch_tokens
budget scaled down to the model and with one micro-batch per mini-batch (no budget) for comparison.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from kalmanrl.configuration.config import stage_settings, validate_config
from kalmanrl.configuration.settings import config_train_settings
from kalmanrl.data.dataset import read_dataset
from kalmanrl.data.prompts import get_template
from kalmanrl.jobs.trainer import batch_logprobs, mini_batch_schedule, train, update_policy
from kalmanrl.policy.batch import build_batch
from kalmanrl.policy.model import build_tiny_model, load_policy
from kalmanrl.policy.optim import adamw
from kalmanrl.policy.rollout import SamplingConfig, make_engine

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when loaded by path (tests/test_memory.py)
from _setup import build_data_and_model, easy_arithmetic, synthetic_batch, tiny_spec
from tensor_memory import TensorMemory

PHASES = ["time_rollout", "time_reward", "time_score", "time_update"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--memory", action="store_true", help="peak tensor memory against the rollout batch size")
    args = parser.parse_args()
    if args.memory:
        memory_table(args.hidden, args.layers)
        return

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build_data_and_model(tmp, easy_arithmetic(2000), tiny_spec(args.hidden, args.layers))

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

        same_batch = update_times(tmp / "model", tmp / "data.parquet", config, args.repeats)

    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}; model hidden {args.hidden} x {args.layers} layers; {args.steps - 1} timed steps")
    print("| algorithm | rollout s | reward s | scoring s | update s | step s | update s / 1k tokens |")
    print("|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(f"{row[p]:.3f}" for p in PHASES) +
              f" | {row['step']:.3f} | {row['update_s_per_1k_tokens']:.4f} |")
    print(f"\nupdate phase on one rollout batch, median of {args.repeats} interleaved repeats:")
    print("| algorithm | update s | vs grpo |")
    print("|---|---|---|")
    for name, seconds in same_batch.items():
        print(f"| {name} | {seconds:.3f} | {100 * (seconds / same_batch['grpo'] - 1):+.1f}% |")


def update_times(model_dir: Path, data: Path, config: dict, repeats: int) -> dict[str, float]:
    """Median seconds of `update_policy` per algorithm on one fixed rollout batch, each run from the same weights."""
    cfg = config["train"]
    policy, tokenizer = load_policy(model_dir)
    initial = {k: v.clone() for k, v in policy.state_dict().items()}
    template = get_template("krpo")
    problems = read_dataset(data, split="train").column("problem").to_pylist()[:cfg["prompts_per_step"]]
    prompt_ids = [tokenizer(template.render(tokenizer, p), add_special_tokens=False)["input_ids"] for p in problems]
    with make_engine("hf", policy=policy, tokenizer=tokenizer, model_dir=model_dir) as engine:
        completions = engine.generate(prompt_ids, SamplingConfig(n=cfg["group_size"], max_tokens=cfg["max_tokens"],
                                                                 seed=0))
    rewards = torch.rand(len(prompt_ids), cfg["group_size"], generator=torch.Generator().manual_seed(0),
                         dtype=torch.float64)
    runs = {}
    for name in config["algorithms"]:
        settings = config_train_settings(config, algorithm=name)
        batch = build_batch(prompt_ids, completions, settings.algorithm.estimator(rewards), tokenizer.pad_token_id)
        schedule = mini_batch_schedule(len(batch.advantages), settings.train, 0, 0)
        batch.old_logp = batch_logprobs(policy, batch, schedule[0], settings.train)
        runs[name] = (batch, schedule, settings)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, (batch, schedule, settings) in runs.items():
            policy.load_state_dict(initial)
            optimizer = adamw(policy.parameters(), settings.train.optimizer())
            policy.train()
            start = time.perf_counter()
            update_policy(policy, optimizer, batch, schedule, settings)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def step_peak_memory(policy, *, rows: int, group: int, prompt_len: int, completion_len: int,
                     micro_batch_tokens: int, seed: int = 0) -> int:
    """Peak bytes of the tensors one training step creates (old log-probs, then the update of GRPO at float32, two
    mini-batches of micro-batches of at most `micro_batch_tokens`) on a synthetic rollout batch of `rows` sequences,
    every prompt and completion of the given lengths; the optimiser state is created inside the step, so it counts
    as well."""
    batch = synthetic_batch(policy.config.vocab_size, rows=rows, group=group, prompt_len=prompt_len,
                            completion_len=completion_len, seed=seed)
    settings = config_train_settings(validate_config({"train": {"mini_batches": 2, "precision": "float32",
                                                                "micro_batch_tokens": micro_batch_tokens}}),
                                     algorithm="grpo")
    schedule = mini_batch_schedule(rows, settings.train, seed, 0)
    optimizer = adamw(policy.parameters(), settings.train.optimizer())
    policy.train()
    with TensorMemory() as memory:
        batch.old_logp = batch_logprobs(policy, batch, schedule[0], settings.train)
        update_policy(policy, optimizer, batch, schedule, settings)
    policy.zero_grad(set_to_none=True)
    return memory.peak


def memory_table(hidden: int, layers: int) -> None:
    """Print peak step memory for rollout batches of 64 to 256 sequences of 64 + 192 tokens."""
    with tempfile.TemporaryDirectory() as tmp:
        build_tiny_model(Path(tmp) / "model", ["1 + 2 = 3"] * 50, spec=tiny_spec(hidden, layers), seed=0)
        policy = load_policy(Path(tmp) / "model")[0]
    budget = 8 * (64 + 192)
    print(f"torch {torch.__version__}; model hidden {hidden} x {layers} layers, vocabulary 512; prompts 64 tokens, "
          f"completions 192, 2 mini-batches; micro_batch_tokens {budget} (8 rows)")
    print(f"| rollout batch (rows) | peak MiB, micro_batch_tokens {budget} "
          f"| peak MiB, one micro-batch per mini-batch |")
    print("|---|---|---|")
    for rows in (64, 128, 256):
        peaks = [step_peak_memory(policy, rows=rows, group=8, prompt_len=64, completion_len=192,
                                  micro_batch_tokens=tokens) / 2**20 for tokens in (budget, 10**9)]
        print(f"| {rows} | {peaks[0]:.1f} | {peaks[1]:.1f} |")


if __name__ == "__main__":
    main()
