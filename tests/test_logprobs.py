"""Log-probs and entropy through the output head a slice at a time equal the whole-vocabulary log-softmax, in value
and gradient, for any slice size; padding shared by every row can be trimmed away without changing them."""

from __future__ import annotations

import pytest
import torch

from kalmanrl.policy.batch import build_batch
from kalmanrl.policy.logprobs import token_logprobs
from kalmanrl.policy.model import load_policy
from kalmanrl.policy.rollout import Completion


def unchunked(model, batch):
    """The computation before chunking: every logit of the completion, then log_softmax."""
    steps = batch.completion_mask.shape[1]
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                   logits_to_keep=steps + 1).logits[:, :-1].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    taken = logprobs.gather(-1, batch.input_ids[:, batch.prompt_len:].unsqueeze(-1)).squeeze(-1)
    return taken, -(logprobs.exp() * logprobs).sum(-1)


def random_batch(vocab: int, prompt_lens, completion_lens, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)

    def draw(n: int) -> list[int]:
        return torch.randint(3, vocab, (n,), generator=generator).tolist()

    groups = [[Completion(token_ids=draw(n), logprobs=[0.0] * n, text="", finish_reason="stop") for n in lens]
              for lens in completion_lens]
    return build_batch([draw(n) for n in prompt_lens], groups, torch.zeros(len(groups), len(groups[0])), pad_id=0)


@pytest.fixture(scope="module")
def model_and_batch(tiny_model_dir):
    model, _ = load_policy(tiny_model_dir)
    return model, random_batch(model.config.vocab_size, [5, 9, 2], [[7, 3], [11, 1], [4, 8]])


@pytest.mark.parametrize("chunk_tokens", [1, 6, 7, 64, 10**6])
def test_chunked_logprobs_and_entropy_equal_the_whole_vocabulary_log_softmax(model_and_batch, chunk_tokens):
    model, batch = model_and_batch
    expected, expected_entropy = unchunked(model, batch)
    taken, entropy = token_logprobs(model, batch, with_entropy=True, chunk_tokens=chunk_tokens)
    torch.testing.assert_close(taken, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(entropy, expected_entropy, rtol=1e-6, atol=1e-6)
    assert not entropy.requires_grad


@pytest.mark.parametrize("chunk_tokens", [5, 10**6])
def test_chunked_logprobs_have_the_unchunked_gradient(model_and_batch, chunk_tokens):
    model, batch = model_and_batch
    weights = torch.randn(batch.completion_mask.shape, generator=torch.Generator().manual_seed(1))

    def gradient(logp):
        model.zero_grad(set_to_none=True)
        (logp * weights * batch.completion_mask).sum().backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    expected = gradient(unchunked(model, batch)[0])
    got = gradient(token_logprobs(model, batch, with_entropy=True, chunk_tokens=chunk_tokens)[0])
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_trimming_shared_padding_keeps_the_log_probs(model_and_batch):
    model, batch = model_and_batch
    part = batch.select(torch.tensor([1, 5]))  # prompts of 5 and 2 tokens (of 9), completions of 3 and 8 (of 11)
    trimmed = part.trimmed()
    assert trimmed.input_ids.shape == (2, 5 + 8) and trimmed.prompt_len == 5
    assert torch.equal(trimmed.completion_mask, part.completion_mask[:, :8])
    full, short = token_logprobs(model, part), token_logprobs(model, trimmed)
    mask = trimmed.completion_mask.bool()
    torch.testing.assert_close(short[mask], full[:, :8][mask], rtol=1e-6, atol=1e-6)


def test_logprobs_do_not_build_a_key_value_cache(model_and_batch, monkeypatch):
    model, batch = model_and_batch
    decoder = model.get_decoder()
    seen = []
    original = decoder.forward
    monkeypatch.setattr(decoder, "forward", lambda *a, **kw: seen.append(kw.get("use_cache")) or original(*a, **kw))
    token_logprobs(model, batch)
    assert seen == [False]
