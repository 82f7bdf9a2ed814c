"""Supervised warm start: teach the base model the task's answer format on its training split, so that RL starts
from a policy that is right some of the time. Loss on the completion tokens only (and the end-of-turn token)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from kalmanrl.data import read_dataset
from kalmanrl.io import atomic_path
from kalmanrl.model import load_policy
from kalmanrl.optim import make_optimizer
from kalmanrl.progress import progress
from kalmanrl.prompts import get_template
from kalmanrl.stage import choose_device

log = logging.getLogger(__name__)
IGNORE = -100


def tokenize_examples(tokenizer, problems: list[str], answers: list[str], solutions: list[str | None], *,
                      template: str, max_length: int) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per example: prompt tokens labelled IGNORE, target tokens + end-of-turn labelled as
    themselves; examples longer than max_length are dropped."""
    tmpl = get_template(template)
    examples = []
    for problem, answer, solution in zip(problems, answers, solutions):
        prompt = tokenizer(tmpl.render(tokenizer, problem), add_special_tokens=False)["input_ids"]
        target = tokenizer(tmpl.target(answer, solution), add_special_tokens=False)["input_ids"]
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


def run_sft(model_dir: str | Path, train_parquet: str | Path, out_dir: str | Path, *, template: str,
            settings: dict, seed: int) -> dict:
    """Fine-tune the model in `model_dir` on the train split; save to `out_dir`. Returns the final loss."""
    torch.manual_seed(seed)
    device = choose_device()
    model, tokenizer = load_policy(model_dir, device=device)
    table = read_dataset(train_parquet, split="train")
    examples = tokenize_examples(tokenizer, table.column("problem").to_pylist(), table.column("answer").to_pylist(),
                                 table.column("solution").to_pylist(), template=template,
                                 max_length=settings["max_length"])
    if not examples:
        raise ValueError(f"{train_parquet}: no training example fits sft.max_length = {settings['max_length']}")
    log.info("sft on %d of %d examples", len(examples), table.num_rows)

    optimizer, scheduler = make_optimizer(model.parameters(), settings, settings["steps"])
    generator = torch.Generator().manual_seed(seed)
    order, position, loss_ema = torch.randperm(len(examples), generator=generator), 0, None
    model.train()
    with progress(range(settings["steps"]), desc="sft", unit="step") as bar:
        for step in bar:
            if position + settings["batch_size"] > len(order):
                order, position = torch.randperm(len(examples), generator=generator), 0
            picked = order[position:position + settings["batch_size"]].tolist()
            position += settings["batch_size"]
            batch = {k: v.to(device) for k, v in collate([examples[i] for i in picked],
                                                         tokenizer.pad_token_id).items()}
            loss = model(**batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings["max_grad_norm"])
            optimizer.step()
            scheduler.step()
            loss_ema = loss.item() if loss_ema is None else 0.95 * loss_ema + 0.05 * loss.item()
            bar.set_postfix(loss=f"{loss_ema:.4f}", refresh=False)
            if (step + 1) % settings["log_every"] == 0:
                log.info("sft step %d: loss %.4f", step + 1, loss_ema)

    with atomic_path(out_dir, directory=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return {"steps": settings["steps"], "examples": len(examples), "loss": loss_ema}
