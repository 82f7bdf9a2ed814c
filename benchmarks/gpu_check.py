"""The GPU check: one command that says whether training on a GPU starts and is right, and what a step costs.

    PYTHONPATH=src python benchmarks/gpu_check.py --out DIR                 # one GPU (a few minutes on one H200)
    PYTHONPATH=src python benchmarks/gpu_check.py --out DIR --device cpu    # the same checks on tiny shapes (CI)

Writes DIR/gpu_check.json (every figure, the versions, the device) and DIR/gpu_check.md (a short report); exits 1
when a correctness check fails. It needs torch with CUDA, transformers, pandas and pyarrow with what they require
(the lent GPU machine has them) and the config schema's validator, which such a machine may lack: five small pure or
binary wheels, the versions of locks/cpu.txt, fetched here beforehand into an ignored folder and installed there
first (attrs too: jsonschema and referencing import it, and none of the four packages above requires it):

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \\
        jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1 attrs==26.1.0
    # there: pip install --no-index --no-deps --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site:src ...

What it checks and measures:
1. Correctness through the real trainer (`kalmanrl.jobs.trainer.train`: one rank, the hf engine, the arithmetic task, a
   tiny Qwen2), for each train.precision: one rollout batch at learning rate 0 with beta 0.04 must give a ratio of
   exactly 1 on every token and a KL of exactly 0 (the reference is the policy, stored as the policy is).
   Then three steps at learning rate 1e-3 (rewarded by the share of digits, which a random policy already varies)
   must change the weights with finite losses.
2. A sharded checkpoint (`distributed.save_sharded`) of that policy and its optimiser loads (`load_sharded`) into a
   fresh copy with every tensor identical.
3. Memory and speed of a training step's scoring pass and update on a synthetic rollout batch, for a model of
   Qwen3-4B's shape with random weights (tests/fixtures/model_configs/Qwen3-4B; --device cpu: a tiny Qwen2), at two
   train.micro_batch_tokens budgets: the memory held between steps (weights, Adam state) and the peak
   above it in each phase, beside `kalmanrl plan`'s figures (measured / planned); the CUDA context; the update's
   tokens per second and its model FLOP utilisation (6 x parameters x tokens/s over --peak-tflops). A budget that
   runs out of GPU memory (an 80 GB card: `within_memory`) is a row saying so, not the end of the report.
4. Memory and speed of the hf engine's generation (transformers generate on that model, under the precision policy
   the trainer samples with, top-p sampling, nothing ending early): the peak above the weights beside the plan's
   figure (`plan.hf_generate_bytes`: the KV cache and one decoding step's logits and sampling tensors), and the
   generated tokens per second.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from kalmanrl.configuration.config import stage_settings, validate_config
from kalmanrl.configuration.settings import PRECISIONS, TrainSettings, config_train_settings
from kalmanrl.data.rewards import RewardFunction, Verdict, register_reward
from kalmanrl.jobs import plan
from kalmanrl.jobs.trainer import batch_logprobs, mini_batch_schedule, train, update_policy
from kalmanrl.policy.model import load_policy
from kalmanrl.policy.optim import adamw
from kalmanrl.runtime import distributed

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _setup import build_data_and_model, easy_arithmetic, synthetic_batch, tiny_spec

REPO = Path(__file__).resolve().parents[1]


@register_reward("gpu_check_digit_share")
class DigitShare(RewardFunction):
    """The share of digits in a completion: varied rewards even from a random policy, so that real steps have
    non-zero advantages to learn from (the arithmetic reward is 0 for every completion of an untrained model)."""

    def screen(self, completion: str, gold: str) -> Verdict:
        return Verdict(sum(c.isdigit() for c in completion) / max(1, len(completion)), False, None)
QWEN3_4B = REPO / "tests" / "fixtures" / "model_configs" / "Qwen3-4B"
GIB = 2**30


def train_settings(precision: str, lr: float, steps: int) -> dict:
    """The train stage's settings for the correctness runs: 8 prompts x 4 completions, two optimiser steps each. A
    learning rate of 0 is set after validation (the schema refuses a run that cannot learn)."""
    config = validate_config({
        "train": {"steps": steps, "prompts_per_step": 8, "group_size": 4, "mini_batches": 2, "max_tokens": 12,
                  "checkpoint_every": steps, "lr": lr or 1e-3, "precision": precision},
        "algorithms": {"grpo": {"advantage": "grpo", "ratio": "token", "beta": 0.04}},
        "datasets": {"arith": {**easy_arithmetic(64), "template": "krpo", "reward": "gpu_check_digit_share"}},
        "tasks": ["arith"], "benchmarks": ["arith"]})
    settings = stage_settings(config, "train", model="tiny", task="arith", algorithm="grpo", seed="0")
    settings["train"]["lr"] = lr
    return settings


def correctness(work: Path, gpus: int) -> dict:
    """Check 1 (each precision at learning rate 0, then real steps) and check 2 (the sharded checkpoint)."""
    model_dir, data = build_data_and_model(work, easy_arithmetic(64), tiny_spec(128, 2), templates=["krpo"])
    out: dict = {"precisions": {}}
    for name in [p for p in PRECISIONS if p != "auto"]:
        row = train(model_dir, data, work / f"lr0-{name}", settings=train_settings(name, 0.0, 1), gpus=gpus).iloc[0]
        out["precisions"][name] = {
            "ratio_min": float(row["ratio_min"]), "ratio_max": float(row["ratio_max"]), "kl": float(row["kl"]),
            "ok": bool(row["ratio_min"] == row["ratio_max"] == 1.0 and row["kl"] == 0.0)}
    trained = work / "trained"
    metrics = train(model_dir, data, trained, settings=train_settings("auto", 1e-3, 3), gpus=gpus)
    before, after = load_policy(model_dir)[0].state_dict(), load_policy(trained / "final")[0].state_dict()
    out["training"] = {"reward_mean": [float(v) for v in metrics["reward_mean"]],
                       "loss": [float(v) for v in metrics["loss"]],
                       "ok": bool(metrics["loss"].notna().all() and any(not torch.equal(before[k], after[k])
                                                                        for k in before))}
    out["checkpoint"] = checkpoint_round_trip(trained / "final", work / "sharded", gpus)
    return out


def checkpoint_round_trip(model_dir: Path, path: Path, gpus: int) -> dict:
    """Check 2: save the policy with a stepped optimiser, load into a fresh policy and optimiser, compare all."""
    device = torch.device("cuda" if gpus else "cpu")
    policy = load_policy(model_dir, device=device)[0]
    optimizer = adamw(policy.parameters(), {"lr": 1e-3, "weight_decay": 0.0})
    policy(input_ids=torch.ones(2, 8, dtype=torch.long, device=device), labels=torch.ones(2, 8, dtype=torch.long,
                                                                                        device=device)).loss.backward()
    optimizer.step()
    distributed.save_sharded(path, policy, optimizer)
    fresh = load_policy(model_dir, device=device)[0]
    fresh_optimizer = adamw(fresh.parameters(), {"lr": 1e-3, "weight_decay": 0.0})
    distributed.load_sharded(path, fresh, fresh_optimizer)
    weights = all(torch.equal(a, b)
                  for a, b in zip(policy.state_dict().values(), fresh.state_dict().values(), strict=True))
    states = [(optimizer.state[p], fresh_optimizer.state[q])
              for p, q in zip(policy.parameters(), fresh.parameters(), strict=True)]
    moments = all(torch.equal(a[k], b[k]) for a, b in states for k in ("exp_avg", "exp_avg_sq"))
    return {"weights_identical": weights, "adam_state_identical": moments, "ok": weights and moments}


def step_cost(policy, settings: TrainSettings, shape: plan.ModelShape, *, rows: int, prompt_len: int,
              completion_len: int, gpus: int) -> dict:
    """Check 3 for one micro-batch budget: memory held between steps and the peak above it while scoring and while
    updating (CUDA's allocator statistics; on the CPU no allocator keeps them, so only times are measured), beside
    the plan's figures for the same settings, and the update's throughput."""
    device = next(policy.parameters()).device
    cuda = device.type == "cuda"
    cfg = settings.train
    batch = synthetic_batch(shape.vocab, rows=rows, group=8, prompt_len=prompt_len,
                            completion_len=completion_len).to(device)
    schedule = mini_batch_schedule(rows, cfg, 0, 0)
    optimizer = adamw(policy.parameters(), cfg.optimizer())
    phases: dict[str, float] = {}

    def run(name: str, work) -> float:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        work()
        if cuda:
            torch.cuda.synchronize()
            phases[name] = (torch.cuda.max_memory_allocated() - held) / GIB
        return time.perf_counter() - start

    held = 0
    batch.old_logp = batch_logprobs(policy, batch, schedule[0], cfg)  # warm-up step: Adam state made
    update_policy(policy, optimizer, batch, schedule, settings)
    optimizer.zero_grad(set_to_none=True)  # as the trainer does before generating
    held = torch.cuda.memory_allocated() if cuda else 0
    score_s = run("scoring", lambda: setattr(batch, "old_logp", batch_logprobs(policy, batch, schedule[0], cfg)))
    update_s = run("updating", lambda: update_policy(policy, optimizer, batch, schedule, settings))
    tokens = int(batch.attention_mask.sum())
    estimate = plan.estimate_train(shape, settings, plan.Resources(gpus=1 if cuda else 0), prompt_len=prompt_len,
                                   completion_len=completion_len)
    planned = {"held": (estimate.static - estimate.parts["overhead"]) / GIB,
               **{name: estimate.phases[name] / GIB for name in ("scoring", "updating")}}
    measured = {"held": held / GIB, **phases} if cuda else {}
    return {"micro_batch_tokens": cfg.micro_batch_tokens, "rows": rows, "tokens": tokens,
            "seconds": {"scoring": score_s, "updating": update_s},
            "update_tokens_per_s": tokens / update_s, "measured_gib": measured, "planned_gib": planned,
            "measured_over_planned": {k: measured[k] / planned[k] for k in measured if planned.get(k)}}


def generation_cost(policy, shape: plan.ModelShape, *, rows: int, prompt_len: int, completion_len: int) -> dict:
    """Check 4: one generate call of the hf engine, `rows` completions of `completion_len` tokens (the end token's
    output row zeroed and the others scaled up, so no row ends early), under autocast on CUDA as the trainer
    generates there; CUDA's peak above what was allocated before, beside the plan's estimate."""
    from kalmanrl.configuration.settings import resolve_precision
    from kalmanrl.policy.rollout import HFEngine, SamplingConfig

    device = next(policy.parameters()).device
    cuda = device.type == "cuda"
    precision = resolve_precision("auto", device.type)
    head = policy.get_output_embeddings().weight
    saved = head.detach().clone()
    engine = HFEngine(policy, _EndToken())
    with torch.no_grad():
        head.mul_(100)[list(engine.stops)] = 0
    prompts = [torch.randint(3, shape.vocab, (prompt_len,), generator=torch.Generator().manual_seed(i)).tolist()
               for i in range(rows // 8)]
    sampling = SamplingConfig(n=8, temperature=1.0, top_p=0.9, max_tokens=completion_len, seed=0)
    policy.eval()
    try:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        held = torch.cuda.memory_allocated() if cuda else 0
        start = time.perf_counter()
        with precision.generating(engine):
            out = engine.generate(prompts, sampling)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    finally:
        with torch.no_grad():
            head.copy_(saved)
    tokens = sum(len(c.token_ids) for group in out for c in group)
    planned = plan.hf_generate_bytes(shape, rows, prompt_len + completion_len,
                                     plan.generation_cache_dtype(precision.name), batch_size=engine.batch_size) / GIB
    measured = (torch.cuda.max_memory_allocated() - held) / GIB if cuda else None
    return {"rows": rows, "prompt_len": prompt_len, "completion_len": completion_len, "tokens": tokens,
            "seconds": seconds, "tokens_per_s": tokens / seconds, "measured_gib": measured, "planned_gib": planned,
            "measured_over_planned": None if measured is None else measured / planned}


class _EndToken:
    """The tokenizer the engine needs for a model without one: an end token, a pad token, no text."""

    pad_token_id, eos_token_id = 0, 1

    def decode(self, ids, skip_special_tokens=True) -> str:
        return ""


def random_policy(config, device: torch.device) -> torch.nn.Module:
    """A float32 model of `config`'s shape with random weights (seed 0), made on `device` directly, with gradient
    checkpointing as the trainer sets it for hub models."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with device:
        policy = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return policy


def within_memory(budget: int, measure, *args, **kwargs) -> dict:
    """`measure(*args, **kwargs)`'s row, or one saying that the budget ran out of memory, so that the report (and
    checks 1 and 2) is still written: by `kalmanrl plan`'s estimate a Qwen3-4B-shaped step needs about 80 GiB at the
    smaller budget and 88 at the larger, more than an 80 GB H100 holds (an H200 holds both)."""
    try:
        return measure(*args, **kwargs)
    except torch.OutOfMemoryError as err:
        message = str(err).splitlines()[0]
    gc.collect()  # the failed step's tensors, freed with the exception
    torch.cuda.empty_cache()
    return {"micro_batch_tokens": budget, "out_of_memory": message}


def costs(work: Path, gpus: int, peak_tflops: float) -> dict:
    """Check 3 at two micro-batch budgets; the model is Qwen3-4B-shaped on a GPU, tiny on the CPU."""
    from transformers import AutoConfig

    cuda = bool(gpus)
    if cuda:
        config = AutoConfig.from_pretrained(QWEN3_4B)
        policy = random_policy(config, torch.device("cuda"))
        shape, rows, prompt_len, completion_len = plan.model_shape(config), 64, 256, 1024
    else:
        model_dir, _ = build_data_and_model(work, easy_arithmetic(16), tiny_spec(128, 2))
        policy = load_policy(model_dir)[0]
        shape = plan.model_shape(policy.config)
        rows, prompt_len, completion_len = 16, 16, 32
    policy.train()
    budgets = [4 * (prompt_len + completion_len), 16 * (prompt_len + completion_len)]
    results = []
    for budget in budgets:
        config = validate_config({
            "train": {"prompts_per_step": rows // 8, "group_size": 8, "mini_batches": 2, "max_tokens": completion_len,
                      "micro_batch_tokens": budget, "gradient_checkpointing": cuda, "precision": "auto"},
            "rollout": {"backend": "hf"}})  # the plan below is given the rows' lengths
        settings = config_train_settings(config, "cuda" if cuda else "cpu", algorithm="grpo")
        results.append(within_memory(budget, step_cost, policy, settings, shape, rows=rows, prompt_len=prompt_len,
                                     completion_len=completion_len, gpus=gpus))
    context = None
    if cuda:
        free, total = torch.cuda.mem_get_info()
        context = (total - free - torch.cuda.memory_reserved()) / GIB
    for result in results:
        if "out_of_memory" not in result:
            result["model_flop_utilisation"] = (6 * shape.params * result["update_tokens_per_s"]
                                                / (peak_tflops * 1e12) if cuda else None)
    policy.zero_grad(set_to_none=True)  # as the trainer does before generating
    try:
        generation = generation_cost(policy, shape, rows=rows, prompt_len=prompt_len,
                                     completion_len=completion_len // 4)
    except torch.OutOfMemoryError as err:
        generation = {"out_of_memory": str(err).splitlines()[0]}
    return {"model": "Qwen3-4B shape, random weights" if cuda else "tiny Qwen2 (hidden 128, 2 layers)",
            "parameters": shape.params, "budgets": results, "generation": generation, "cuda_context_gib": context,
            "peak_tflops": peak_tflops}


def markdown(report: dict) -> str:
    """The short report."""
    lines = [f"# GPU check ({report['device']}, {report['date']})", "",
             f"torch {report['torch']}, CUDA {report['cuda']}, {report['gpu']}; verdict: "
             f"**{'all checks passed' if report['ok'] else 'A CHECK FAILED'}**", "",
             "| precision | ratio min | ratio max | KL | ok |", "|---|---|---|---|---|"]
    for name, row in report["correctness"]["precisions"].items():
        lines.append(f"| {name} | {row['ratio_min']!r} | {row['ratio_max']!r} | {row['kl']:.3g} | {row['ok']} |")
    training, checkpoint = report["correctness"]["training"], report["correctness"]["checkpoint"]
    lines += ["", f"Three steps at lr 1e-3: reward {[round(r, 4) for r in training['reward_mean']]}, loss "
              f"{[round(v, 6) for v in training['loss']]}, weights moved "
              f"and losses finite: {training['ok']}. Sharded checkpoint round trip identical: {checkpoint['ok']}.", "",
              f"Step cost: {report['costs']['model']}, {report['costs']['parameters']:,} parameters; CUDA "
              f"context {report['costs']['cuda_context_gib'] or '-'} GiB.", "",
              "| micro_batch_tokens | tokens | update tokens/s | MFU | measured GiB (held / scoring / updating) | "
              "planned GiB | measured / planned |", "|---|---|---|---|---|---|---|"]

    def fmt(d: dict) -> str:
        return " / ".join(f"{v:.2f}" for v in d.values()) or "-"

    for row in report["costs"]["budgets"]:
        if "out_of_memory" in row:
            lines.append(f"| {row['micro_batch_tokens']} | out of memory: {row['out_of_memory']} | | | | | |")
            continue
        mfu = row["model_flop_utilisation"]
        lines.append(f"| {row['micro_batch_tokens']} | {row['tokens']} | {row['update_tokens_per_s']:.0f} | "
                     f"{'-' if mfu is None else f'{mfu:.1%}'} | {fmt(row['measured_gib'])} | "
                     f"{fmt(row['planned_gib'])} | {fmt(row['measured_over_planned'])} |")
    generation = report["costs"]["generation"]
    if "out_of_memory" in generation:
        return "\n".join([*lines, "", f"Generation (hf engine): out of memory: {generation['out_of_memory']}"]) + "\n"
    lines += ["", f"Generation (hf engine, top-p 0.9): {generation['rows']} rows x {generation['completion_len']} "
              f"tokens after {generation['prompt_len']}-token prompts, {generation['tokens_per_s']:.0f} tokens/s; "
              f"peak above the weights {_gib(generation['measured_gib'])} GiB, planned "
              f"{generation['planned_gib']:.2f} GiB, measured / planned {_gib(generation['measured_over_planned'])}."]
    return "\n".join(lines) + "\n"


def _gib(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="the GPU's dense bf16 peak, for the model FLOP utilisation (H100/H200 SXM: 989)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here (use --device cpu for the CPU version)")
    gpus = 1 if args.device == "cuda" else 0  # 0, not None: --device cpu stays on the CPU where CUDA is usable
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        report = {"device": args.device, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
                  "cuda": torch.version.cuda, "python": platform.python_version(),
                  "gpu": torch.cuda.get_device_name() if gpus else platform.processor() or platform.machine(),
                  "correctness": correctness(Path(tmp) / "correctness", gpus),
                  "costs": costs(Path(tmp) / "costs", gpus, args.peak_tflops)}
    correct = report["correctness"]
    report["ok"] = all(row["ok"] for row in correct["precisions"].values()) and correct["training"]["ok"] and \
        correct["checkpoint"]["ok"]
    report["seconds"] = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
