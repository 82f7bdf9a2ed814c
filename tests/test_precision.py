"""One precision policy for old, reference and new log-probs: with bf16 autocast forced on the CPU, the first
optimiser step of every rollout batch sees a ratio of exactly 1 and no clipping, for every ratio transform."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch

import digit_share  # noqa: F401  (registers the "digit_share" reward)
from kalmanrl.configuration.config import stage_settings, validate_config
from kalmanrl.configuration.settings import Precision, resolve_precision
from kalmanrl.jobs.trainer import batch_logprobs, mini_batch_backward, score_logprobs, setup, update
from test_trainer import rollout_batch


def settings_for(ratio: str, **train) -> dict:
    config = validate_config({
        "train": {"steps": 2, "prompts_per_step": 4, "group_size": 4, "mini_batches": 2, "max_tokens": 12,
                  "lr": 1e-3, **train},
        "algorithms": {"alg": {"ratio": ratio, "beta": 0.05}},
        "datasets": {"arith": {"loader": "arithmetic", "template": "krpo", "reward": "digit_share"}},
        "tasks": ["arith"], "benchmarks": ["arith"]})
    return stage_settings(config, "train", model="tiny", task="arith", algorithm="alg", seed="0")


def test_auto_is_bf16_autocast_on_cuda_and_float32_on_the_cpu():
    assert resolve_precision("auto", "cpu") == Precision("float32", "cpu")
    cuda = resolve_precision("auto", "cuda")
    assert cuda.name == "autocast_bf16" and cuda.weights_dtype == torch.float32
    assert resolve_precision("bfloat16", "cpu").weights_dtype == torch.bfloat16
    with pytest.raises(ValueError, match="train.precision"):
        resolve_precision("fp8", "cpu")


@pytest.mark.parametrize(("ratio", "micro_batch_tokens"), [("token", 16384), ("token", 150), ("sequence", 150),
                                                           ("kpo", 150)])
def test_the_first_update_of_each_batch_sees_ratio_one_under_bf16_autocast(tmp_path, tiny_model_dir,
                                                                           arithmetic_parquet, ratio,
                                                                           micro_batch_tokens):
    run = setup(tiny_model_dir, arithmetic_parquet, tmp_path,
                settings_for(ratio, precision="autocast_bf16", micro_batch_tokens=micro_batch_tokens), threads=1)
    assert run.policy.dtype == run.reference.dtype == torch.float32  # the reference is the policy as it started
    run.old_from_update = False  # score every mini-batch first: the test reads the scoring pass's old log-probs
    with run.engine, run.reward_fn:
        for step in range(2):
            batch, schedule = rollout_batch(run, step)
            score_logprobs(run, batch, schedule[0])
            run.policy.train()
            if step == 0:  # before any update the reference is the policy, to the last bit (KL exactly 0)
                assert torch.equal(batch.ref_logp, batch.old_logp)
                # the control: autocast is on, so float32 old log-probs would differ from these
                in_float32 = batch_logprobs(run.policy, batch, schedule[0],
                                            run.settings.with_train(precision=Precision("float32", "cpu")).train)
                mask = batch.completion_mask.bool()
                assert (in_float32[mask] - batch.old_logp[mask]).abs().max() > 1e-4
            sums = defaultdict(list)
            mini_batch_backward(run.policy, batch, schedule[0][0], run.settings, sums)
            assert sums["ratio_min"] == sums["ratio_max"] == [1.0] * len(sums["ratio_min"])
            assert sums["clip_frac"] == [0.0] * len(sums["clip_frac"])
            update(run, batch, schedule)


def test_pure_bf16_weights_train(tmp_path, tiny_model_dir, arithmetic_parquet):
    run = setup(tiny_model_dir, arithmetic_parquet, tmp_path, settings_for("token", precision="bfloat16"), threads=1)
    assert run.policy.dtype == run.reference.dtype == torch.bfloat16
    before = {n: p.detach().clone() for n, p in run.policy.named_parameters()}
    with run.engine, run.reward_fn:
        batch, schedule = rollout_batch(run, 0)
        score_logprobs(run, batch, schedule[0])
        assert batch.old_logp.dtype == torch.float32
        stats = update(run, batch, schedule)
    assert stats["nonfinite_skipped"] == 0 and stats["ratio_min"] <= 1 <= stats["ratio_max"]
    assert any(not torch.equal(before[n], p) for n, p in run.policy.named_parameters())
