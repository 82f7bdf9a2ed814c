"""The optimiser recipe: the warm start's schedule counts optimiser steps, RL's counts rollout batches as verl's
actor does (warm-up from 0 over int(ratio x batches), then constant or cosine); AdamW's implementation follows the
device."""

from __future__ import annotations

import pytest
import torch

from kalmanrl.policy.optim import adamw, lr_factor, make_rollout_optimizer, rollout_lr_factor, warmup_batches


def test_warmup_batches_round_down_as_verl():
    assert warmup_batches(0.05, 100) == 5
    assert warmup_batches(0.05, 30) == 1  # int(1.5)
    assert warmup_batches(0.05, 19) == 0  # int(0.95): no warm-up
    assert warmup_batches(0.0, 300) == 0


def test_rollout_schedule_rises_from_zero_then_holds_or_decays():
    constant = [rollout_lr_factor(k, warmup=5, total=100, schedule="constant") for k in range(7)]
    assert constant == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.0])
    cosine = [rollout_lr_factor(k, warmup=2, total=10, schedule="cosine") for k in (0, 1, 2, 6, 10)]
    assert cosine == pytest.approx([0.0, 0.5, 1.0, 0.5, 0.0])  # (6 - 2) / (10 - 2) = 1/2 of the half cosine
    assert rollout_lr_factor(0, warmup=0, total=10, schedule="constant") == 1.0


def test_the_warm_start_schedule_counts_optimiser_steps_from_the_first():
    assert [lr_factor(k, warmup=4, total=10, schedule="constant") for k in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]


def test_the_rollout_scheduler_steps_once_per_rollout_batch():
    weight = torch.nn.Parameter(torch.zeros(3))
    settings = {"lr": 1e-3, "weight_decay": 0.1, "warmup_ratio": 0.5, "steps": 4, "schedule": "constant"}
    optimizer, scheduler = make_rollout_optimizer([weight], settings)
    lrs = []
    for _ in range(4):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.0, 5e-4, 1e-3, 1e-3])
    assert optimizer.defaults["weight_decay"] == 0.1


def test_adamw_is_fused_on_the_cpu_too():
    """The foreach AdamW's square root comes from MKL's VML on the CPU (vendor-dependent bits); the fused kernel's
    does not (tests/test_vendor_neutral.py)."""
    optimizer = adamw([torch.nn.Parameter(torch.zeros(2))], {"lr": 1e-3, "weight_decay": 0.0})
    assert optimizer.defaults["fused"] is True
