"""GRPO, KRPO, KPO and GSPO as docs/algorithms.md specifies them: the advantage estimators, the ratio transforms (values
and gradients), the clipped loss and its aggregates, the off-policy guard, the registries and the noise diagnostic."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kalmanrl.rl import algorithms
from kalmanrl.rl.algorithms import (
    check_off_policy,
    filtered_log_ratio,
    get_advantage_estimator,
    get_ratio_transform,
    k3_kl,
    policy_loss,
    ratio_needs_off_policy,
    register_advantage_estimator,
    token_noise_stats,
)
from kalmanrl.rl.kalman import kalman_gains
from test_kalman import sequential_filter


def log_probs(rows: int = 4, steps: int = 30, seed: int = 0, spread: float = 0.3):
    gen = torch.Generator().manual_seed(seed)
    old = -3 * torch.rand(rows, steps, generator=gen, dtype=torch.float64)
    logp = (old + spread * torch.randn(rows, steps, generator=gen, dtype=torch.float64)).requires_grad_()
    mask = torch.arange(steps) < torch.randint(1, steps + 1, (rows, 1), generator=gen)
    return logp, old, mask.double()


def grad_of(rho: torch.Tensor, logp: torch.Tensor, upstream: torch.Tensor) -> torch.Tensor:
    (grad,) = torch.autograd.grad((rho * upstream).sum(), logp)
    return grad


# ---------------------------------------------------------------------------------------------------------- GRPO

@pytest.mark.parametrize("eps", [1e-6, 0.0])
def test_grpo_gives_zero_advantage_to_an_all_equal_group(eps):
    """Also with eps = 0, where the formula alone would divide 0 by 0."""
    rewards = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 0.0, 1.0]], dtype=torch.float64)
    advantages = get_advantage_estimator("grpo", eps=eps)(rewards)
    assert (advantages[0] == 0).all()
    std = math.sqrt(1 / 3)  # Bessel-corrected std of [0, 1, 0, 1]
    torch.testing.assert_close(advantages[1], torch.tensor([-0.5, 0.5, -0.5, 0.5], dtype=torch.float64) / (std + eps))
    equal = torch.full((2, 4), 0.5, dtype=torch.float64)
    assert (get_advantage_estimator("grpo", eps=eps, scale="batch")(equal) == 0).all()


def test_grpo_scales_by_group_batch_or_not_at_all():
    rewards = torch.tensor([[0.0, 2.0], [1.0, 1.0]], dtype=torch.float64)
    centred = torch.tensor([[-1.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(get_advantage_estimator("grpo", scale="none")(rewards), centred)
    torch.testing.assert_close(get_advantage_estimator("grpo", scale="batch", eps=0.0)(rewards),
                               centred / rewards.std())
    torch.testing.assert_close(get_advantage_estimator("grpo", scale="group", eps=0.0)(rewards)[0],
                               centred[0] / math.sqrt(2))
    with pytest.raises(ValueError, match="batch, group, none"):
        get_advantage_estimator("grpo", scale="global")(rewards)
    with pytest.raises(ValueError, match="at least 2"):
        get_advantage_estimator("grpo")(rewards[:, :1])


# ---------------------------------------------------------------------------------------------------------- KRPO

def krpo_reference(rewards: list[float], q=1e-5, r=1e-2, x0=0.0, p0=1.0, eps=1e-8) -> list[float]:
    """docs/algorithms.md's KRPO loop for one group."""
    out, x, p = [], x0, p0
    for reward in rewards:
        prior = p + q
        gain = prior / (prior + r)
        x = x + gain * (reward - x)
        p = (1 - gain) * prior
        out.append((reward - x) / (math.sqrt(p) + eps))
    return out


@pytest.mark.parametrize("params", [{}, {"q": 1e-3, "r": 0.1, "x0": 0.5, "p0": 0.2, "eps": 0.05}],
                         ids=["defaults", "every-parameter-set"])
def test_krpo_equals_the_authors_loop_group_by_group(params):
    """Also with every parameter away from its default, so that one the estimator dropped would show."""
    rewards = torch.rand(6, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64).round(decimals=1)
    advantages = get_advantage_estimator("krpo", **params)(rewards)
    expected = torch.tensor([krpo_reference(row, **params) for row in rewards.tolist()], dtype=torch.float64)
    torch.testing.assert_close(advantages, expected, rtol=1e-9, atol=1e-9)


def test_krpo_all_zero_group_gets_zero_and_the_first_sample_gets_a_tenth_of_its_reward():
    rewards = torch.tensor([[0.0] * 12, [1.0] + [0.0] * 11, [0.5] * 12], dtype=torch.float64)
    advantages = get_advantage_estimator("krpo")(rewards)
    assert (advantages[0] == 0).all()
    assert advantages[1, 0].item() == pytest.approx(0.0995, abs=1e-4)  # (1 - K_1) / sqrt(P_1) = 0.0099 / 0.0995
    # an all-equal non-zero group is not zero: the filter starts at x0 = 0 and approaches the rewards
    gains, variances = kalman_gains(1e-5, 1e-2, 1.0, 12)
    torch.testing.assert_close(advantages[2], 0.5 * torch.cumprod(1 - gains, 0) / (variances.sqrt() + 1e-8))


def test_krpo_advantages_are_about_ten_to_twenty_times_grpos():
    rewards = torch.rand(256, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64).round()
    krpo, grpo = (get_advantage_estimator(name)(rewards).abs().mean() for name in ("krpo", "grpo"))
    assert 5 < krpo / grpo < 25


# ------------------------------------------------------------------------------------------------ ratio transforms

def test_token_ratio_is_exp_of_the_log_ratio_with_gradient_through_logp_only():
    logp, old, mask = log_probs()
    old.requires_grad_()
    rho = get_ratio_transform("token")(logp, old, mask)
    torch.testing.assert_close(rho, (logp - old).exp())
    upstream = torch.rand_like(rho)
    torch.testing.assert_close(grad_of(rho, logp, upstream), upstream * rho.detach())
    assert old.grad is None
    assert get_ratio_transform("token", clamp=0.1)(logp, old, mask).max().item() <= math.exp(0.1) + 1e-12


def test_kpo_ratio_value_is_exp_xhat_and_gradient_exp_xhat_times_dlogp():
    """xhat is the written-out filter with every parameter passed through (none the default): not the module's own
    filtered_log_ratio, which a dropped or swapped parameter would change on both sides alike."""
    logp, old, mask = log_probs(spread=1.0)
    params = {"q": 1e-2, "r": 0.5, "x0": 0.3, "p0": 2.0}
    rho = get_ratio_transform("kpo", **params)(logp, old, mask)
    xhat = sequential_filter((logp - old).detach(), mask, **params)
    torch.testing.assert_close(filtered_log_ratio(logp - old, mask, **params), xhat, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rho, xhat.exp(), rtol=1e-12, atol=0)
    upstream = torch.rand_like(rho)
    torch.testing.assert_close(grad_of(rho, logp, upstream), upstream * xhat.exp(), rtol=1e-12, atol=0)


def test_kpo_equals_the_stop_gradient_formula_of_the_spec_including_its_clamp():
    logp, old, mask = log_probs(spread=1.0)
    for clamp in (10.0, 0.05):
        xhat = filtered_log_ratio(logp - old, mask, q=1e-2, p0=1.0)
        spec = (logp - logp.detach() + xhat).clamp(max=clamp).exp()
        rho = get_ratio_transform("kpo", q=1e-2, p0=1.0, clamp=clamp)(logp, old, mask)
        torch.testing.assert_close(rho, spec, rtol=1e-12, atol=0)
        upstream = torch.rand_like(rho)
        torch.testing.assert_close(grad_of(rho, logp, upstream), grad_of(spec, logp, upstream), rtol=1e-12, atol=0)


def test_kpo_with_q_to_infinity_reduces_to_the_token_ratio():
    logp, old, mask = log_probs()
    kpo = get_ratio_transform("kpo", q=1e12)(logp, old, mask)
    token = get_ratio_transform("token")(logp, old, mask)
    valid = mask.bool()
    torch.testing.assert_close(kpo[valid], token[valid], rtol=1e-9, atol=0)
    upstream = torch.rand_like(kpo) * mask
    torch.testing.assert_close(grad_of(kpo, logp, upstream), grad_of(token, logp, upstream), rtol=1e-9, atol=0)


def test_kpo_defaults_are_the_authors():
    """Q 1e-6, R 1, x0 0, P0 0 (shuohe1995/verl-kpo core_algos.py compute_policy_loss_kpo; kpo_qwen3_4b.sh:53-54),
    checked against the written-out filter with those literals, not against KPO_DEFAULTS or filtered_log_ratio, which
    a wrong default would change on both sides alike."""
    assert algorithms.KPO_DEFAULTS == {"q": 1e-6, "r": 1.0, "x0": 0.0, "p0": 0.0}
    logp, old, mask = log_probs(steps=300, spread=1.0)
    xhat = sequential_filter((logp - old).detach(), mask, q=1e-6, r=1.0, x0=0.0, p0=0.0)
    torch.testing.assert_close(get_ratio_transform("kpo")(logp, old, mask).log(), xhat, rtol=1e-9, atol=1e-14)


def test_kpo_with_the_authors_gains_filters_with_them():
    """gains="authors_float32" (config/paper-kpo.yaml) reaches the filter; the default stays the exact gains."""
    logp, old, mask = log_probs(steps=300, spread=1.0)
    gains = kalman_gains(1e-6, 1.0, 0.0, 300, gains="authors_float32")[0]
    xhat = sequential_filter((logp - old).detach(), mask, q=1e-6, r=1.0, x0=0.0, p0=0.0, gains=gains)
    rho = get_ratio_transform("kpo", gains="authors_float32")(logp, old, mask)
    torch.testing.assert_close(rho.log(), xhat, rtol=1e-9, atol=1e-14)
    assert not torch.allclose(rho, get_ratio_transform("kpo")(logp, old, mask), rtol=1e-9, atol=0)


def test_sequence_ratio_is_gspo_exp_of_the_masked_mean_log_ratio_on_every_token():
    logp, old, mask = log_probs()
    rho = get_ratio_transform("sequence")(logp, old, mask)
    z = (logp - old).detach()
    s = ((z * mask).sum(-1) / mask.sum(-1)).exp().unsqueeze(-1)
    torch.testing.assert_close(rho, s.expand_as(rho))
    upstream = torch.rand_like(rho)
    torch.testing.assert_close(grad_of(rho, logp, upstream), upstream * s)
    # its clamp bounds log s_i, as the stop-gradient formula's: exp(clamp) and no gradient on rows above it
    mean = s.log()
    assert (mean > 0.05).any() and (mean < 0.05).any()
    spec = (logp - logp.detach() + mean).clamp(max=0.05).exp()
    clamped = get_ratio_transform("sequence", clamp=0.05)(logp, old, mask)
    torch.testing.assert_close(clamped, spec)
    torch.testing.assert_close(grad_of(clamped, logp, upstream), grad_of(spec, logp, upstream))


@pytest.mark.parametrize("name", ["token", "sequence", "kpo"])
def test_every_ratio_is_exactly_one_on_policy(name):
    logp, _, mask = log_probs()
    assert (get_ratio_transform(name)(logp, logp.detach(), mask) == 1).all()


# --------------------------------------------------------------------------------------------------- the loss

RHO = torch.tensor([[1.0, 1.5, 0.5], [0.9, 1.1, 2.0]])
ADV = torch.tensor([[1.0], [-1.0]]).expand(2, 3)
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
# per-token clipped surrogate by hand: row 0 (A=1) -1, max(-1.5, -1.2) = -1.2; row 1 (A=-1) 0.9, 1.1, max(2.0, 1.2)


@pytest.mark.parametrize("aggregate, kwargs, expected", [
    ("grpo", {}, ((-1 - 1.2) / 2 + (0.9 + 1.1 + 2.0) / 3) / 2),
    ("bnpo", {}, 1.8 / 5),
    ("dr_grpo", {}, 1.8 / (2 * 3)),
    ("dr_grpo", {"max_length": 10}, 1.8 / (2 * 10)),
    ("dapo", {}, 1.8 / 5),
    ("dapo", {"num_active_tokens": 12}, 1.8 / 12),
])
def test_clipped_surrogate_and_every_aggregate_against_hand_computed_values(aggregate, kwargs, expected):
    loss, metrics = policy_loss(RHO, ADV, MASK, eps_low=0.2, eps_high=0.2, aggregate=aggregate, **kwargs)
    assert loss.item() == pytest.approx(expected)
    assert metrics["pg_loss"].item() == pytest.approx(expected)


def test_loss_metrics_count_valid_tokens_only():
    _, metrics = policy_loss(RHO, ADV, MASK, eps_low=0.2, eps_high=0.2)
    assert metrics["clip_frac"].item() == pytest.approx(1 / 5)  # only row 0's 1.5 is clipped
    assert metrics["ratio_mean"].item() == pytest.approx(6.5 / 5)
    assert (metrics["ratio_min"].item(), metrics["ratio_max"].item()) == pytest.approx((0.9, 2.0))
    assert all(v.dim() == 0 and not v.requires_grad for v in metrics.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_clipped_surrogate_equals_autograd_through_maximum_of_the_two_branches(dtype):
    """The one-op surrogate gives the values, clip fraction and gradient of the written-out formula, bit for bit:
    ratios inside, outside and exactly on the clip range's bounds (a tie between the branches), advantages of both
    signs and 0."""
    gen = torch.Generator().manual_seed(0)
    rho = torch.exp(0.3 * torch.randn(6, 50, generator=gen)).to(dtype)
    rho[:, :5] = torch.tensor([0.8, 1.2, 1.0, 0.8 - 1e-7, 1.2 + 1e-7], dtype=dtype)
    advantages = torch.randn(6, 1, generator=gen, dtype=dtype).expand(6, 50).clone()
    advantages[0] = 0.0
    mask = (torch.arange(50) < torch.tensor([[50], [40], [1], [0], [25], [50]])).to(dtype)
    grad = torch.randn(6, 50, generator=gen, dtype=dtype)
    leaf = rho.clone().requires_grad_()
    unclipped, clipped = -advantages * leaf, -advantages * leaf.clamp(0.8, 1.2)
    torch.maximum(unclipped, clipped).backward(grad)
    reference = leaf.grad
    leaf = rho.clone().requires_grad_()
    losses, metrics = algorithms.clipped_surrogate(leaf, advantages, mask, eps_low=0.2, eps_high=0.2)
    losses.backward(grad)
    assert torch.equal(losses, torch.maximum(unclipped, clipped))
    assert torch.equal(leaf.grad, reference)
    assert 0 < metrics["clip_frac"] < 1
    assert metrics["clip_frac"] == ((clipped > unclipped).to(dtype) * mask).sum() / mask.sum()


def test_unclipped_loss_is_minus_advantage_times_ratio_and_asymmetric_clip_ranges_apply():
    loss, metrics = policy_loss(RHO, ADV, MASK, eps_low=0.2, eps_high=0.2, clip=False)
    assert loss.item() == pytest.approx(((-1 - 1.5) / 2 + (0.9 + 1.1 + 2.0) / 3) / 2)
    assert metrics["clip_frac"].item() == 0
    loss, _ = policy_loss(RHO, ADV, MASK, eps_low=0.05, eps_high=0.4, aggregate="bnpo")
    # row 0: -1, max(-1.5, -1.4) = -1.4; row 1: max(0.9, 0.95) = 0.95, 1.1, max(2.0, 1.4) = 2.0
    assert loss.item() == pytest.approx((-1 - 1.4 + 0.95 + 1.1 + 2.0) / 5)


def test_kl_term_adds_beta_times_aggregated_k3_and_needs_a_reference():
    logp = torch.zeros(2, 3, requires_grad=True)
    ref = torch.full((2, 3), math.log(2.0))
    loss, metrics = policy_loss(RHO, ADV, MASK, eps_low=0.2, eps_high=0.2, beta=0.1, logp=logp, ref_logp=ref)
    k3 = 2 - math.log(2.0) - 1
    assert metrics["kl"].item() == pytest.approx(k3)
    assert loss.item() == pytest.approx(metrics["pg_loss"].item() + 0.1 * k3)
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(RHO, ADV, MASK, eps_low=0.2, eps_high=0.2, beta=0.1, logp=logp)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-30, 30), min_size=1, max_size=20), st.lists(st.floats(-30, 30), min_size=1, max_size=20),
       st.sampled_from([torch.float32, torch.float64]))
def test_k3_kl_is_never_negative(logp, ref, dtype):
    size = min(len(logp), len(ref))
    kl = k3_kl(torch.tensor(logp[:size], dtype=dtype), torch.tensor(ref[:size], dtype=dtype))
    assert (kl >= 0).all()


def test_the_kl_term_ignores_padding_whose_log_probs_drifted_far():
    """exp(ref_logp - logp) overflows float32 past 88: at a padded position that must not make the loss NaN."""
    logp = torch.tensor([[-1.0, -2.0, -100.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -2.5, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    rho = torch.ones(1, 3)
    loss, metrics = policy_loss(rho, torch.ones(1, 3), mask, eps_low=0.2, eps_high=0.2, beta=0.1, logp=logp,
                                ref_logp=ref)
    loss.backward()
    assert math.isfinite(loss.item()) and math.isfinite(metrics["kl"].item())
    assert torch.isfinite(logp.grad).all() and logp.grad[0, 2] == 0


def test_unknown_aggregate_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown loss aggregate 'sum' \(known: bnpo, dapo, dr_grpo, grpo\)"):
        policy_loss(RHO, ADV, MASK, eps_low=0.2, eps_high=0.2, aggregate="sum")


def test_token_ratio_clamps_the_log_ratio_at_20_as_verl_does():
    logp = torch.tensor([[25.0, -25.0, 3.0]], dtype=torch.float64)
    rho = get_ratio_transform("token")(logp, torch.zeros_like(logp), torch.ones_like(logp))
    torch.testing.assert_close(rho, torch.tensor([[math.exp(20), math.exp(-20), math.exp(3)]], dtype=torch.float64))


# ------------------------------------------------------------------------------ the papers' losses, end to end

def test_krpo_recipe_loss_equals_the_authors_grpo_loss_written_out():
    """config/paper-krpo.yaml's loss against billhhh/KRPO_LLMs_RL loss.py:53-64 written out with plain tensor ops:
    -min(rho A, clip(rho, 0.8, 1.2) A) + 0.01 k3 per token, k3 = exp(ref - logp) - (ref - logp) - 1 on the masked
    log-ratio, the masked mean per sequence, then the mean over sequences; advantages from krpo_reference (the
    authors' filter, train.py:157-196). Value and gradient."""
    logp, old, mask = log_probs(rows=12, steps=40, spread=0.3)
    ref = old + 0.2 * torch.randn(old.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    rewards = [1.0, 0.0, 0.5, 0.01, 1.0, 1.0, 0.0, 0.0, 1.0, 0.5, 0.0, 1.0]
    adv = torch.tensor(krpo_reference(rewards), dtype=torch.float64).unsqueeze(-1)

    ratio = (logp - old).exp()
    log_ratio = (ref - logp) * mask
    kl = log_ratio.exp() - log_ratio - 1
    theirs = -torch.min(ratio * adv, ratio.clamp(0.8, 1.2) * adv) + 0.01 * kl
    theirs = ((theirs * mask).sum(-1) / mask.sum(-1)).mean()

    advantages = get_advantage_estimator("krpo")(torch.tensor([rewards], dtype=torch.float64)).view(-1, 1)
    torch.testing.assert_close(advantages, adv, rtol=1e-9, atol=1e-9)
    rho = get_ratio_transform("token")(logp, old, mask)
    ours, metrics = policy_loss(rho, advantages.expand_as(logp), mask, eps_low=0.2, eps_high=0.2, beta=0.01,
                                logp=logp, ref_logp=ref, aggregate="grpo")
    assert 0 < metrics["clip_frac"] < 1
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    (grad_ours,), (grad_theirs,) = torch.autograd.grad(ours, logp), torch.autograd.grad(theirs, logp)
    torch.testing.assert_close(grad_ours, grad_theirs, rtol=1e-12, atol=1e-14)


def test_kpo_recipe_loss_equals_the_authors_kpo_loss_written_out():
    """config/paper-kpo.yaml's `kpo` against shuohe1995/verl-kpo compute_policy_loss_kpo with is_clip=true
    (core_algos.py:1616-1697) written out: log rho = logp - sg(logp) + sg(xhat) clamped at 10, clip range
    (1 - 3e-4, 1 + 4e-4), seq-mean-token-mean, GRPO advantages with eps 1e-6 (core_algos.py:267-330); xhat from the
    written-out filter with Q 1e-6, R 1, P0 0, x0 0. Value and gradient."""
    logp, old, mask = log_probs(rows=8, steps=300, spread=1.0)
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    adv = ((rewards - rewards.mean()) / (rewards.std() + 1e-6)).view(-1, 1)
    xhat = sequential_filter((logp - old).detach(), mask, q=1e-6, r=1.0, x0=0.0, p0=0.0)
    ratio = (logp - logp.detach() + xhat).clamp(max=10.0).exp()
    theirs = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - 3e-4, 1 + 4e-4))
    theirs = ((theirs * mask).sum(-1) / mask.sum(-1)).mean()

    advantages = get_advantage_estimator("grpo", eps=1e-6)(rewards).view(-1, 1)
    rho = get_ratio_transform("kpo")(logp, old, mask)
    ours, metrics = policy_loss(rho, advantages.expand_as(logp), mask, eps_low=3e-4, eps_high=4e-4)
    assert 0 < metrics["clip_frac"] < 1
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    (grad_ours,), (grad_theirs,) = torch.autograd.grad(ours, logp), torch.autograd.grad(theirs, logp)
    torch.testing.assert_close(grad_ours, grad_theirs, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------------------- dual-clip

def test_dual_clip_caps_the_loss_of_negative_advantages_at_c_times_minus_a():
    # eps 0.2, c 3. A = -1: rho 5 -> max(5, 1.2) = 5 -> min(5, 3) = 3; rho 2 -> 2; rho 0.5 -> max(0.5, 0.8) = 0.8.
    # A = +1: rho 5 -> max(-5, -1.2) = -1.2, untouched by the cap. The last token, one the cap would act on, is
    # padding: no part of the loss, the dual-clip fraction or the gradient.
    logp = torch.log(torch.tensor([[5.0, 2.0, 0.5, 5.0, 5.0]], dtype=torch.float64)).requires_grad_()
    rho = get_ratio_transform("token")(logp, torch.zeros_like(logp), torch.ones_like(logp))
    adv = torch.tensor([[-1.0, -1.0, -1.0, 1.0, -1.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    loss, metrics = policy_loss(rho, adv, mask, eps_low=0.2, eps_high=0.2, aggregate="bnpo", clip_ratio_c=3.0)
    assert loss.item() == pytest.approx((3 + 2 + 0.8 - 1.2) / 4)
    assert metrics["dual_clip_frac"].item() == pytest.approx(1 / 4)
    plain, _ = policy_loss(rho, adv, mask, eps_low=0.2, eps_high=0.2, aggregate="bnpo")
    assert plain.item() == pytest.approx((5 + 2 + 0.8 - 1.2) / 4)
    (grad,) = torch.autograd.grad(loss, logp)
    # capped and clipped tokens get no gradient; rho = 2 with A = -1 gets -A * rho / 4 = 0.5
    torch.testing.assert_close(grad, torch.tensor([[0.0, 0.5, 0.0, 0.0, 0.0]], dtype=torch.float64))


def test_dual_clip_needs_c_above_one_and_the_clipped_loss():
    with pytest.raises(ValueError, match="> 1"):
        policy_loss(RHO, ADV, MASK, eps_low=0.2, eps_high=0.2, clip_ratio_c=1.0)
    with pytest.raises(ValueError, match="clip=True"):
        policy_loss(RHO, ADV, MASK, eps_low=0.2, eps_high=0.2, clip=False, clip_ratio_c=3.0)


# --------------------------------------------------------------------------------------------------------- GMPO

def test_gmpo_clips_log_ratios_with_the_advantage_sign_then_takes_the_geometric_mean():
    # Row 0, A = +1, z = [0.5, -0.5, 0.2]: z* = min(z, clamp(z, -0.4, 0.4)) = [0.4, -0.5, 0.2], mean 0.1/3.
    # Row 1, A = -1, z = [0.5, -0.5, pad]: z* = max(z, clamp(z)) = [0.5, -0.4], mean 0.05.
    z = torch.tensor([[0.5, -0.5, 0.2], [0.5, -0.5, 7.0]], dtype=torch.float64)
    old = torch.full_like(z, -2.0)
    logp = (old + z).requires_grad_()
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
    adv = torch.tensor([[1.0], [-1.0]], dtype=torch.float64).expand_as(z)
    rho = get_ratio_transform("token")(logp, old, mask)
    loss, metrics = policy_loss(rho, adv, mask, eps_low=0.4, eps_high=0.4, surrogate="geometric_mean")
    r0, r1 = math.exp(0.1 / 3), math.exp(0.05)
    assert loss.item() == pytest.approx((-1 * r0 + 1 * r1) / 2, abs=1e-8)  # verl adds 1e-8 to each length
    assert metrics["clip_frac"].item() == pytest.approx(2 / 5)
    (grad,) = torch.autograd.grad(loss, logp)
    # d/dz_t of -A exp(mean z*) / 2 = -A r / (2 L) where the token is not clipped, 0 where it is (and on padding)
    expected = torch.tensor([[0.0, -r0 / 6, -r0 / 6], [r1 / 4, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(grad, expected)


def test_gmpo_on_policy_is_minus_the_mean_sequence_advantage():
    logp, old, mask = log_probs()
    adv = torch.tensor([[0.5], [-1.0], [2.0], [0.0]], dtype=torch.float64).expand_as(logp)
    rho = get_ratio_transform("token")(logp.detach(), logp.detach(), mask)
    loss, metrics = policy_loss(rho, adv, mask, eps_low=0.4, eps_high=0.4, surrogate="geometric_mean")
    assert loss.item() == pytest.approx(-(0.5 - 1.0 + 2.0 + 0.0) / 4)
    assert metrics["clip_frac"].item() == 0


def test_gmpo_refuses_token_aggregates_and_dual_clip():
    for kwargs in ({"aggregate": "dapo"}, {"clip_ratio_c": 3.0}, {"clip": False}):
        with pytest.raises(ValueError, match="geometric_mean"):
            policy_loss(RHO, ADV, MASK, eps_low=0.4, eps_high=0.4, surrogate="geometric_mean", **kwargs)
    with pytest.raises(ValueError, match="clipped, geometric_mean"):
        policy_loss(RHO, ADV, MASK, eps_low=0.4, eps_high=0.4, surrogate="arithmetic")


def test_surrogates_are_a_registry_and_sequence_level_ones_average_over_sequences():
    with pytest.raises(ValueError, match="already registered"):
        algorithms.register_surrogate("clipped")(lambda *a, **k: None)

    @algorithms.register_surrogate("test_sequence_sum", per_sequence=True)
    def sequence_sum(rho, advantages, mask, **_):
        return (-advantages * rho * mask).sum(-1), {}

    try:
        loss, _ = policy_loss(RHO, ADV, MASK, eps_low=0.2, eps_high=0.2, surrogate="test_sequence_sum")
        assert loss.item() == pytest.approx((-(RHO * ADV * MASK).sum(-1)).mean().item())
        with pytest.raises(ValueError, match="aggregate 'grpo'"):
            algorithms.check_algorithm({"ratio": "token", "surrogate": "test_sequence_sum", "aggregate": "bnpo"}, 1)
    finally:
        algorithms.SURROGATES.unregister("test_sequence_sum")


@pytest.mark.parametrize(("spec", "message"), [
    ({"ratio": "token", "surrogate": "geometric_mean", "aggregate": "dapo"}, "aggregate 'grpo'"),
    ({"ratio": "token", "surrogate": "geometric_mean", "clip_ratio_c": 3.0}, "surrogate 'clipped'"),
    ({"ratio": "token", "clip": False, "clip_ratio_c": 3.0}, "clip: true"),
    ({"ratio": "token", "clip_ratio_c": 0.5}, "> 1"),
    ({"ratio": "token", "surrogate": "harmonic"}, "unknown surrogate"),
])
def test_check_algorithm_refuses_specs_that_would_fail_at_the_first_step(spec, message):
    with pytest.raises(ValueError, match=message):
        algorithms.check_algorithm(spec, 4)
    algorithms.check_algorithm({"ratio": "token", "surrogate": "geometric_mean", "aggregate": "grpo"}, 1)


# ------------------------------------------------------------------------------------------- off-policy guard

@pytest.mark.parametrize("ratio", ["kpo", "sequence"])
def test_training_config_refuses_kpo_or_gspo_with_one_optimiser_step_per_rollout_batch(ratio):
    assert ratio_needs_off_policy(ratio)
    with pytest.raises(ValueError, match="identically 1.*would equal GRPO"):
        check_off_policy(ratio, 1)
    check_off_policy(ratio, 4)


def test_token_ratio_is_allowed_on_policy():
    assert not ratio_needs_off_policy("token")
    check_off_policy("token", 1)


# --------------------------------------------------------------------------------------------------- registries

def test_unknown_names_fail_listing_the_known_ones():
    with pytest.raises(ValueError, match="grpo, krpo"):
        get_advantage_estimator("ppo")
    with pytest.raises(ValueError, match="kpo, sequence, token"):
        get_ratio_transform("gmpo")
    with pytest.raises(ValueError, match="kpo, sequence, token"):
        ratio_needs_off_policy("gmpo")


def test_unknown_parameters_fail_at_lookup_listing_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown parameter 'Q' \(known: q, r, x0, p0, gains, clamp\)"):
        get_ratio_transform("kpo", Q=1.0)


@register_advantage_estimator("test_leave_one_out")
def leave_one_out(rewards: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
    group = rewards.shape[-1]
    return scale * (rewards - (rewards.sum(-1, keepdim=True) - rewards) / (group - 1))


def test_registering_an_estimator_is_one_decorated_function_and_names_are_unique():
    rewards = torch.tensor([[1.0, 0.0, 0.0]])
    torch.testing.assert_close(get_advantage_estimator("test_leave_one_out", scale=2.0)(rewards),
                               torch.tensor([[2.0, -1.0, -1.0]]))
    with pytest.raises(ValueError, match="already registered"):
        register_advantage_estimator("grpo")(leave_one_out)


# -------------------------------------------------------------------------------------------- noise diagnostic

def test_noise_stats_count_sign_switches_and_runs_over_valid_neighbours():
    z = torch.tensor([[1.0, -1.0, -2.0, 3.0, 5.0], [4.0, 4.0, 4.0, 4.0, 4.0], [-1.0, 1.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [0, 0, 0, 0, 0], [1, 1, 0, 0, 0]])
    stats = token_noise_stats(z, mask)
    # valid pairs: row 0: (+,-) (-,-) (-,+); row 2: (-,+) -> 3 switches of 4; runs: row 0 three, row 2 two
    assert stats == {"sign_switch_rate": pytest.approx(3 / 4), "sign_run_length": pytest.approx(6 / 5)}


def test_noise_stats_of_the_kpo_filtered_series_are_smoother_than_raw_noise():
    z = 0.3 * torch.randn(16, 500, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mask = torch.ones_like(z)
    raw, filtered = token_noise_stats(z, mask), token_noise_stats(filtered_log_ratio(z, mask), mask)
    assert raw["sign_switch_rate"] == pytest.approx(0.5, abs=0.03)
    assert filtered["sign_switch_rate"] < 0.1 < 10 < filtered["sign_run_length"]


def test_noise_stats_without_valid_tokens_are_nan():
    stats = token_noise_stats(torch.zeros(2, 3), torch.zeros(2, 3))
    assert all(math.isnan(v) for v in stats.values())


def test_grpo_leaves_sequences_without_a_trained_token_out_of_its_mean():
    """verl's seq-mean-token-mean: a row with no trained token (a bare end-of-turn under loss_on_eos: false, or a
    row a rollout correction rejected) does not count as a zero-loss sequence."""
    per_token = torch.tensor([[1.0, 3.0, 0.0], [5.0, 0.0, 0.0], [7.0, 7.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert algorithms.aggregate_loss(per_token, mask, "grpo").item() == pytest.approx((2.0 + 5.0) / 2)
    assert algorithms.aggregate_loss(per_token, torch.zeros_like(mask), "grpo").item() == 0.0
    # with every row trained it is the plain mean over rows
    every = algorithms.aggregate_loss(per_token, torch.ones_like(mask), "grpo")
    assert every.item() == pytest.approx((4 / 3 + 5 / 3 + 7) / 3)
    share = algorithms.AGGREGATES.get("grpo").share
    assert share(mask[:2], algorithms.MiniBatch(rows=6, trained_rows=4, tokens=5)) == 2 / 4
    assert share(mask[2:], algorithms.MiniBatch(rows=6, trained_rows=4, tokens=5)) == 0.0
