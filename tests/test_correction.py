"""Train/inference mismatch, measured and corrected (kalmanrl.rl.correction): every correction's weights and mask
against a hand-computed example, the metrics against their definitions, the config checks, and training with the hf
engine, whose sampling log-probs are the trainer's function (mismatch 0 to float rounding)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import digit_share  # noqa: F401  (registers the "digit_share" reward)
from kalmanrl.configuration.config import ConfigError, stage_settings, validate_config
from kalmanrl.jobs.trainer import NonFiniteLossError, correct
from kalmanrl.rl import algorithms
from kalmanrl.rl.correction import get_rollout_correction, mismatch_metrics

# Per-token ratios r = pi_old / pi_engine of two completions, the second one token shorter (padding last). The
# padding's ratio is far from 1 (0.1) so that a correction reading it would change every row-1 result below.
RATIOS = [[3.0, 0.25, 1.0, 1.5], [0.8, 1.2, 2.5, 0.1]]
MASK = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0]])


def logps() -> tuple[torch.Tensor, torch.Tensor]:
    """(old_logp, engine_logp) whose per-token ratios are RATIOS."""
    engine = torch.log(torch.tensor([[0.5, 0.4, 0.3, 0.2], [0.6, 0.5, 0.1, 0.7]]))
    return engine + torch.log(torch.tensor(RATIOS)), engine


@pytest.mark.parametrize("name, params, weights, mask", [
    ("token_tis", {"cap": 2.0}, [[2.0, 0.25, 1.0, 1.5], [0.8, 1.2, 2.0, 0.0]], MASK.tolist()),
    # products 1.125 and 2.4, the second capped at 2
    ("sequence_tis", {"cap": 2.0}, [[1.125] * 4, [2.0, 2.0, 2.0, 0.0]], MASK.tolist()),
    # 3 > 2 and 0.25 < 0.5 leave, as does 2.5 > 2
    ("token_mask", {}, [[0.0, 0.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]], [[0.0, 0.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]]),
    # geometric means 1.125 ** (1/4) = 1.030 (kept) and 2.4 ** (1/3) = 1.339 (rejected)
    ("sequence_mask", {"low": 0.9, "high": 1.1}, [[1.0] * 4, [0.0] * 4], [[1.0] * 4, [0.0] * 4]),
    # 1.339 > 1.3 still rejects row 1: its mean is over its 3 tokens (over 4, 2.4 ** (1/4) = 1.245, it would stay;
    # with the padding's 0.1 read, 0.24 ** (1/3) = 0.62, too)
    ("sequence_mask", {"low": 0.5, "high": 1.3}, [[1.0] * 4, [0.0] * 4], [[1.0] * 4, [0.0] * 4]),
])
def test_each_correction_equals_its_hand_computed_weights_and_mask(name, params, weights, mask):
    old, engine = logps()
    got_weights, got_mask = get_rollout_correction(name, **params).apply(old, engine, MASK)
    torch.testing.assert_close(got_weights, torch.tensor(weights), rtol=1e-6, atol=1e-6)
    assert got_mask.tolist() == mask
    assert not got_weights.requires_grad


@pytest.mark.parametrize("side", ["old_logp", "engine_logp"])
def test_a_non_finite_log_prob_of_a_sampled_token_is_refused_not_masked(side):
    """token_mask would drop the token (NaN lies in no band) and train on the rest as if nothing happened."""
    old, engine = logps()
    batch = SimpleNamespace(old_logp=old, engine_logp=engine, completion_mask=MASK)
    getattr(batch, side)[0, 1] = math.nan
    run = SimpleNamespace(settings=SimpleNamespace(algorithm=SimpleNamespace(correction=get_rollout_correction(
        "token_mask"))))
    with pytest.raises(NonFiniteLossError, match="1 non-finite old or engine log-probs of sampled tokens"):
        correct(run, batch)
    getattr(batch, side)[0, 1] = 0.0
    getattr(batch, side)[1, 3] = math.nan  # padding: not a sampled token
    correct(run, batch)
    assert batch.loss_mask[1, 3] == 0


def test_the_mismatch_metrics_follow_their_definitions():
    old, engine = logps()
    ratios = [r for row, keep in zip(RATIOS, MASK.tolist(), strict=True) for r, k in zip(row, keep, strict=True) if k]
    d = [math.log(r) for r in ratios]
    metrics = mismatch_metrics(old, engine, MASK)
    assert metrics == pytest.approx({
        "mismatch_k3": sum(r - 1 - math.log(r) for r in ratios) / 7,
        "mismatch_abs_mean": sum(abs(x) for x in d) / 7, "mismatch_abs_max": math.log(4),
        "token_mult_prob_error": sum(math.exp(abs(x)) for x in d) / 7,
        "mismatch_outside": 3 / 7}, rel=1e-6)
    with pytest.raises(ValueError, match="no completion token"):
        mismatch_metrics(old, engine, torch.zeros_like(MASK))


def test_weights_multiply_the_surrogate_before_aggregation_and_not_the_kl():
    rho, mask = torch.ones(2, 4), MASK
    advantages = torch.tensor([[1.0] * 4, [-2.0] * 4])
    weights = torch.tensor([[2.0, 0.5, 1.0, 1.0], [1.0, 1.0, 3.0, 0.0]])
    loss, _ = algorithms.policy_loss(rho, advantages, mask, eps_low=0.2, eps_high=0.2, clip=False, weights=weights)
    # grpo aggregate: the mean over rows of each row's token mean of -A rho w
    assert loss.item() == pytest.approx(((-(2 + 0.5 + 1 + 1) / 4) + (2 * (1 + 1 + 3) / 3)) / 2)
    logp = torch.zeros(2, 4, requires_grad=True)
    ref = torch.full((2, 4), -0.1)
    with_kl, metrics = algorithms.policy_loss(rho, advantages, mask, eps_low=0.2, eps_high=0.2, clip=False,
                                              weights=weights, beta=1.0, logp=logp, ref_logp=ref)
    assert with_kl.item() == pytest.approx(loss.item() + metrics["kl"].item())


def test_a_per_sequence_surrogate_takes_its_rows_weight():
    rho, mask = torch.ones(2, 4), MASK
    advantages = torch.tensor([[1.0] * 4, [-2.0] * 4])
    weights = torch.tensor([[1.5] * 4, [2.0, 2.0, 2.0, 0.0]])
    loss, _ = algorithms.policy_loss(rho, advantages, mask, eps_low=0.2, eps_high=0.2, surrogate="geometric_mean",
                                     weights=weights)
    assert loss.item() == pytest.approx((-1 * 1.5 + 2 * 2.0) / 2, rel=1e-6)


def config_with(correction: dict, **algorithm) -> dict:
    return validate_config({
        "train": {"steps": 2, "prompts_per_step": 4, "group_size": 4, "mini_batches": 2, "max_tokens": 12,
                  "lr": 1e-3},
        "datasets": {"arith": {"loader": "arithmetic", "template": "krpo", "reward": "digit_share"}},
        "tasks": ["arith"], "benchmarks": ["arith"],
        "algorithms": {"fixed": {"advantage": "grpo", "rollout_correction": correction, **algorithm}}})


@pytest.mark.parametrize("correction, algorithm, key, message", [
    ({"name": "nope"}, {}, "algorithms.fixed.rollout_correction.name", "unknown rollout correction 'nope'"),
    ({"name": "token_tis", "params": {"cap": -1}}, {}, "algorithms.fixed.rollout_correction.params", "cap"),
    ({"name": "token_mask", "params": {"low": 1.5}}, {}, "algorithms.fixed.rollout_correction.params", "hold 1"),
    ({"name": "token_tis", "params": {"ceiling": 2}}, {}, "algorithms.fixed.rollout_correction.params", "ceiling"),
    ({"name": "token_tis"}, {"surrogate": "geometric_mean"}, "algorithms.fixed", "one value per sequence"),
])
def test_a_bad_correction_is_refused_at_validation_naming_its_key(correction, algorithm, key, message):
    with pytest.raises(ConfigError, match=message) as err:
        config_with(correction, **algorithm)
    assert str(err.value).startswith(f"config.{key}: "), err.value


def settings_with(correction: dict) -> dict:
    return stage_settings(config_with(correction), "train", model="tiny", task="arith", algorithm="fixed", seed="0")


MISMATCH = ["mismatch_k3", "mismatch_abs_mean", "mismatch_abs_max", "token_mult_prob_error", "mismatch_outside"]


def test_with_the_hf_engine_the_mismatch_is_zero_to_float_rounding(tmp_path, tiny_model_dir, arithmetic_parquet):
    """The hf engine samples from the policy module the trainer scores with (the same function, computed token by
    token with a KV cache instead of in one pass): what differs is rounding, and every metric says so."""
    from kalmanrl.jobs.trainer import train

    metrics = train(tiny_model_dir, arithmetic_parquet, tmp_path, settings=settings_with({}))
    assert metrics["mismatch_abs_max"].between(0, 1e-5).all(), metrics["mismatch_abs_max"].tolist()
    assert metrics["mismatch_k3"].between(0, 1e-10).all()
    assert (metrics["token_mult_prob_error"] - 1).abs().lt(1e-5).all()
    assert (metrics["mismatch_outside"] == 0).all()


def test_bypass_runs_no_scoring_pass_and_starts_from_ratio_one(tmp_path, tiny_model_dir, arithmetic_parquet,
                                                               monkeypatch):
    from kalmanrl.jobs import trainer

    scored, first_ratios = [], []
    monkeypatch.setattr(trainer, "batch_logprobs", lambda *a, **k: scored.append(1))
    policy_loss = algorithms.policy_loss

    def recording(rho, *args, **kwargs):
        first_ratios.append(rho.detach()[args[1].bool()])  # args: advantages, mask
        return policy_loss(rho, *args, **kwargs)

    monkeypatch.setattr(trainer.algorithms, "policy_loss", recording)
    metrics = trainer.train(tiny_model_dir, arithmetic_parquet, tmp_path, settings=settings_with({"name": "bypass"}))
    assert not scored
    assert not set(MISMATCH) & set(metrics.columns)  # nothing to measure: the old log-probs are the engine's
    # The first micro-batch's ratio is pi_theta / pi_engine before any update: 1 up to the engine's rounding.
    torch.testing.assert_close(first_ratios[0], torch.ones_like(first_ratios[0]), rtol=0, atol=1e-4)


def test_truncated_importance_sampling_with_no_mismatch_trains_like_no_correction(tmp_path, tiny_model_dir,
                                                                                  arithmetic_parquet):
    """With the hf engine every weight is 1 to float rounding, so token_tis (which scores every old log-prob before
    the update, a path of its own) must train as `none` does, to rounding."""
    from kalmanrl.jobs.trainer import train

    plain = train(tiny_model_dir, arithmetic_parquet, tmp_path / "none", settings=settings_with({}))
    weighted = train(tiny_model_dir, arithmetic_parquet, tmp_path / "tis",
                     settings=settings_with({"name": "token_tis", "params": {"cap": 2.0}}))
    for key in ("loss", "grad_norm", "reward_mean", *MISMATCH):
        torch.testing.assert_close(torch.tensor(weighted[key].to_numpy()), torch.tensor(plain[key].to_numpy()),
                                   rtol=1e-4, atol=1e-6, msg=key)
