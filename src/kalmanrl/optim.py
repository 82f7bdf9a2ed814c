"""AdamW with linear warm-up then constant or cosine decay: the one optimiser recipe of both the warm start and RL."""

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


def make_optimizer(params, settings: dict, total_steps: int) -> tuple[torch.optim.Optimizer,
                                                                      torch.optim.lr_scheduler.LambdaLR]:
    """AdamW and its schedule from a settings section with lr, weight_decay, warmup_steps and schedule."""
    params = list(params)
    fused = all(p.is_cuda for p in params)  # one kernel for every parameter on CUDA; the foreach loop elsewhere
    optimizer = torch.optim.AdamW(params, lr=settings["lr"], weight_decay=settings["weight_decay"], fused=fused or None,
                                  foreach=None if fused else True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(
        step, warmup=settings["warmup_steps"], total=total_steps, schedule=settings["schedule"]))
    return optimizer, scheduler
