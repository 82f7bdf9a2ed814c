"""Supervised warm start: teach the base model the task's answer format on its training split, so that RL starts
from a policy that is right some of the time. Loss on the completion tokens only (and the end-of-turn token)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pandas as pd
import torch

from kalmanrl.configuration.settings import Sft
from kalmanrl.core.io import atomic_path, write_parquet
from kalmanrl.core.layout import METRICS
from kalmanrl.core.progress import progress
from kalmanrl.data.dataset import read_dataset
from kalmanrl.data.prompts import PromptTemplate
from kalmanrl.policy.model import load_policy, save_policy
from kalmanrl.policy.optim import make_optimizer
from kalmanrl.runtime.devices import resolve_device

log = logging.getLogger(__name__)
IGNORE = -100


def tokenize_examples(tokenizer, problems: list[str], answers: list[str], solutions: list[str | None], *,
                      template: PromptTemplate, max_length: int) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per example: prompt tokens (encoded by the dataset's template as RL and evaluation encode
    them) labelled IGNORE, target tokens + end-of-turn labelled as themselves; examples longer than max_length are
    dropped."""
    examples = []
    for problem, answer, solution in zip(problems, answers, solutions, strict=True):
        prompt = template.encode(tokenizer, problem)
        target = tokenizer(template.target(answer, solution), add_special_tokens=False)["input_ids"]
        target.append(tokenizer.eos_token_id)
        if len(prompt) + len(target) <= max_length:
            examples.append((prompt + target, [IGNORE] * len(prompt) + target))
    return examples


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, labels ([B, L])."""
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id)
    labels = torch.full((len(examples), width), IGNORE)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (x, y) in enumerate(examples):
        ids[i, :len(x)], labels[i, :len(y)], attention[i, :len(x)] = torch.tensor(x), torch.tensor(y), 1
    return {"input_ids": ids, "attention_mask": attention, "labels": labels}


def link_model(model_dir: str | Path, out_dir: str | Path) -> None:
    """`out_dir` as hard links to the files of the save_pretrained directory `model_dir`: the same bytes in the same
    dtype, no second copy (a relative symbolic link per file where the two cannot share files). Hidden files are
    not linked: Snakemake's `.snakemake_timestamp` marks one directory output, and a shared one would make touching
    the warm start touch the base model too."""
    with atomic_path(out_dir, directory=True) as tmp:
        for source in sorted(p for p in Path(model_dir).iterdir() if not p.name.startswith(".")):
            if not source.is_file():
                raise ValueError(f"{source}: a model directory holds only files")
            try:
                os.link(source, tmp / source.name)
            except OSError:
                os.symlink(os.path.relpath(source.resolve(), tmp.resolve()), tmp / source.name)


def run_sft(model_dir: str | Path, train_parquet: str | Path, out_dir: str | Path, *, template: PromptTemplate,
            settings: Sft, seed: int, dtype: str, gpus: int | None = None) -> dict:
    """Fine-tune the model in `model_dir` on the train split; save to `out_dir` in `dtype` (the model's configured
    dtype), with every step's loss in its metrics.parquet (a run on another machine can then be placed step by step:
    kalmanrl.reporting.fingerprint). With `steps: 0`, `out_dir` links the base model's files instead. Returns the final
    loss."""
    device = resolve_device(gpus)
    if settings.steps == 0:
        link_model(model_dir, out_dir)
        log.info("sft.steps = 0: %s links the files of %s", out_dir, model_dir)
        return {"steps": 0, "examples": 0, "loss": None}
    torch.manual_seed(seed)
    precision = settings.resolved_precision(device.type)
    model, tokenizer = load_policy(model_dir, device=device, dtype=precision.weights_dtype)
    table = read_dataset(train_parquet, split="train")
    examples = tokenize_examples(tokenizer, table.column("problem").to_pylist(), table.column("answer").to_pylist(),
                                 table.column("solution").to_pylist(), template=template,
                                 max_length=settings.max_length)
    if not examples:
        raise ValueError(f"{train_parquet}: no training example fits sft.max_length = {settings.max_length}")
    log.info("sft on %d of %d examples, precision %s", len(examples), table.num_rows, precision.name)

    optimizer, scheduler = make_optimizer(model.parameters(), settings.optimizer(), settings.steps)
    generator = torch.Generator().manual_seed(seed)
    order, position, loss_ema = torch.randperm(len(examples), generator=generator), 0, None
    losses = []
    model.train()
    with progress(range(settings.steps), desc="sft", unit="step") as bar:
        for step in bar:
            if position + settings.batch_size > len(order):
                order, position = torch.randperm(len(examples), generator=generator), 0
            picked = order[position:position + settings.batch_size].tolist()
            position += settings.batch_size
            batch = {k: v.to(device) for k, v in collate([examples[i] for i in picked],
                                                         tokenizer.pad_token_id).items()}
            with precision.autocast():
                loss = model(**batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            loss_ema = losses[-1] if loss_ema is None else 0.95 * loss_ema + 0.05 * losses[-1]
            bar.set_postfix(loss=f"{loss_ema:.4f}", refresh=False)
            if (step + 1) % settings.log_every == 0:
                log.info("sft step %d: loss %.4f", step + 1, loss_ema)

    with atomic_path(out_dir, directory=True) as tmp:
        save_policy(model, tokenizer, tmp, dtype=dtype)
        write_parquet(pd.DataFrame({"step": range(1, len(losses) + 1), "loss": losses}), tmp / METRICS)
    return {"steps": settings.steps, "examples": len(examples), "loss": loss_ema}
