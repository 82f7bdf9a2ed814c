"""Train/inference mismatch: measured every step and, if asked, corrected (docs/algorithms.md, "Rollout correction").

The rollout engine samples with its own kernels (vLLM's bf16 kernels, batch-dependent reductions), so the log-prob
it reports for a sampled token (`engine_logp`) is not exactly the trainer's for the same token under the same
weights (`old_logp`): on-policy training is slightly off-policy. Per token, with d = old_logp - engine_logp (the log
of r = pi_old / pi_engine):

    mismatch_k3            mean r - 1 - log r   k3 estimate of KL(pi_engine || pi_old): the samples are the engine's
    mismatch_abs_mean      mean |d|
    mismatch_abs_max       max |d|
    token_mult_prob_error  mean exp(|d|)        NeMo-RL's metric (1 when the two agree)
    mismatch_outside       share of tokens with r outside [0.5, 2]

A correction (a registry, `algorithms.<name>.rollout_correction: {name, params}`) turns the two log-probs into a
per-token weight on the policy-gradient term and a loss mask (the tokens the loss keeps):

    none           weight 1, mask unchanged (the default)
    token_tis      weight min(r_t, cap)                                  truncated importance sampling, per token
    sequence_tis   weight min(prod_t r_t, cap) for every token of the row
    token_mask     mask out tokens with r_t outside [low, high]          IcePop / masked importance sampling
    sequence_mask  mask out rows whose geometric mean ratio exp(mean_t d_t) is outside [low, high]
    bypass         the engine's log-probs are the old log-probs: no scoring pass, weight 1

Weights and masks are computed once per rollout batch, before the update, and carry no gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kalmanrl.core.registry import Registry
from kalmanrl.runtime import vendor_neutral

OUTSIDE = (0.5, 2.0)  # the ratio band `mismatch_outside` counts tokens beyond


@dataclass(frozen=True)
class Correction:
    """A correction bound to its parameters: `apply(old_logp, engine_logp, mask) -> (weights, mask)`, all [B, T];
    `bypass`: the engine's log-probs replace the old log-probs (and the scoring pass that computes them);
    `per_sequence`: its weight is one value per row (the only kind a per-sequence surrogate accepts)."""

    name: str
    apply: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    bypass: bool
    per_sequence: bool

    @property
    def weighs(self) -> bool:
        """Whether it weights or masks tokens, and so needs every old log-prob before the update starts."""
        return self.name != "none" and not self.bypass


ROLLOUT_CORRECTIONS: Registry[Callable[..., tuple[torch.Tensor, torch.Tensor]]] = Registry("rollout correction")


def register_rollout_correction(name: str, *, bypass: bool = False, per_sequence: bool = False) -> Callable:
    """Register `fn(old_logp, engine_logp, mask: [B, T], **params) -> (weights [B, T], mask [B, T])` under `name`."""
    return ROLLOUT_CORRECTIONS.register(name, bypass=bypass, per_sequence=per_sequence)


def get_rollout_correction(name: str, **params) -> Correction:
    """The correction `name` with `params` bound (unknown names and parameters refused, listing the known ones)."""
    return Correction(name, ROLLOUT_CORRECTIONS.bind(name, params), ROLLOUT_CORRECTIONS.trait(name, "bypass"),
                      ROLLOUT_CORRECTIONS.trait(name, "per_sequence"))


def _log_ratio(old_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """d = old_logp - engine_logp [B, T] in float64, 0 on padding."""
    return ((old_logp.double() - engine_logp.double()) * mask).detach()


def _positive(**values: float) -> None:
    for key, value in values.items():
        if not value > 0:
            raise ValueError(f"{key} must be > 0, got {value}")


def _band(low: float, high: float) -> None:
    _positive(low=low, high=high)
    if not low < 1 < high:
        raise ValueError(f"the band [low, high] must hold 1 (low < 1 < high), got [{low}, {high}]")


@register_rollout_correction("none", per_sequence=True)
def no_correction(old_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ones_like(mask), mask


@register_rollout_correction("bypass", bypass=True, per_sequence=True)
def bypass(old_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The ratio is taken against the engine's log-probs themselves (the trainer sets old_logp = engine_logp)."""
    return torch.ones_like(mask), mask


@register_rollout_correction("token_tis")
def token_tis(old_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor, *, cap: float = 2.0
              ) -> tuple[torch.Tensor, torch.Tensor]:
    _positive(cap=cap)
    weights = vendor_neutral.exp(_log_ratio(old_logp, engine_logp, mask)).clamp(max=cap)
    return weights.to(mask.dtype) * mask, mask


@register_rollout_correction("sequence_tis", per_sequence=True)
def sequence_tis(old_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor, *, cap: float = 2.0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    _positive(cap=cap)
    # min(exp(s), cap) = exp(min(s, log cap)): no overflow for long sequences.
    weights = vendor_neutral.exp(_log_ratio(old_logp, engine_logp, mask).sum(-1, keepdim=True).clamp(max=math.log(cap)))
    return weights.to(mask.dtype).expand_as(mask) * mask, mask


@register_rollout_correction("token_mask")
def token_mask(old_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor, *, low: float = 0.5,
               high: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    _band(low, high)
    d = _log_ratio(old_logp, engine_logp, mask)
    keep = ((d >= math.log(low)) & (d <= math.log(high))).to(mask.dtype)
    return mask * keep, mask * keep


@register_rollout_correction("sequence_mask", per_sequence=True)
def sequence_mask(old_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor, *, low: float = 0.5,
                  high: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    _band(low, high)
    d = _log_ratio(old_logp, engine_logp, mask)
    mean = d.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
    keep = ((mean >= math.log(low)) & (mean <= math.log(high))).to(mask.dtype)
    return mask * keep, mask * keep


def mismatch_metrics(old_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """The step's mismatch metrics (module docstring) over the valid tokens of the batch; a batch with no valid token
    is refused rather than reported as 0."""
    d = _log_ratio(old_logp, engine_logp, mask)
    valid = mask.bool()
    tokens = int(valid.sum())
    if not tokens:
        raise ValueError("no completion token to measure the train/inference mismatch on")
    gap = d.abs()[valid]
    k3 = torch.expm1(d) - d  # r - 1 - log r, r = exp(d); expm1 keeps it >= 0 under rounding
    outside = (d < math.log(OUTSIDE[0])) | (d > math.log(OUTSIDE[1]))
    return {"mismatch_k3": float(k3[valid].sum()) / tokens, "mismatch_abs_mean": float(gap.sum()) / tokens,
            "mismatch_abs_max": float(gap.max()),
            "token_mult_prob_error": float(vendor_neutral.exp(gap).sum()) / tokens,
            "mismatch_outside": float((outside & valid).sum()) / tokens}
