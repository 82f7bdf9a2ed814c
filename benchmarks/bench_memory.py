"""The memory plan against measured peaks: peak host memory of real training steps on the CPU (the trainer's scoring
pass `batch_logprobs` and `update_policy`, float32, AdamW, the default `train.micro_batch_tokens` and
`train.logit_chunk_tokens`) for tiny Qwen2 models of several sizes and two rollout batch shapes, next to
`kalmanrl.jobs.plan`'s estimate for the same shapes.

Each case runs in a fresh subprocess: imports, one warm-up step of a 1-layer model on 4 rows (so the code pages of
torch's forward, backward and AdamW kernels, touched once per process, are in the baseline and not counted as step
memory), a random rollout batch, then the baseline RSS (/proc/self/statm); then the model, its optimiser and two RL
steps (the second has gradients and AdamW state alive while scoring, as every later step does). Measured = the
process's peak RSS (VmHWM, see `peak_rss_bytes`) minus the baseline. glibc's malloc is pinned to mmap every block
over 1 MiB (MALLOC_MMAP_THRESHOLD_), so a freed tensor leaves the process at once and the peak is the peak of live
tensors plus the allocator's and autograd's own overhead, not the heap's history.

    PYTHONPATH=src python benchmarks/bench_memory.py            # all cases, a Markdown table
    PYTHONPATH=src python benchmarks/bench_memory.py --case small --shape A
    PYTHONPATH=src python benchmarks/bench_memory.py --head     # the log-prob head's float32 chunk copies
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

MIB = 2**20
SIZES = {  # tiny Qwen2 shapes (head_dim 32 or 64), from small to large vocabulary and depth
    "small": {"vocab_size": 512, "hidden_size": 128, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
              "intermediate_size": 512, "max_position_embeddings": 512, "tie_word_embeddings": True},
    "medium": {"vocab_size": 4096, "hidden_size": 256, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2,
               "intermediate_size": 1024, "max_position_embeddings": 512, "tie_word_embeddings": True},
    "large": {"vocab_size": 16384, "hidden_size": 384, "num_layers": 6, "num_heads": 6, "num_kv_heads": 2,
              "intermediate_size": 1536, "max_position_embeddings": 512, "tie_word_embeddings": False},
}
SHAPES = {  # prompts x G rows, prompt and completion lengths (every completion full length)
    "A": {"prompts_per_step": 2, "group_size": 8, "prompt_len": 32, "completion_len": 64},
    "B": {"prompts_per_step": 8, "group_size": 8, "prompt_len": 32, "completion_len": 128},
}
TRAIN = {"mini_batches": 4, "ppo_epochs": 1, "lr": 1e-4}  # everything else: the schema's defaults
WARM_UP = ({**SIZES["small"], "num_layers": 1}, {**SHAPES["A"], "prompts_per_step": 1, "group_size": 4})  # a row each
ALGORITHM = {"advantage": "grpo", "ratio": "token"}
STEPS = 2
HEAD_MODES = {"score": "scoring (no grad)", "update": "update, one chunk (grad, entropy)",
              "update-chunks": "update, four recomputed chunks (grad, entropy)"}


def settings(shape: dict):
    """The training settings of a shape, resolved for the CPU as a train job resolves them (the schema's defaults
    for everything TRAIN and the shape leave out; transformers generate, as the measurement has no engine)."""
    from kalmanrl.configuration.config import validate_config
    from kalmanrl.configuration.settings import config_train_settings

    config = validate_config({
        "train": {**TRAIN, "prompts_per_step": shape["prompts_per_step"], "group_size": shape["group_size"],
                  "max_tokens": shape["completion_len"]},
        "algorithms": {"bench": ALGORITHM}, "rollout": {"backend": "hf"}})
    return config_train_settings(config, "cpu")


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """This process's peak RSS since it started (VmHWM). Not getrusage's ru_maxrss: Linux carries that across exec
    from the parent, so a child started by a large process (a long pytest run) reports the parent's size."""
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))


def rollout_batch(spec: dict, shape: dict):
    """Random prompts and full-length completions, packed as the trainer packs a rollout batch."""
    import torch

    from kalmanrl.policy.batch import build_batch
    from kalmanrl.policy.rollout import Completion

    vocab, rows = spec["vocab_size"], shape["prompts_per_step"] * shape["group_size"]
    prompts = [torch.randint(3, vocab, (shape["prompt_len"],)).tolist() for _ in range(shape["prompts_per_step"])]
    length = shape["completion_len"]
    completions = [[Completion(torch.randint(3, vocab, (length,)).tolist(), [0.0] * length, "", "length")
                    for _ in range(shape["group_size"])] for _ in prompts]
    return build_batch(prompts, completions, torch.randn(rows), pad_id=0)


def train_steps(spec: dict, shape: dict, steps: int) -> None:
    """`steps` RL steps of the trainer after generation, as `trainer.train` runs them: scoring (old log-probs over the
    first epoch's mini-batches, micro-batch by micro-batch), then update_policy and the schedule's step."""
    from transformers import Qwen2ForCausalLM

    from kalmanrl.jobs.plan import _VocabularyOfSpec
    from kalmanrl.jobs.trainer import batch_logprobs, mini_batch_schedule, update_policy
    from kalmanrl.policy.model import tiny_config
    from kalmanrl.policy.optim import make_rollout_optimizer

    run = settings(shape)
    batch = rollout_batch(spec, shape)
    policy = Qwen2ForCausalLM(tiny_config(spec, _VocabularyOfSpec(spec["vocab_size"])))
    optimizer, scheduler = make_rollout_optimizer(policy.parameters(), run.train.optimizer())
    for step in range(steps):
        schedule = mini_batch_schedule(len(batch.advantages), run.train, 0, step)
        policy.eval()
        batch.old_logp = batch_logprobs(policy, batch, schedule[0], run.train)
        policy.train()
        update_policy(policy, optimizer, batch, schedule, run)
        scheduler.step()


def measure(size: str, shape_name: str) -> dict:
    """Runs in the child: peak RSS above the baseline over STEPS training steps, in bytes."""
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    train_steps(*WARM_UP, 1)
    baseline, peak_before = rss_bytes(), peak_rss_bytes()
    train_steps(SIZES[size], SHAPES[shape_name], STEPS)
    peak = peak_rss_bytes()
    if peak <= peak_before:
        raise RuntimeError(f"the process peaked before the baseline ({peak_before} bytes): nothing measured")
    return {"measured": peak - baseline, "baseline": baseline, "peak_before_baseline": peak_before}


def estimate(size: str, shape_name: str) -> dict:
    """The plan's CPU estimate of the same training step (no rollout engine: the measurement generates nothing)."""
    from kalmanrl.jobs.plan import Resources, _VocabularyOfSpec, estimate_train, model_shape
    from kalmanrl.policy.model import tiny_config

    spec, shape = SIZES[size], SHAPES[shape_name]
    model = model_shape(tiny_config(spec, _VocabularyOfSpec(spec["vocab_size"])))
    est = estimate_train(model, settings(shape), Resources(gpus=0), prompt_len=shape["prompt_len"],
                         completion_len=shape["completion_len"])
    step = {name: value for name, value in est.phases.items() if name != "generating"}
    return {"estimate": est.static + max(step.values()), "params": model.params, "static": est.static,
            "activations": est.parts["activations"], "logits": est.parts["logits"]}


def measure_head(mode: str) -> dict:
    """Runs in the child: the log-prob head alone (`token_logprobs` on a 1-layer model whose logits dwarf everything
    else), as float32 [chunk tokens, vocab] copies at the peak: the plan's LOGIT_COPIES_*. Modes: `score` (no grad),
    `update` (grad and entropy, one chunk: its logits are kept for backward) and `update-chunks` (four chunks, each
    recomputed in the backward pass)."""
    import torch
    from transformers import Qwen2ForCausalLM

    from kalmanrl.jobs.plan import _VocabularyOfSpec
    from kalmanrl.policy.logprobs import token_logprobs
    from kalmanrl.policy.model import tiny_config

    torch.set_num_threads(1)
    torch.manual_seed(0)
    train_steps(*WARM_UP, 1)
    spec = {**SIZES["small"], "vocab_size": 32768, "hidden_size": 64, "num_heads": 2, "num_kv_heads": 1,
            "intermediate_size": 64, "num_layers": 1}
    shape = {"prompts_per_step": 1, "group_size": 4, "prompt_len": 8, "completion_len": 256}
    tokens = shape["group_size"] * shape["completion_len"]
    chunk = tokens // 4 if mode == "update-chunks" else tokens
    batch = rollout_batch(spec, shape)
    policy = Qwen2ForCausalLM(tiny_config(spec, _VocabularyOfSpec(spec["vocab_size"])))
    baseline = rss_bytes()
    if mode == "score":
        with torch.no_grad():
            token_logprobs(policy, batch, chunk_tokens=chunk)
    else:
        logp, entropy = token_logprobs(policy, batch, with_entropy=True, chunk_tokens=chunk)
        (logp.sum() + entropy.sum()).backward()
    peak = peak_rss_bytes()
    copy = chunk * spec["vocab_size"] * 4
    return {"copies": (peak - baseline) / copy, "weights_in_copies": policy.num_parameters() * 4 / copy}


def child(args: list[str]) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MIB), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, __file__, "--child", *args], env=env, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"bench_memory.py --child {' '.join(args)} exited {result.returncode}:\n"
                           f"{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_case(size: str, shape_name: str) -> dict:
    result = {"size": size, "shape": shape_name, **child(["--case", size, "--shape", shape_name]),
              **estimate(size, shape_name)}
    result["ratio"] = result["estimate"] / result["measured"]
    return result


def table(results: list[dict]) -> str:
    lines = ["| model | params | shape (rows x tokens) | measured peak (MiB) | estimate (MiB) | estimate / measured |"
             " static / activations / logits (MiB) |", "|---|---|---|---|---|---|---|"]
    for r in results:
        shape = SHAPES[r["shape"]]
        rows = shape["prompts_per_step"] * shape["group_size"]
        lines.append(f"| {r['size']} | {r['params'] / 1e6:.2f}M | {r['shape']}: {rows} x "
                     f"{shape['prompt_len'] + shape['completion_len']} | {r['measured'] / MIB:.0f} | "
                     f"{r['estimate'] / MIB:.0f} | {r['ratio']:.2f} | {r['static'] / MIB:.0f} / "
                     f"{r['activations'] / MIB:.0f} / {r['logits'] / MIB:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=list(SIZES), nargs="*", default=list(SIZES))
    parser.add_argument("--shape", choices=list(SHAPES), nargs="*", default=list(SHAPES))
    parser.add_argument("--head", action="store_true", help="measure the log-prob head's copies only")
    parser.add_argument("--head-mode", choices=HEAD_MODES, default="score", help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure_head(args.head_mode) if args.head else measure(args.case[0], args.shape[0])))
        return
    if args.head:
        for mode, name in HEAD_MODES.items():
            result = child(["--head", "--head-mode", mode])
            print(f"{name}: {result['copies']:.2f} float32 [chunk tokens, vocab] copies at the peak (the model, for "
                  f"scale: {result['weights_in_copies']:.2f})")
        return
    import torch

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python "
          f"{platform.python_version()}, torch {torch.__version__}, load average {os.getloadavg()[0]:.2f}")
    results = [run_case(size, shape) for size in args.case for shape in args.shape]
    print(table(results))


if __name__ == "__main__":
    main()
