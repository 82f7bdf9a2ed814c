"""DAPO's two sampling-side rules (arXiv 2503.14476): the soft overlong penalty against its definition, and dynamic
sampling in a real run: groups that do not vary (in accuracy, as DAPO's recipe, or in reward) are dropped and
counted, every kept group varies, and a step that cannot fill its batch stops the run naming the setting."""

from __future__ import annotations

import pytest
import torch

import digit_share  # noqa: F401  (registers the "digit_share" reward)
from kalmanrl.configuration.config import ConfigError, stage_settings, validate_config
from kalmanrl.data.rewards import RewardFunction, Verdict, register_reward
from kalmanrl.rl.algorithms import overlong_penalty


@register_reward("test_zero")
class Zero(RewardFunction):
    def screen(self, completion: str, gold: str) -> Verdict:
        return Verdict(0.0, False, None)


def test_the_overlong_penalty_falls_linearly_over_the_buffer():
    lengths = torch.tensor([5, 6, 7, 8, 10])
    penalty = overlong_penalty(lengths, max_tokens=10, buffer=4, penalty=0.5)
    assert penalty.tolist() == pytest.approx([0.0, 0.0, -0.125, -0.25, -0.5])
    assert overlong_penalty(lengths, max_tokens=10, buffer=0, penalty=0.5).tolist() == [0.0] * 5


def settings(reward: str, steps: int = 3, **dapo) -> dict:
    config = validate_config({
        "train": {"steps": steps, "prompts_per_step": 4, "group_size": 2, "mini_batches": 2, "max_tokens": 8,
                  "lr": 1e-3},
        "datasets": {"arith": {"loader": "arithmetic", "template": "krpo", "reward": reward}},
        "tasks": ["arith"], "benchmarks": ["arith"], "algorithms": {"dapo": {"eps_high": 0.28, **dapo}}})
    return stage_settings(config, "train", model="tiny", task="arith", algorithm="dapo", seed="0")


def test_an_overlong_buffer_as_long_as_the_completions_is_refused():
    with pytest.raises(ConfigError, match=r"config\.algorithms\.dapo\.overlong_buffer\.length: 8 must be below"):
        settings("digit_share", overlong_buffer={"length": 8})


def test_dynamic_sampling_keeps_only_groups_with_unequal_rewards_and_counts_the_rest(
        tmp_path, tiny_model_dir, arithmetic_parquet, monkeypatch):
    from kalmanrl.jobs import trainer

    kept = []

    def recording(*args, _collect=trainer.collect):
        out = _collect(*args)
        kept.append(out[2])
        return out

    monkeypatch.setattr(trainer, "collect", recording)
    metrics = trainer.train(tiny_model_dir, arithmetic_parquet, tmp_path,
                            settings=settings("has_digit", dynamic_sampling={"enabled": True}))
    assert [tuple(r.shape) for r in kept] == [(4, 2)] * 3
    assert all((r.std(-1) > 0).all() for r in kept)  # every kept group carries a signal
    assert (metrics["ds_groups_drawn"] == 4 * metrics["ds_draws"]).all()
    assert (metrics["ds_groups_varied"] >= 4).all()
    assert (metrics["ds_groups_drawn"] > metrics["ds_groups_varied"]).any(), metrics.T  # some groups were dropped
    assert (metrics["advantage_std"] > 0).all()


def test_dynamic_sampling_off_draws_once_and_records_nothing_of_it(tmp_path, tiny_model_dir, arithmetic_parquet):
    from kalmanrl.jobs.trainer import train

    metrics = train(tiny_model_dir, arithmetic_parquet, tmp_path, settings=settings("has_digit", steps=1))
    assert not [c for c in metrics.columns if c.startswith("ds_")]


def test_a_step_that_cannot_fill_its_batch_stops_the_run_naming_the_setting(tmp_path, tiny_model_dir,
                                                                            arithmetic_parquet):
    from kalmanrl.jobs.trainer import train

    with pytest.raises(RuntimeError, match=r"0 of 8 groups .* algorithms\.dapo\.dynamic_sampling\.max_draws = 2"):
        train(tiny_model_dir, arithmetic_parquet, tmp_path,
              settings=settings("test_zero", dynamic_sampling={"enabled": True, "max_draws": 2}))


def test_dynamic_sampling_reads_accuracy_as_dapos_recipe_does_or_the_rewards_when_asked():
    """A group all wrong whose rewards differ (a format bonus, the overlong penalty) carries no accuracy signal: DAPO's
    recipe (verl's filter_groups.metric acc) drops it, metric "reward" keeps it."""
    from kalmanrl.jobs.trainer import varies

    wrong, right = Verdict(0.1, False, None), Verdict(1.0, True, "1")
    verdicts = [wrong, Verdict(0.0, False, None), right, Verdict(0.0, False, None), right, right]
    rewards = torch.tensor([[0.1, 0.0], [1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    assert varies(verdicts, rewards, "accuracy").tolist() == [False, True, False]
    assert varies(verdicts, rewards, "reward").tolist() == [True, True, False]
    with pytest.raises(ValueError, match="'acc' is neither"):
        varies(verdicts, rewards, "acc")


def test_a_run_whose_rewards_vary_but_never_its_accuracy_trains_only_on_metric_reward(tmp_path, tiny_model_dir,
                                                                                      arithmetic_parquet):
    """digit_share's rewards vary from completion to completion while every verdict is wrong."""
    from kalmanrl.jobs.trainer import train

    with pytest.raises(RuntimeError, match=r"0 of 8 groups drawn varied in their accuracy"):
        train(tiny_model_dir, arithmetic_parquet, tmp_path / "accuracy",
              settings=settings("digit_share", steps=1, dynamic_sampling={"enabled": True, "max_draws": 2}))
    metrics = train(tiny_model_dir, arithmetic_parquet, tmp_path / "reward", settings=settings(
        "digit_share", steps=1, dynamic_sampling={"enabled": True, "max_draws": 8, "metric": "reward"}))
    assert (metrics["ds_groups_varied"] >= 4).all()


def test_the_overlong_penalty_is_taken_off_each_completions_reward():
    """Through the trainer's reward phase: the verdicts stay the reward's, the rewards lose the penalty."""
    import pandas as pd

    from kalmanrl.configuration.settings import resolve_train
    from kalmanrl.data.rewards import get_reward
    from kalmanrl.jobs.trainer import Rollout, Run, score_rewards
    from kalmanrl.policy.rollout import Completion

    resolved = resolve_train(settings("has_digit", overlong_buffer={"length": 4, "penalty": 0.5}), "cpu",
                             vllm_installed=False)
    run = Run.__new__(Run)
    run.settings, run.reward_fn = resolved, get_reward("has_digit", num_workers=1)
    texts = [["1", "a"], ["12", "ab"]]
    lengths = [[3, 5], [6, 8]]  # max_tokens 8, buffer 4: the penalty starts after 4 tokens
    rollout = Rollout(pd.DataFrame({"answer": ["1", "2"]}), [[1], [2]],
                      [[Completion([7] * n, [0.0] * n, text, "stop") for n, text in zip(ns, ts, strict=True)]
                       for ns, ts in zip(lengths, texts, strict=True)])
    with run.reward_fn:
        verdicts, rewards = score_rewards(run, rollout)
    assert [v.reward for v in verdicts] == [1.0, 0.0, 1.0, 0.0]
    assert rewards.flatten().tolist() == pytest.approx([1.0, -0.125, 1.0 - 0.25, -0.5])
