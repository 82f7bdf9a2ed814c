"""GRPO, KRPO, KPO, GSPO and GMPO as one clipped loss with two pluggable pieces (docs/algorithms.md): an advantage
estimator (rewards of each prompt's group -> one advantage per completion) and a ratio transform (token log-probs ->
the importance ratio rho the surrogate uses). Both are registries filled by decorators, looked up by the config's name.

    z   = logp - old_logp                                              # [B, T] token log-ratio
    rho = ratio_transform(logp, old_logp, mask)                        # [B, T] differentiable in logp only
    L   = max(-rho A, -clip(rho, 1 - eps_low, 1 + eps_high) A) + beta k3     # surrogate "clipped"
          (dual-clip, clip_ratio_c = c: L = min(L, -c A) where A < 0, verl's vanilla GRPO loss)
    loss = aggregate(L, mask)                                          # a registry too: each with its micro-batch share

GMPO (arXiv 2507.20673, verl's `geo_mean`) clips each token's log-ratio with the sign of its advantage *before*
averaging over the sequence, so it cannot be a ratio transform (which never sees advantages) followed by the token
clip. It is the named surrogate "geometric_mean" instead, used with the token ratio:

    z*_t = sign(A) min(sign(A) log rho_t, sign(A) clamp(log rho_t, -eps_low, eps_high))
    L_i  = -A_i exp(sum_t m_t z*_t / (sum_t m_t + 1e-8))     # A_i = the sequence's masked mean advantage
    loss = mean_i L_i (+ beta * aggregate(k3))                # sequence level: only aggregate "grpo" is accepted
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kalmanrl.core.registry import Registry
from kalmanrl.rl.correction import ROLLOUT_CORRECTIONS
from kalmanrl.rl.kalman import kalman_filter, kalman_gains
from kalmanrl.runtime import vendor_neutral

AdvantageEstimator = Callable[[torch.Tensor], torch.Tensor]
RatioTransform = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

ADVANTAGE_ESTIMATORS: Registry[Callable[..., torch.Tensor]] = Registry("advantage estimator")
RATIO_TRANSFORMS: Registry[Callable[..., torch.Tensor]] = Registry("ratio transform")
SURROGATES: Registry[Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]] = Registry("surrogate")


@dataclass(frozen=True)
class MiniBatch:
    """What an aggregate's micro-batch share needs of the whole mini-batch (over every rank): its rows, the rows with
    at least one trained token, and the trained tokens."""

    rows: int
    trained_rows: int
    tokens: int


@dataclass(frozen=True)
class Aggregate:
    """How a per-token loss [B, T] becomes one scalar (`reduce(per_token, mask, *, num_active_tokens, max_length)`),
    and the share of its mini-batch's loss one micro-batch carries (`share(mask, mini: MiniBatch)`), so that
    micro-batch losses, each weighted by its share, sum to the loss of the whole mini-batch however it is split."""

    reduce: Callable[..., torch.Tensor]
    share: Callable[[torch.Tensor, MiniBatch], float]


AGGREGATES: Registry[Aggregate] = Registry("loss aggregate")


def register_advantage_estimator(name: str) -> Callable:
    """Register `fn(rewards: [N, G], *, **params) -> advantages [N, G]` under `name`."""
    return ADVANTAGE_ESTIMATORS.register(name)


def register_ratio_transform(name: str, *, needs_off_policy: bool = False) -> Callable:
    """Register `fn(logp, old_logp, mask: [B, T], *, **params) -> rho [B, T]` under `name`. `needs_off_policy`:
    the transform equals the token ratio when old_logp == logp, so it is pointless with one optimiser step per
    rollout batch (see `check_off_policy`)."""
    return RATIO_TRANSFORMS.register(name, needs_off_policy=needs_off_policy)


def register_surrogate(name: str, *, per_sequence: bool = False) -> Callable:
    """Register `fn(rho, advantages, mask: [B, T], *, eps_low, eps_high, clip, clip_ratio_c) -> (loss, metrics)`
    under `name`: loss [B, T] per token, aggregated by the algorithm's `aggregate`, or with `per_sequence` [B] per
    sequence, averaged over sequences (which only aggregate "grpo" describes)."""
    return SURROGATES.register(name, per_sequence=per_sequence)


def get_advantage_estimator(name: str, **params) -> AdvantageEstimator:
    """The estimator `name` with `params` bound: `(rewards: [N, G]) -> advantages [N, G]` (detached)."""
    return ADVANTAGE_ESTIMATORS.bind(name, params)


def get_ratio_transform(name: str, **params) -> RatioTransform:
    """The ratio transform `name` with `params` bound: `(logp, old_logp, mask: [B, T]) -> rho [B, T]`."""
    return RATIO_TRANSFORMS.bind(name, params)


def ratio_needs_off_policy(name: str) -> bool:
    """True when the ratio transform `name` only differs from GRPO's token ratio off-policy (sequence, kpo)."""
    return RATIO_TRANSFORMS.trait(name, "needs_off_policy")


def check_off_policy(ratio_name: str, optimizer_steps_per_batch: int) -> None:
    """Refuse a ratio transform that needs several optimiser steps per rollout batch when there is only one."""
    if ratio_needs_off_policy(ratio_name) and optimizer_steps_per_batch < 2:
        raise ValueError(
            f"ratio transform {ratio_name!r} needs several optimiser steps per rollout batch (ppo_epochs x "
            f"mini_batches), got {optimizer_steps_per_batch}: with one step old_logp equals logp, the ratio is "
            f"identically 1 and clipping never acts, so the algorithm would equal GRPO. The papers take 4 (KPO) "
            f"and 24 (KRPO) steps per batch.")


def check_algorithm(spec: dict, optimizer_steps_per_batch: int) -> None:
    """Refuse an algorithm spec (the config's `algorithms.<name>`, defaults filled) that would fail or silently do
    something else at the first training step: an off-policy ratio with one step per batch, an unknown surrogate,
    GMPO's sequence-level surrogate with a token aggregate or a per-token rollout correction, dual-clip without the
    clipped surrogate."""
    check_off_policy(spec["ratio"], optimizer_steps_per_batch)
    surrogate, dual = spec.get("surrogate", "clipped"), spec.get("clip_ratio_c")
    fix = spec.get("rollout_correction", {}).get("name", "none")
    if SURROGATES.trait(surrogate, "per_sequence") and not ROLLOUT_CORRECTIONS.trait(fix, "per_sequence"):
        raise ValueError(f"surrogate {surrogate!r} is one value per sequence: a rollout correction must weight whole "
                         f"sequences too (none, sequence_tis, sequence_mask, bypass), got {fix!r}")
    if SURROGATES.trait(surrogate, "per_sequence") and spec.get("aggregate", "grpo") != "grpo":
        raise ValueError(f"surrogate {surrogate!r} is one value per sequence, averaged over sequences (aggregate "
                         f"'grpo'); got aggregate {spec['aggregate']!r}")
    if dual is not None and (surrogate != "clipped" or not spec.get("clip", True)):
        raise ValueError("clip_ratio_c (dual-clip) bounds the clipped surrogate: it needs surrogate 'clipped' and "
                         "clip: true")
    if dual is not None and dual <= 1:
        raise ValueError(f"clip_ratio_c must be > 1 (the loss of A < 0 is capped at -c A), got {dual}")


# ---------------------------------------------------------------------------------------------- advantage estimators

@register_advantage_estimator("grpo")
def grpo_advantages(rewards: torch.Tensor, *, eps: float = 1e-6, scale: str = "group") -> torch.Tensor:
    """GRPO (arXiv 2402.03300): A_i = (r_i - mean_group r) / (std r + eps), std Bessel-corrected.

    rewards: [N, G] (N prompts, G completions each). scale: "group" (std of the group), "batch" (std of all N*G
    rewards, TRL's scale_rewards="batch") or "none" (Dr. GRPO, arXiv 2503.20783: mean-centring only).
    eps: verl 1e-6 (default; the KPO code), KRPO's GRPO baseline 1e-8, TRL 1e-4.
    """
    if rewards.shape[-1] < 2:
        raise ValueError(f"GRPO needs at least 2 completions per prompt, got {rewards.shape[-1]}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0 (a negative eps can cancel the std it is added to), got {eps}")
    rewards = rewards.detach()
    centred = rewards - rewards.mean(-1, keepdim=True)
    if scale == "none":
        return centred
    if scale not in ("group", "batch"):
        raise ValueError(f"unknown GRPO scale {scale!r}; known: batch, group, none")
    std = rewards.std(-1, keepdim=True) if scale == "group" else rewards.std()
    # Equal rewards give A = 0 whatever eps is (0 included); with eps > 0 that is what the formula gives anyway.
    return torch.where(std > 0, centred / (std + eps), torch.zeros_like(centred))


@register_advantage_estimator("krpo")
def krpo_advantages(rewards: torch.Tensor, *, q: float = 1e-5, r: float = 1e-2, x0: float = 0.0, p0: float = 1.0,
                    eps: float = 1e-8) -> torch.Tensor:
    """KRPO (arXiv 2505.07527, authors' code billhhh/KRPO_LLMs_RL): a fresh scalar Kalman filter per group, fed the
    rewards in rollout order; A_i = (r_i - xhat_i) / (sqrt(P_i) + eps) with the posterior mean and variance that
    already include r_i, as the authors' code does. rewards: [N, G] -> [N, G]."""
    _positive("eps", eps, "a filter whose variance reaches 0 (q = p0 = 0) would divide by 0")
    rewards = rewards.detach()
    means = kalman_filter(rewards, q=q, r=r, x0=x0, p0=p0)
    variances = kalman_gains(q, r, p0, rewards.shape[-1])[1].to(rewards.device, rewards.dtype)
    return (rewards - means) / (vendor_neutral.sqrt(variances) + eps)


def _positive(name: str, value: float, why: str) -> None:
    """Refuse a parameter the loss needs above 0 (NaN included), naming it and why."""
    if not value > 0:
        raise ValueError(f"{name} must be > 0 ({why}), got {value}")


# -------------------------------------------------------------------------------------------------- ratio transforms

class _StopGradientRatio(torch.autograd.Function):
    """rho = exp(min(logp - sg(logp) + sg(log_ratio), clamp)) as one autograd op: value exp(min(log_ratio, clamp)),
    gradient rho * d logp, zero where the clamp acts. Autograd through the written-out formula costs four tensor ops
    forward and three backward, as much as KPO's filter; this is two (a max, then exp; the clamp only when the max
    exceeds it) and one (the mask only then)."""

    @staticmethod
    def forward(ctx, logp: torch.Tensor, log_ratio: torch.Tensor, clamp: float) -> torch.Tensor:
        top = log_ratio.max().item() if log_ratio.numel() else -math.inf  # NaN when any log-ratio is NaN
        # The values: clamped unless every log-ratio is within the clamp. The gradient: masked where the clamp acts,
        # skipped when the max is NaN (comparisons with NaN are false).
        ctx.clamped = clamp < top
        rho = vendor_neutral.exp(log_ratio if top <= clamp else log_ratio.clamp(max=clamp)).to(logp.dtype)
        ctx.save_for_backward(rho, log_ratio)
        ctx.clamp = clamp
        return rho

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        rho, log_ratio = ctx.saved_tensors
        grad_logp = grad * rho
        if ctx.clamped:  # torch.clamp's gradient passes at the bound itself
            grad_logp = grad_logp.masked_fill(log_ratio > ctx.clamp, 0.0)
        return grad_logp, None, None


def _stop_gradient_ratio(logp: torch.Tensor, log_ratio: torch.Tensor, clamp: float) -> torch.Tensor:
    """log_ratio: [B, T] or [B, 1] (one value per sequence)."""
    return _StopGradientRatio.apply(logp, log_ratio.detach().expand_as(logp), clamp)


@register_ratio_transform("token")
def token_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor, *,
                clamp: float = 20.0) -> torch.Tensor:
    """GRPO/PPO's token ratio rho = exp(clamp(logp - old_logp, -clamp, clamp)) (verl clamps at 20). [B, T]."""
    _positive("clamp", clamp, "the bound of |log rho|")
    return vendor_neutral.exp((logp - old_logp.detach()).clamp(-clamp, clamp))


@register_ratio_transform("sequence", needs_off_policy=True)
def sequence_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor, *,
                   clamp: float = 10.0) -> torch.Tensor:
    """GSPO (arXiv 2507.18071), as in verl: s_i = exp(masked mean_t z[i, t]) applied to every token through the
    stop-gradient form, so each token's gradient is s_i * d logp[i, t]. [B, T]."""
    _positive("clamp", clamp, "the upper bound of log s_i")
    mask = mask.to(logp.dtype)
    z = (logp - old_logp).detach()
    mean = (z * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
    return _stop_gradient_ratio(logp, mean, clamp)


KPO_DEFAULTS = {"q": 1e-6, "r": 1.0, "x0": 0.0, "p0": 0.0}


def filtered_log_ratio(z: torch.Tensor, mask: torch.Tensor, *, q: float = KPO_DEFAULTS["q"],
                       r: float = KPO_DEFAULTS["r"], x0: float = KPO_DEFAULTS["x0"],
                       p0: float = KPO_DEFAULTS["p0"], gains: str = "exact") -> torch.Tensor:
    """KPO's filtered log-ratio xhat [B, T]: a causal Kalman filter over each sequence's token log-ratios z [B, T],
    restarted at the first response token, padding skipped (0 there). Detached. Also the trainer's diagnostic.
    gains: "exact" (the float64 recursion, the filter the paper states) or "authors_float32" (the authors' code's
    float32 closed form, up to 2.4% off at q 1e-6: kalman.py's `_authors_float32_gains`)."""
    return kalman_filter(z.detach(), mask, q=q, r=r, x0=x0, p0=p0, gains=gains)


@register_ratio_transform("kpo", needs_off_policy=True)
def kpo_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor, *, q: float = KPO_DEFAULTS["q"],
              r: float = KPO_DEFAULTS["r"], x0: float = KPO_DEFAULTS["x0"], p0: float = KPO_DEFAULTS["p0"],
              gains: str = "exact", clamp: float = 10.0) -> torch.Tensor:
    """KPO (arXiv 2602.10609, authors' code shuohe1995/verl-kpo): rho = exp(min(logp - sg(logp) + sg(xhat), clamp))
    with xhat = filtered_log_ratio(logp - old_logp): value exp(xhat), gradient exp(xhat) * d logp. [B, T]."""
    _positive("clamp", clamp, "the upper bound of the filtered log-ratio")
    xhat = filtered_log_ratio(logp.detach() - old_logp, mask, q=q, r=r, x0=x0, p0=p0, gains=gains)
    return _stop_gradient_ratio(logp, xhat, clamp)


# ------------------------------------------------------------------------------------------------------------ loss

def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def register_aggregate(name: str, *, share: Callable[[torch.Tensor, MiniBatch], float]) -> Callable:
    """Register `reduce(per_token, mask, *, num_active_tokens, max_length) -> scalar` under `name`, with the
    micro-batch `share` that makes its micro-batch losses add up to the mini-batch's (see `Aggregate`)."""
    def add(reduce: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        AGGREGATES.register(name, Aggregate(reduce, share))
        return reduce

    return add


def aggregate_loss(per_token: torch.Tensor, mask: torch.Tensor, mode: str = "grpo", *,
                   num_active_tokens: int | None = None, max_length: int | None = None) -> torch.Tensor:
    """Reduce a per-token loss [B, T] to a scalar with the aggregate `mode` (names as in TRL; see each entry)."""
    return AGGREGATES.get(mode).reduce(per_token, mask.to(per_token.dtype), num_active_tokens=num_active_tokens,
                                       max_length=max_length)


def _share_of_rows(mask: torch.Tensor, mini: MiniBatch) -> float:
    return mask.shape[0] / mini.rows


def _share_of_trained_rows(mask: torch.Tensor, mini: MiniBatch) -> float:
    trained = int((mask.sum(-1) > 0).sum())
    return mask.shape[0] / mini.rows if mini.trained_rows == mini.rows else trained / max(1, mini.trained_rows)


@register_aggregate("grpo", share=_share_of_trained_rows)
def _sequence_mean(per_token: torch.Tensor, mask: torch.Tensor, **_) -> torch.Tensor:
    """The mean over sequences of each sequence's masked token mean. A sequence with no trained token (a bare
    end-of-turn under `loss_on_eos: false`, a row a rollout correction rejected) is left out of the mean, as verl's
    seq-mean-token-mean leaves it (0 when no sequence has one)."""
    lengths = mask.sum(-1)
    return _mean_over_trained_rows((per_token * mask).sum(-1) / lengths.clamp(min=1), lengths > 0)


def _mean_over_trained_rows(per_sequence: torch.Tensor, trained: torch.Tensor) -> torch.Tensor:
    """The mean of per-sequence values [B] over the rows with a trained token (`trained` [B]; 0 when none has one):
    the mean that `_share_of_trained_rows` weights micro-batches for."""
    if bool(trained.all()):
        return per_sequence.mean()
    return per_sequence[trained].sum() / trained.sum().clamp(min=1)


@register_aggregate("bnpo", share=lambda mask, mini: mask.sum().item() / max(1, mini.tokens))
def _token_mean(per_token: torch.Tensor, mask: torch.Tensor, **_) -> torch.Tensor:
    """The masked token mean of this micro-batch, weighted (share) into the token mean of the whole mini-batch:
    `dapo`'s loss. TRL's bnpo averages the micro-batches' means, so it depends on their size; here a micro-batch is
    a memory budget and no loss may depend on it."""
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


@register_aggregate("dr_grpo", share=_share_of_rows)
def _sum_over_max_length(per_token: torch.Tensor, mask: torch.Tensor, *, max_length: int | None = None,
                         **_) -> torch.Tensor:
    """The masked sum over B x max_length, max_length = the configured maximum completion length (default T)."""
    return (per_token * mask).sum() / (per_token.shape[0] * (max_length or per_token.shape[-1]))


@register_aggregate("dapo", share=lambda mask, mini: 1.0)
def _sum_over_active_tokens(per_token: torch.Tensor, mask: torch.Tensor, *, num_active_tokens: int | None = None,
                            **_) -> torch.Tensor:
    """The masked sum over the active tokens of the whole accumulated batch (default: this micro-batch's), so that
    summing the micro-batch losses gives the token mean of the whole batch."""
    return (per_token * mask).sum() / max(1, num_active_tokens if num_active_tokens is not None else int(mask.sum()))


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi || ref) per token: exp(d) - d - 1 >= 0 with d = ref_logp - logp, written as
    expm1(d) - d so rounding cannot make it negative. [B, T]. With `mask`, 0 (and no gradient) outside it: a padded
    position's log-probs may drift far enough that exp(d) overflows, and inf x 0 would make the loss NaN."""
    d = ref_logp.detach() - logp
    if mask is not None:
        d = torch.where(mask.bool(), d, 0.0)
    return torch.expm1(d) - d


def _ratio_stats(rho: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    valid = mask.bool()
    if not valid.any():
        return dict.fromkeys(("ratio_mean", "ratio_min", "ratio_max"), rho.new_tensor(torch.nan))
    return {"ratio_mean": _masked_mean(rho, mask), "ratio_min": rho.masked_fill(~valid, torch.inf).amin(),
            "ratio_max": rho.masked_fill(~valid, -torch.inf).amax()}


class _PessimisticMax(torch.autograd.Function):
    """PPO's max(-A rho, -A clip(rho)) [B, T] as one autograd op, with a 0/1 float [B, T] of where the clip is the
    larger term (not differentiable). The gradient is -A where the clip is not larger and 0 where it is: the numbers
    autograd gets through torch.maximum of the two branches (a tie gives each branch half, and the halves add back up
    exactly; where the clip is larger, the clamp passes no gradient), up to the sign of a zero. maximum's backward
    takes a third of the loss's time and slows down when the clip acts on some tokens and not others (its masks
    branch per element); this backward is two products."""

    @staticmethod
    def forward(ctx, rho: torch.Tensor, advantages: torch.Tensor, low: float, high: float):
        slope = -advantages
        unclipped = slope * rho
        clipped = slope * rho.clamp(low, high)
        # 1 where unclipped >= clipped, 0 where the clip is larger, without a bool tensor (slow to fill on the CPU).
        keep = torch.sign(unclipped - clipped).add_(1.0).clamp_(max=1.0)
        ctx.save_for_backward(slope, keep)
        clipping = 1.0 - keep
        ctx.mark_non_differentiable(clipping)
        return torch.maximum(unclipped, clipped), clipping

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _):
        slope, keep = ctx.saved_tensors
        return grad * slope * keep, None, None, None


@register_surrogate("clipped")
def clipped_surrogate(rho: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *, eps_low: float,
                      eps_high: float, clip: bool = True, clip_ratio_c: float | None = None
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's per-token loss [B, T] max(-A rho, -A clip(rho)); with clip_ratio_c = c also min(., -c A) where A < 0
    (dual-clip, arXiv 1912.09729, as verl's vanilla loss)."""
    if not clip:
        if clip_ratio_c is not None:
            raise ValueError("clip_ratio_c (dual-clip) needs clip=True")
        return -advantages * rho, {"clip_frac": rho.new_zeros(())}
    surrogate, clipping = _PessimisticMax.apply(rho, advantages, 1 - eps_low, 1 + eps_high)
    metrics = {"clip_frac": _masked_mean(clipping, mask)}
    if clip_ratio_c is not None:
        if clip_ratio_c <= 1:
            raise ValueError(f"clip_ratio_c must be > 1, got {clip_ratio_c}")
        cap = -advantages * clip_ratio_c
        negative = advantages < 0
        metrics["dual_clip_frac"] = _masked_mean((negative & (surrogate > cap)).to(rho.dtype), mask)
        surrogate = torch.where(negative, torch.minimum(surrogate, cap), surrogate)
    return surrogate, metrics


@register_surrogate("geometric_mean", per_sequence=True)
def geometric_mean_surrogate(rho: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *, eps_low: float,
                             eps_high: float, clip: bool = True, clip_ratio_c: float | None = None
                             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GMPO's loss per sequence [B] (see the module docstring): the token log-ratios log rho, clipped in log space to
    [-eps_low, eps_high] on the side the advantage's sign makes pessimistic, geometric-mean ratio per sequence,
    times the sequence's mean advantage. verl's `geo_mean` denominators (sum of the mask + 1e-8) are kept. GMPO is
    always clipped and has no dual-clip."""
    if not clip or clip_ratio_c is not None:
        raise ValueError(f"surrogate 'geometric_mean' takes clip=True and no clip_ratio_c; got clip={clip}, "
                         f"clip_ratio_c={clip_ratio_c}")
    log_rho = vendor_neutral.log(rho)
    sign = torch.sign(advantages)
    pessimistic = sign * torch.minimum(sign * log_rho, sign * log_rho.clamp(-eps_low, eps_high))
    length = mask.sum(-1) + 1e-8
    ratio = vendor_neutral.exp((pessimistic * mask).sum(-1) / length)
    advantage = (advantages * mask).sum(-1) / length
    clip_frac = _masked_mean((sign * log_rho > sign * log_rho.clamp(-eps_low, eps_high)).to(rho.dtype), mask)
    return -advantage * ratio, {"clip_frac": clip_frac}


def policy_loss(rho: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *, eps_low: float,
                eps_high: float, clip: bool = True, beta: float = 0.0, logp: torch.Tensor | None = None,
                ref_logp: torch.Tensor | None = None, aggregate: str = "grpo", num_active_tokens: int | None = None,
                max_length: int | None = None, surrogate: str = "clipped", clip_ratio_c: float | None = None,
                weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The policy-gradient surrogate plus beta * k3, aggregated (see `aggregate_loss`).

    rho, advantages, mask, logp, ref_logp: [B, T] (advantages already broadcast over tokens). surrogate "clipped":
    PPO's clipped token loss (clip=False gives the unclipped -A * rho, KPO-unclipped; clip_ratio_c = c adds verl's
    dual-clip for A < 0); "geometric_mean": GMPO's sequence loss, eps_low / eps_high bounding the log-ratio, averaged
    over sequences (aggregate must be "grpo"); others via `register_surrogate`. The KL term needs logp and ref_logp
    when beta > 0. `weights` [B, T] (a rollout correction's, detached) multiply each token's surrogate term before
    aggregation (a per-sequence surrogate's by its row's weight, the same on every token); the KL term is unweighted.
    Returns (loss, metrics); metrics are detached 0-dim tensors: pg_loss, clip_frac (share of valid tokens whose
    clip is the active term), dual_clip_frac (with clip_ratio_c: share of valid tokens capped at -c A),
    ratio_mean / ratio_min / ratio_max over valid tokens, and kl (masked mean of k3) when ref_logp is given.
    """
    mask = mask.to(rho.dtype)
    advantages = advantages.detach()
    fn = SURROGATES.get(surrogate)
    losses, metrics = fn(rho, advantages, mask, eps_low=eps_low, eps_high=eps_high, clip=clip,
                         clip_ratio_c=clip_ratio_c)
    if SURROGATES.trait(surrogate, "per_sequence"):
        if aggregate != "grpo":
            raise ValueError(f"surrogate {surrogate!r} is one value per sequence, averaged over sequences: it takes "
                             f"aggregate 'grpo', got {aggregate!r}")
        if weights is not None:
            losses = losses * (weights.detach() * mask).amax(-1)
        pg_loss = _mean_over_trained_rows(losses, mask.sum(-1) > 0)
    else:
        if weights is not None:
            losses = losses * weights.detach()
        pg_loss = aggregate_loss(losses, mask, aggregate, num_active_tokens=num_active_tokens, max_length=max_length)
    loss = pg_loss
    metrics = {"pg_loss": pg_loss.detach(), **{k: v.detach() for k, v in metrics.items()},
               **_ratio_stats(rho.detach(), mask)}
    if beta > 0 and (logp is None or ref_logp is None):
        raise ValueError("policy_loss with beta > 0 needs logp and ref_logp for the k3 KL term")
    if ref_logp is not None and logp is not None:
        kl = k3_kl(logp, ref_logp, mask)
        metrics["kl"] = _masked_mean(kl.detach(), mask)
        if beta > 0:
            loss = loss + beta * aggregate_loss(kl, mask, aggregate, num_active_tokens=num_active_tokens,
                                                max_length=max_length)
    return loss, metrics


# ------------------------------------------------------------------------------------------------------ diagnostics

def token_noise_stats(z: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """The KPO paper's token-level noise diagnostic on a log-ratio series z [B, T]: how often sign(z) switches
    between adjacent valid tokens (sign_switch_rate) and the mean length of same-sign runs (sign_run_length).
    Adjacent = neighbouring positions that are both valid (the same as consecutive valid tokens for right padding).
    NaN when there is no adjacent pair / no valid token."""
    valid = mask.bool()
    sign = torch.sign(z.detach())
    pairs = valid[..., 1:] & valid[..., :-1]
    switches = ((sign[..., 1:] != sign[..., :-1]) & pairs).sum().item()
    num_pairs, tokens = pairs.sum().item(), valid.sum().item()
    runs = tokens - (num_pairs - switches)  # a valid token starts a run unless it continues its neighbour's sign
    return {"sign_switch_rate": switches / num_pairs if num_pairs else float("nan"),
            "sign_run_length": tokens / runs if runs else float("nan")}


# ------------------------------------------------------------------------------------------------- reward shaping
def overlong_penalty(lengths: torch.Tensor, max_tokens: int, buffer: int, penalty: float) -> torch.Tensor:
    """DAPO's soft overlong punishment (arXiv 2503.14476; verl's overlong_buffer) for completion lengths [...]:
    0 up to max_tokens - buffer tokens, then falling linearly to -penalty at max_tokens (0 everywhere when buffer
    is 0). A completion cut at max_tokens gets the whole penalty."""
    if buffer == 0:
        return torch.zeros_like(lengths, dtype=torch.float64)
    excess = (lengths.double() - (max_tokens - buffer)).clamp(min=0)
    return -penalty * excess.clamp(max=buffer) / buffer
