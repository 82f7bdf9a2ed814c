"""Validation while training (train.validation): the settings a validating job gets, the config's checks, and a
real run that records each benchmark's accuracy at the validated steps without changing what it trains."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

import digit_share  # noqa: F401  (registers the test rewards)
from kalmanrl.configuration.config import ConfigError, stage_settings, validate_config
from kalmanrl.configuration.settings import Precision, Validation
from kalmanrl.data.rewards import get_reward
from kalmanrl.jobs.validation import Benchmark, validate
from kalmanrl.policy.rollout import Completion, HFEngine, VLLMEngine

TIMING = {"wall_time", "rollout_tokens_per_s", "train_tokens_per_s", "time_rollout", "time_reward", "time_score",
          "time_update", "time_validation"}


def config_with(validation: dict) -> dict:
    return validate_config({
        "train": {"steps": 3, "prompts_per_step": 4, "group_size": 4, "mini_batches": 2, "max_tokens": 12,
                  "lr": 1e-3, "validation": validation},
        "evaluate": {"temperature": 0.7, "top_p": 0.9, "max_tokens": 10},
        "datasets": {"arith": {"loader": "arithmetic", "template": "krpo", "reward": "digit_share"},
                     "digits": {"loader": "arithmetic", "template": "krpo", "reward": "has_digit"}},
        "tasks": ["arith"], "benchmarks": ["arith", "digits"]})


def settings_with(validation: dict) -> dict:
    return stage_settings(config_with(validation), "train", model="tiny", task="arith", algorithm="grpo", seed="0")


def test_only_a_validating_job_gets_the_benchmarks_and_the_sampling():
    assert "validation" not in settings_with({})
    part = settings_with({"every": 2})["validation"]
    assert list(part["datasets"]) == ["arith", "digits"]  # null: the config's benchmarks
    assert part["datasets"]["digits"]["reward"] == "has_digit"
    assert part["sampling"] == {"temperature": 0.7, "top_p": 0.9, "max_tokens": 10}
    assert list(settings_with({"every": 2, "benchmarks": ["digits"]})["validation"]["datasets"]) == ["digits"]


def test_an_unknown_validation_benchmark_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"config\.train\.validation\.benchmarks: unknown dataset 'nope'"):
        config_with({"every": 2, "benchmarks": ["nope"]})


def test_a_run_records_validation_accuracy_at_its_steps_and_trains_as_without(tmp_path, tiny_model_dir,
                                                                             arithmetic_parquet):
    """Validated after steps 2 and 3 (every 2, and the last); the accuracies are shares of correct samples; the
    training itself is the run without validation, number for number (validation draws from seeds of its own)."""
    from kalmanrl.jobs.trainer import train

    plain = train(tiny_model_dir, arithmetic_parquet, tmp_path / "plain", settings=settings_with({}))
    validated = train(tiny_model_dir, arithmetic_parquet, tmp_path / "validated",
                      settings=settings_with({"every": 2, "max_problems": 6, "k": 2}),
                      validation_data=[arithmetic_parquet, arithmetic_parquet])
    columns = ["val_accuracy_arith", "val_accuracy_digits", "val_accuracy"]
    assert validated[columns].isna().all(axis=1).tolist() == [True, False, False]
    for column, samples in zip(columns, (12, 12, 24), strict=True):  # 6 problems x 2 samples each, both pooled
        for value in validated[column].dropna():
            assert 0 <= value <= 1 and math.isclose(value * samples, round(value * samples)), (column, value)
    assert (validated["val_accuracy_arith"].dropna() == 0).all()  # digit_share never says "correct"
    assert (validated["val_accuracy_digits"].dropna() > 0).all()
    # pooled over both benchmarks' problems, each weighing the same
    pooled = (validated["val_accuracy_arith"] + validated["val_accuracy_digits"]) / 2
    pd.testing.assert_series_equal(validated["val_accuracy"].dropna(), pooled.dropna(), check_names=False)
    same = [c for c in plain.columns if c not in TIMING]
    pd.testing.assert_frame_equal(validated[same], plain[same])


def test_a_validating_job_without_its_datasets_is_refused(tmp_path, tiny_model_dir, arithmetic_parquet):
    from kalmanrl.jobs.trainer import train

    with pytest.raises(ValueError, match=r"validates \['arith', 'digits'\] but 1 dataset file"):
        train(tiny_model_dir, arithmetic_parquet, tmp_path, settings=settings_with({"every": 2}),
              validation_data=[arithmetic_parquet])


@pytest.mark.parametrize("runs_policy", [True, False])
def test_sampling_runs_under_autocast_only_for_an_engine_that_generates_with_the_policy(runs_policy):
    """hf generates with the policy module, so under the precision policy that scores it; vLLM serves its own copy in
    its own dtype, in-process on this thread, so autocast must stay off around it (both validation and training use
    `Precision.generating`)."""
    seen = []

    class Engine:
        def generate(self, prompt_ids, sampling):
            seen.append(torch.is_autocast_enabled("cpu"))
            return [[Completion([1], [0.0], "7", "stop")] for _ in prompt_ids]

    Engine.runs_policy = runs_policy
    benchmark = Benchmark("b", ["7"], [[1, 2]], None, get_reward("digit_share"))
    validation = Validation(every=1, benchmarks=None, max_problems=1, k=1,
                            sampling={"temperature": 1.0, "top_p": 1.0, "max_tokens": 4})
    metrics = validate([benchmark], Engine(), validation, seed=0, precision=Precision("autocast_bf16", "cpu"))
    assert seen == [runs_policy] and "val_accuracy_b" in metrics
    assert HFEngine.runs_policy and not VLLMEngine.runs_policy
