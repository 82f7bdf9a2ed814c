"""Time per rollout batch of kalmanrl's trainer against TRL's GRPOTrainer, on the same model, prompts and batch shape.

    python benchmarks/bench_trl.py [--batches 4] [--rounds 2] [--threads 1] [--algorithm grpo] [--side both]
                                   [--trl-allocator default|kept] [--kalmanrl-dispatch avx2|baseline|native]
                                   [--kalmanrl-padded] [--kalmanrl-profile N]

Builds the default study's tiny model (config/config.yaml: its `tiny` Qwen2 and the `arithmetic_laptop` task, the
tokenizer trained on the corpus `kalmanrl model` gives it) in a temporary directory. The weights stay random (no
warm start): a random policy rarely ends its turn, so nearly every completion runs to the token limit on both sides.
Both sides then train in the default study's shape: 32 prompts x 8 completions per rollout batch, at most 16 new
tokens, 2 optimiser steps of 128 completions per rollout batch (one epoch), float32, hf (transformers) generation,
no reference model (beta 0), --threads torch threads:
- kalmanrl: `kalmanrl.jobs.trainer.train`, what `kalmanrl train` runs, with the default study's train settings and
  algorithm (--algorithm; checkpoints only after the last batch, no experiment trackers), in a process set up as the CLI
  sets up every stage's: the CPU dispatch pinned (kalmanrl.runtime.cpu; --kalmanrl-dispatch native leaves it to the
  libraries, as TRL's process is) and glibc's malloc keeping the memory a step frees; packed micro-batches, the
  default (--kalmanrl-padded: padded ones, as TRL's);
- TRL: `GRPOTrainer` set to the same (per-device batch 128, steps_per_generation 2, num_generations 8,
  max_completion_length 16, loss_type "grpo", epsilon 0.2, the same learning rate, weight decay and gradient
  clipping), with its own defaults that would change the computation turned off (bf16 autocast, gradient
  checkpointing), and no logging, evaluation or checkpoints; glibc's malloc as it comes, or with
  --trl-allocator kept the same as kalmanrl's (to compare the two steps alone).
Both get the same prompts in the same order (kalmanrl's prompt order, given to TRL unshuffled, rendered by the task's
template into the same token ids) and the same reward: the share of digits in a completion (`tests/digit_share.py`),
so advantages are not all 0.

Time per rollout batch is measured between the ends of consecutive rollout batches (kalmanrl: after each step's
metrics row is recorded; TRL: a callback at the end of every second optimiser step), so it covers everything a
batch does; the first batch (warm-up) is dropped. Each side runs in a fresh process, --rounds times, sides
alternating; the median is over all measured batches of all rounds. Both wall time and the process's CPU time are
reported: with one thread they agree on an idle machine, and on a shared one the CPU time is the steadier measure
(other jobs stretch the wall time of whichever side runs during a burst). Prints one line per side, the ratio
kalmanrl / TRL of those medians (target: at most 0.6) and, with several rounds, each round's ratio of CPU-time
medians: the two sides of a round run about a minute apart, so a load that comes and goes (a shared VM's neighbours)
moves them together, and the median of the round ratios is the figure to read.

With --kalmanrl-profile N, one more kalmanrl run after the timed rounds (so they are not slowed) runs under
torch.profiler and prints its N costliest operators by self CPU time (all its batches, warm-up included; with input
shapes, so the decoding steps' products show apart from the updates'), and the share of the matrix products
(`aten::mm`, `aten::addmm`, `aten::bmm`): where kalmanrl's time goes, measured rather than estimated.

TRL is optional (`pip install -e '.[bench]'`): without it the script says so and exits with status 3, unless
--side kalmanrl.

Run as `bench_trl.py worker <side> <directory> <batches> <threads> <algorithm> <allocator> packed|padded <profile>`
this file is the measured process (<profile>: the operators to list, 0 for a timed run).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent
TESTS = REPO / "tests"
TASK, MODEL = "arithmetic_laptop", "tiny"
MISSING_TRL = 3  # exit status when TRL is not installed


def study_config(batches: int, packing: bool = True) -> dict:
    """The default study with `batches` rollout batches per run, the digit-share reward, checkpoints only at the
    end (the trainer always writes one after its last step), no intermediate kept checkpoints, and kalmanrl's
    micro-batches packed or padded."""
    sys.path.insert(0, str(TESTS))
    import digit_share  # noqa: F401  (registers the "digit_share" reward)
    from kalmanrl.configuration.config import load_config

    config = load_config(REPO / "config" / "config.yaml")
    config["train"].update(steps=batches, checkpoint_every=batches, keep_every=0, loggers=[], packing=packing)
    config["datasets"][TASK].update(reward="digit_share", reward_params={})
    return config


def prompts_in_order(config: dict, data: Path, tokenizer, batches: int) -> tuple[list[str], list[str]]:
    """The prompt texts (rendered by the task's template) and golds kalmanrl's trainer samples in its first
    `batches` rollout batches (seed 0), in its order."""
    from kalmanrl.data.dataset import read_dataset
    from kalmanrl.data.prompts import get_template
    from kalmanrl.jobs.trainer import _step_problems

    train, task = config["train"], config["datasets"][TASK]
    problems = read_dataset(data, split="train").to_pandas()
    template = get_template(task["template"], task["chat_template_kwargs"])
    order = [i for step in range(batches) for i in _step_problems(len(problems), step, train["prompts_per_step"], 0)]
    return ([template.render(tokenizer, problems["problem"][i]) for i in order],
            [problems["answer"][i] for i in order])


def clocks() -> tuple[float, float]:
    """Wall time and this process's CPU time (all its threads), in seconds."""
    return time.perf_counter(), time.process_time()


def intervals(stamps: list[tuple[float, float]]) -> dict[str, list[float]]:
    """Wall and CPU seconds between consecutive stamps: one entry per rollout batch after the first."""
    return {"batch_s": [b[0] - a[0] for a, b in pairwise(stamps)],
            "batch_cpu_s": [b[1] - a[1] for a, b in pairwise(stamps)]}


MATRIX_PRODUCTS = ("aten::mm", "aten::addmm", "aten::bmm")


def profiled(run: Callable[[], dict], rows: int) -> dict:
    """`run()` under torch.profiler (CPU): its result with the `rows` costliest operators by self CPU time, by input
    shape, as a table, and the matrix products' share of all operators' self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as trace:
        result = run()
    events = trace.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    products = sum(e.self_cpu_time_total for e in events if e.key in MATRIX_PRODUCTS)
    table = trace.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=rows,
                                                                 max_name_column_width=60, max_shapes_column_width=60)
    return {**result, "profile": table, "matrix_product_share": products / total}


def run_kalmanrl(directory: Path, batches: int, threads: int, algorithm: str, packing: bool) -> dict:
    """`kalmanrl.jobs.trainer.train` on the default study's settings; a time stamp after each step's metrics row."""
    from kalmanrl.configuration.config import stage_settings
    from kalmanrl.jobs import trainer

    config = study_config(batches, packing)
    settings = stage_settings(config, "train", model=MODEL, task=TASK, algorithm=algorithm, seed="0")
    stamps = []
    record = trainer.record

    def stamped_record(*args, **kwargs) -> dict:
        row = record(*args, **kwargs)
        stamps.append(clocks())
        return row

    trainer.record = stamped_record  # the loop calls it through the module: this only adds the time stamps
    metrics = trainer.train(directory / "model", directory / "data.parquet", directory / "kalmanrl_run",
                            settings=settings, threads=threads).iloc[1:]
    return {**intervals(stamps),
            "completion_tokens": float(metrics["response_length"].mean()),
            "phases": {p: float(metrics[f"time_{p}"].median()) for p in ("rollout", "reward", "score", "update")}}


def run_trl(directory: Path, batches: int, threads: int) -> dict:
    """TRL's GRPOTrainer in the same shape; a time stamp at the end of every rollout batch (2 optimiser steps)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from kalmanrl.data.rewards import get_reward

    torch.set_num_threads(threads)
    config = study_config(batches)
    train = config["train"]
    tokenizer = AutoTokenizer.from_pretrained(directory / "model")
    model = AutoModelForCausalLM.from_pretrained(directory / "model", dtype=torch.float32, use_safetensors=True)
    texts, golds = prompts_in_order(config, directory / "data.parquet", tokenizer, batches)
    # TRL tokenizes a text prompt as it is; kalmanrl (`stage.encode_prompts`) without added special tokens.
    if tokenizer(texts)["input_ids"] != tokenizer(texts, add_special_tokens=False)["input_ids"]:
        raise RuntimeError("the tokenizer adds special tokens to a prompt: TRL's prompt ids would differ")
    reward = get_reward("digit_share")
    lengths: list[int] = []

    def digit_share(completions, completion_ids, answer, **_) -> list[float]:
        lengths.extend(len(ids) for ids in completion_ids)
        return [v.reward for v in reward.judge(completions, answer)]

    alg = config["algorithms"]["grpo"]
    steps_per_batch = train["ppo_epochs"] * train["mini_batches"]
    rows = train["prompts_per_step"] * train["group_size"]
    args = GRPOConfig(
        output_dir=str(directory / "trl_run"), use_cpu=True, seed=0, bf16=False, fp16=False,
        gradient_checkpointing=False, per_device_train_batch_size=rows // train["mini_batches"],
        gradient_accumulation_steps=1, steps_per_generation=train["mini_batches"], num_iterations=train["ppo_epochs"],
        num_generations=train["group_size"], max_completion_length=train["max_tokens"],
        temperature=train["temperature"], top_p=train["top_p"], top_k=0, beta=alg["beta"], loss_type="grpo",
        epsilon=alg["eps_low"], epsilon_high=alg["eps_high"], learning_rate=train["lr"],
        weight_decay=train["weight_decay"], max_grad_norm=train["max_grad_norm"], lr_scheduler_type="constant",
        max_steps=batches * steps_per_batch, shuffle_dataset=False, logging_strategy="no", save_strategy="no",
        eval_strategy="no", report_to="none", disable_tqdm=True, log_completions=False, dataloader_num_workers=0)

    class Stamps(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % steps_per_batch == 0:
                self.times.append(clocks())

    stamps = Stamps()
    trainer = GRPOTrainer(model=model, reward_funcs=digit_share, args=args, processing_class=tokenizer,
                          train_dataset=Dataset.from_dict({"prompt": texts, "answer": golds}), callbacks=[stamps])
    trainer.train()
    return {**intervals(stamps.times),
            "completion_tokens": statistics.mean(lengths[rows:])}  # the first batch is warm-up


def worker(side: str, directory: Path, batches: int, threads: int, algorithm: str, allocator: str,
           packing: bool, profile: int) -> None:
    if side == "kalmanrl":  # what every `kalmanrl` stage command does first, at $KALMANRL_CPU_DISPATCH's level
        from kalmanrl.runtime.cpu import pin_cpu_dispatch

        pin_cpu_dispatch()
    if allocator == "kept":  # what every `kalmanrl` stage command does first (kalmanrl.runtime.cpu)
        from kalmanrl.runtime.cpu import keep_freed_memory

        keep_freed_memory()
    for run in ("kalmanrl_run", "trl_run"):  # a fresh run each round: kalmanrl would resume a finished one
        shutil.rmtree(directory / run, ignore_errors=True)
    if side == "kalmanrl":
        def run() -> dict:
            return run_kalmanrl(directory, batches, threads, algorithm, packing)

        result = profiled(run, profile) if profile else run()
    else:
        result = run_trl(directory, batches, threads)
    (directory / f"{side}.json").write_text(json.dumps(result))


def measure(side: str, directory: Path, batches: int, threads: int, algorithm: str, allocator: str,
            dispatch: str, packing: bool, profile: int = 0) -> dict:
    """One run of `side` in a fresh process (`threads` torch and OpenMP threads; glibc's malloc as `allocator`;
    kalmanrl's CPU dispatch pinned at `dispatch`, its micro-batches packed or padded; under torch.profiler, listing
    `profile` operators, unless 0)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "KALMANRL_CPU_DISPATCH": dispatch}
    command = [sys.executable, str(HERE), "worker", side, str(directory), str(batches), str(threads), algorithm,
               allocator, "packed" if packing else "padded", str(profile)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the {side} run failed ({' '.join(command)}):\n{done.stderr[-4000:]}")
    return json.loads((directory / f"{side}.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=4, help="rollout batches per run, the first one is warm-up")
    parser.add_argument("--rounds", type=int, default=2, help="fresh runs of each side, alternating")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--algorithm", default="grpo", help="kalmanrl's algorithm (the default study's names)")
    parser.add_argument("--side", choices=["both", "kalmanrl", "trl"], default="both")
    parser.add_argument("--trl-allocator", choices=["default", "kept"], default="default",
                        help="TRL's process with glibc's default malloc, as a TRL user runs it (default), or with the "
                             "freed-memory reuse every kalmanrl stage sets up (kalmanrl.runtime.cpu): the two "
                             "frameworks' steps on the same allocator")
    parser.add_argument("--kalmanrl-dispatch", choices=["avx2", "baseline", "native"], default="avx2",
                        help="kalmanrl's CPU dispatch level (kalmanrl.runtime.cpu): avx2, the pin every kalmanrl "
                             "command sets by default (MKL's vendor-neutral branch: the same numbers on any x86-64, "
                             "about twice the time per matrix product), or native, as TRL runs (nothing pinned)")
    parser.add_argument("--kalmanrl-padded", action="store_true",
                        help="kalmanrl with padded micro-batches (train.packing: false) instead of packed ones")
    parser.add_argument("--kalmanrl-profile", type=int, default=0, metavar="N",
                        help="after the timed rounds, one kalmanrl run under torch.profiler: print its N costliest "
                             "operators and the matrix products' share of its CPU time")
    args = parser.parse_args()
    if args.batches < 2:
        parser.error("--batches must be at least 2: the first batch is warm-up")
    sides = ["kalmanrl", "trl"] if args.side == "both" else [args.side]
    if "trl" in sides and importlib.util.find_spec("trl") is None:
        print("TRL is not installed: pip install -e '.[bench]' (or run with --side kalmanrl)", file=sys.stderr)
        sys.exit(MISSING_TRL)

    import torch

    from _setup import build_data_and_model

    config = study_config(args.batches)
    rounds: list[dict[str, float]] = []  # each round's median CPU seconds per batch, per side
    times: dict[str, list[float]] = {side: [] for side in sides}
    cpu: dict[str, list[float]] = {side: [] for side in sides}
    tokens: dict[str, list[float]] = {side: [] for side in sides}
    phases: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build_data_and_model(tmp, config["datasets"][TASK], config["models"][MODEL]["tiny"],
                             presets=config["data"]["arithmetic_presets"],
                             templates=[config["datasets"][TASK]["template"]])
        for _ in range(args.rounds):
            rounds.append({})
            for side in sides:
                allocator = "kept" if side == "kalmanrl" else args.trl_allocator
                result = measure(side, tmp, args.batches, args.threads, args.algorithm, allocator,
                                 args.kalmanrl_dispatch, not args.kalmanrl_padded)
                rounds[-1][side] = statistics.median(result["batch_cpu_s"])
                times[side] += result["batch_s"]
                cpu[side] += result["batch_cpu_s"]
                tokens[side].append(result["completion_tokens"])
                phases += [result["phases"]] if side == "kalmanrl" else []
        if args.kalmanrl_profile:
            profile = measure("kalmanrl", tmp, args.batches, args.threads, args.algorithm, "kept",
                              args.kalmanrl_dispatch, not args.kalmanrl_padded, args.kalmanrl_profile)

    train = config["train"]
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{args.threads} thread(s); TRL's malloc: {args.trl_allocator}; kalmanrl's CPU dispatch: "
          f"{args.kalmanrl_dispatch}; kalmanrl's micro-batches: {'padded' if args.kalmanrl_padded else 'packed'}; "
          f"load average {os.getloadavg()}")
    print(f"{train['prompts_per_step']} prompts x {train['group_size']} completions, up to {train['max_tokens']} "
          f"tokens, {train['ppo_epochs'] * train['mini_batches']} optimiser steps per rollout batch; "
          f"{args.rounds} rounds x {args.batches - 1} measured batches per side")
    print("| side | wall s per rollout batch (median) | min | max | CPU s per rollout batch (median) | min | max "
          "| mean completion tokens |")
    print("|---|---|---|---|---|---|---|---|")
    for side in sides:
        print(f"| {side} | " + " | ".join(f"{f(values[side]):.3f}" for values in (times, cpu)
                                           for f in (statistics.median, min, max))
              + f" | {statistics.mean(tokens[side]):.2f} |")
    if phases:
        print("kalmanrl phases (median per round): " + "; ".join(
            ", ".join(f"{k} {v:.3f}" for k, v in p.items()) for p in phases))
    if len(sides) == 2:
        ratios = [statistics.median(values["kalmanrl"]) / statistics.median(values["trl"]) for values in (times, cpu)]
        print(f"kalmanrl / TRL = {ratios[0]:.2f} in wall time, {ratios[1]:.2f} in CPU time (target <= 0.6)")
        if len(rounds) > 1:
            per_round = [r["kalmanrl"] / r["trl"] for r in rounds]
            print(f"per round (CPU time): {', '.join(f'{x:.2f}' for x in per_round)}; "
                  f"median {statistics.median(per_round):.2f}")
    if args.kalmanrl_profile:
        print(f"kalmanrl under torch.profiler ({args.batches} batches, warm-up included): matrix products "
              f"{profile['matrix_product_share']:.0%} of the operators' self CPU time")
        print(profile["profile"])


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "worker":
    worker(sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6], sys.argv[7],
           sys.argv[8] == "packed", int(sys.argv[9]))
elif __name__ == "__main__":
    main()
