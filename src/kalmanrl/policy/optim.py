"""AdamW with linear warm-up then constant or cosine decay: the one optimiser recipe of both the warm start and RL.
The warm start counts its schedule in optimiser steps; RL counts it in rollout batches, as verl's actor does."""

from __future__ import annotations

import math

import torch


def lr_factor(step: int, *, warmup: int, total: int, schedule: str) -> float:
    """Multiplier of the base learning rate at optimiser step `step` (0-based)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    return 1.0


def rollout_lr_factor(batch: int, *, warmup: int, total: int, schedule: str) -> float:
    """Multiplier of the base learning rate for every optimiser step of rollout batch `batch` (0-based) of `total`:
    verl's schedule (constant or cosine with warm-up), which rises linearly from 0 at the first batch to 1 at batch
    `warmup`, so a run that warms up makes no update in its first rollout batch."""
    if batch < warmup:
        return batch / warmup
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * (batch - warmup) / max(1, total - warmup)))
    return 1.0


def warmup_batches(ratio: float, total: int) -> int:
    """verl's lr_warmup_steps_ratio: int(ratio x total rollout batches) warm-up batches (rounded down)."""
    return int(ratio * total)


def adamw(params, settings: dict) -> torch.optim.AdamW:
    """AdamW from a settings section with lr and weight_decay, as one fused kernel on every device: on the CPU the
    foreach and single-tensor versions take their square root from MKL's VML, whose bits depend on the CPU's vendor
    (`kalmanrl.runtime.vendor_neutral`); the fused kernel uses the IEEE square root."""
    return torch.optim.AdamW(params, lr=settings["lr"], weight_decay=settings["weight_decay"], fused=True)


def make_optimizer(params, settings: dict, total_steps: int) -> tuple[torch.optim.Optimizer,
                                                                      torch.optim.lr_scheduler.LambdaLR]:
    """AdamW and its schedule, stepped once per optimiser step, from a settings section with lr, weight_decay,
    warmup_steps and schedule (the warm start's)."""
    optimizer = adamw(params, settings)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(
        step, warmup=settings["warmup_steps"], total=total_steps, schedule=settings["schedule"]))
    return optimizer, scheduler


def make_rollout_optimizer(params, settings: dict) -> tuple[torch.optim.Optimizer,
                                                            torch.optim.lr_scheduler.LambdaLR]:
    """AdamW and its schedule, stepped once per rollout batch, from the `train` section (lr, weight_decay,
    warmup_ratio, schedule, steps)."""
    optimizer = adamw(params, settings)
    warmup = warmup_batches(settings["warmup_ratio"], settings["steps"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda batch: rollout_lr_factor(
        batch, warmup=warmup, total=settings["steps"], schedule=settings["schedule"]))
    return optimizer, scheduler
