"""Padding-free micro-batches (train.packing): the same log-probs, entropy, losses and gradients as padded ones, to
float rounding, for every aggregate, ratio transform and surrogate and rows of very different lengths; micro-batches
filled by real tokens; and a training run that matches the padded one."""

from __future__ import annotations

from collections import defaultdict
from itertools import pairwise

import pytest
import torch
from safetensors.torch import load_file

from kalmanrl.configuration.settings import resolve_train
from kalmanrl.jobs.trainer import mini_batch_backward, train
from kalmanrl.policy.batch import balanced_parts, build_batch, micro_batches, rank_rows
from kalmanrl.policy.logprobs import token_logprobs
from kalmanrl.policy.model import load_policy
from test_trainer import completion, settings_for

LENGTHS = ([1, 30, 4], [17, 2, 9])  # completions per group: from one token to thirty
PROMPTS = (3, 21)


def varied_batch(policy, generator):
    def draw(n: int) -> list[int]:
        return torch.randint(3, policy.config.vocab_size, (n,), generator=generator).tolist()

    groups = [[completion(draw(n)) for n in lens] for lens in LENGTHS]
    return build_batch([draw(n) for n in PROMPTS], groups, torch.randn(2, 3, generator=generator), pad_id=0)


def test_packed_log_probs_and_entropy_equal_the_padded_ones(tiny_model_dir):
    policy, _ = load_policy(tiny_model_dir)
    batch = varied_batch(policy, torch.Generator().manual_seed(0))
    mask = batch.completion_mask.bool()
    for chunk in (4096, 7):  # one head slice, and several (recomputed in backward)
        padded = token_logprobs(policy, batch, with_entropy=True, chunk_tokens=chunk)
        packed = token_logprobs(policy, batch, with_entropy=True, chunk_tokens=chunk, packed=True)
        for ours, theirs in zip(packed, padded, strict=True):
            torch.testing.assert_close(ours[mask], theirs[mask], rtol=1e-5, atol=1e-5)
            assert not ours[~mask].any()  # 0 on padding


def test_packed_attention_computes_spans_of_one_length_together_as_row_by_row():
    """Spans of equal length go to SDPA as one batch: the same outputs and gradients as one SDPA call per row."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from kalmanrl.policy.packed_attention import _attention

    class Grouped(torch.nn.Module):  # what SDPA reads of an attention module: 4 query heads on 2 key/value heads
        num_key_value_groups, is_causal, training = 2, True, True

    lengths = [5, 7, 5, 3, 7, 7, 1, 2]
    generator = torch.Generator().manual_seed(0)
    tokens = sum(lengths)
    q, k, v = (torch.randn(1, heads, tokens, 16, generator=generator, requires_grad=True) for heads in (4, 2, 2))
    positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    together = _attention(Grouped(), q, k, v, None, position_ids=positions, dropout=0.0, scaling=0.25)[0]
    ends = torch.tensor(lengths).cumsum(0).tolist()
    alone = torch.cat([sdpa_attention_forward(Grouped(), q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], None,
                                              is_causal=True, dropout=0.0, scaling=0.25)[0]
                       for a, b in pairwise([0, *ends])], dim=1)
    torch.testing.assert_close(together, alone, rtol=1e-6, atol=1e-6)
    upstream = torch.randn(together.shape, generator=generator)
    for ours, theirs in zip(torch.autograd.grad(together, (q, k, v), upstream),
                            torch.autograd.grad(alone, (q, k, v), upstream), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_packed_forward_finds_its_rows_spans_once(tiny_model_dir, monkeypatch, checkpointing):
    """Finding the spans reads the position ids on the host (a device sync per call on a GPU): one search per packed
    sequence, not one per layer and again in a checkpointed layer's recompute."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from kalmanrl.policy import packed_attention

    config = AutoConfig.from_pretrained(tiny_model_dir, num_hidden_layers=3,
                                        layer_types=["full_attention"] * 3)
    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    if checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy.train()
    searches = []
    find = packed_attention._find_spans
    monkeypatch.setattr(packed_attention, "_find_spans", lambda ids: searches.append(ids) or find(ids))
    batch = varied_batch(policy, torch.Generator().manual_seed(0))
    token_logprobs(policy, batch, packed=True).sum().backward()
    assert len(searches) == 1
    token_logprobs(policy, batch, packed=True).sum().backward()  # a new sequence, a new search
    assert len(searches) == 2


def test_packed_micro_batches_count_real_tokens_and_balance_them():
    # prompts of 3 and 1 tokens, completions of 2, 1, 3, 3: real tokens 5, 4, 4, 4 (padded widths 5, 4, 4, 4 alone)
    batch = build_batch([[5, 6, 7], [8]], [[completion([1, 2]), completion([3])], [completion([4, 4, 4])] * 2],
                        torch.zeros(2, 2), pad_id=0)
    index = torch.tensor([0, 2, 1, 3])
    # padded: [0, 1] costs 2 x (3 + 2) = 10 > 9, [1, 2] 2 x (3 + 3), [2, 3] 2 x (1 + 3); packed: 17 real tokens in
    # two parts of 9 and 8
    assert [m.tolist() for m in micro_batches(batch, index, 9)] == [[0], [1], [2, 3]]
    assert [m.tolist() for m in micro_batches(batch, index, 9, packed=True)] == [[0, 3], [1, 2]]
    # the fewest micro-batches (ceil(17 / 13) = 2), balanced rather than filled in turn (13 + 4)
    assert [m.tolist() for m in micro_batches(batch, index, 13, packed=True)] == [[0, 3], [1, 2]]
    assert [m.tolist() for m in micro_batches(batch, index, 1, packed=True)] == [[0], [1], [2], [3]]
    # ceil(17 / 7) = 3 parts of at most 7 do not hold rows of 5, 4, 4, 4 (two of them share a part): a fourth
    assert [m.tolist() for m in micro_batches(batch, index, 7, packed=True)] == [[0], [1], [2], [3]]
    assert [m.tolist() for m in micro_batches(batch, index, 8, packed=True)] == [[0], [1, 3], [2]]
    assert micro_batches(batch, index[:0], 9, packed=True) == []


def test_balanced_parts_split_rows_by_cost_deterministically():
    costs = [7, 1, 5, 5, 2, 9, 3]
    parts = balanced_parts(costs, range(7), 3)
    # costliest first: 5 (9) -> 0, 0 (7) -> 1, 2 (5) -> 2, 3 (5) -> 2, 6 (3) -> 1, 4 (2) -> 0, 1 (1) -> 1 (tie: lower)
    assert parts == [[4, 5], [0, 1, 6], [2, 3]]  # 11, 11 and 10 of 32
    assert balanced_parts(costs, [6, 5, 4, 3, 2, 1, 0], 3) == parts  # the order rows come in does not matter
    assert balanced_parts(costs, [4], 2) == [[4], []]  # fewer rows than parts: empty parts


def test_ranks_share_each_mini_batch_by_length():
    # one long row (2 + 18 tokens) and six of 2 + 1: rank 0 takes the long row, rank 1 the six short ones (18)
    batch = build_batch([[5, 6]], [[completion([1] * 18)] + [completion([2])] * 6], torch.zeros(1, 7), pad_id=0)
    mini = torch.tensor([6, 0, 3, 1, 5, 2, 4])
    shares = [rank_rows(batch, mini, 2, rank).tolist() for rank in range(2)]
    assert shares == [[0], [1, 2, 3, 4, 5, 6]]
    assert rank_rows(batch, mini, 1, 0) is mini


@pytest.mark.parametrize(("ratio", "surrogate", "aggregate"), [
    ("token", "clipped", "grpo"), ("token", "clipped", "bnpo"), ("token", "clipped", "dr_grpo"),
    ("token", "clipped", "dapo"), ("sequence", "clipped", "grpo"), ("kpo", "clipped", "grpo"),
    ("token", "geometric_mean", "grpo")])
def test_packed_losses_and_gradients_equal_the_padded_ones(tiny_model_dir, ratio, surrogate, aggregate):
    """Clipping active and the KL term on; micro-batches of several rows and of one."""
    policy, _ = load_policy(tiny_model_dir)
    generator = torch.Generator().manual_seed(1)
    batch = varied_batch(policy, generator)
    with torch.no_grad():
        exact = token_logprobs(policy, batch)
    batch.old_logp = exact + 0.3 * torch.randn(exact.shape, generator=generator)
    batch.ref_logp = exact + 0.1 * torch.randn(exact.shape, generator=generator)
    raw = settings_for("kpo" if ratio == "kpo" else "grpo", logit_chunk_tokens=7)
    raw["algorithm"] = {**raw["algorithm"], "beta": 0.05, "ratio": ratio, "surrogate": surrogate,
                        "aggregate": aggregate}
    if surrogate == "geometric_mean":
        raw["algorithm"].update(eps_low=0.4, eps_high=0.4)
    settings = resolve_train(raw, "cpu", vllm_installed=False)
    mini = torch.tensor([4, 0, 5, 2, 1, 3])

    def gradient(packing: bool, budget: int):
        policy.zero_grad(set_to_none=True)
        sums = defaultdict(list)
        losses = mini_batch_backward(policy, batch, mini, settings.with_train(packing=packing,
                                                                              micro_batch_tokens=budget), sums)
        return torch.stack(losses).sum(), {n: p.grad.clone() for n, p in policy.named_parameters()}, sums

    loss, padded, sums = gradient(False, 10**6)
    for budget in (10**6, 40):
        packed_loss, packed, packed_sums = gradient(True, budget)
        torch.testing.assert_close(packed_loss, loss, rtol=1e-5, atol=1e-6)
        for name in padded:
            torch.testing.assert_close(packed[name], padded[name], rtol=1e-4, atol=1e-6, msg=name)
        if budget == 10**6:  # one micro-batch each: the same diagnostics (KPO's filter, token noise, entropy)
            for key in sums:
                assert packed_sums[key] == pytest.approx(sums[key], rel=1e-4, abs=1e-6), key


def test_a_packed_training_run_matches_the_padded_one(tmp_path, tiny_model_dir, arithmetic_parquet):
    padded = train(tiny_model_dir, arithmetic_parquet, tmp_path / "padded", settings=settings_for("kpo", steps=2))
    packed = train(tiny_model_dir, arithmetic_parquet, tmp_path / "packed",
                   settings=settings_for("kpo", steps=2, packing=True, micro_batch_tokens=60))
    for key in ("reward_mean", "loss", "grad_norm", "pg_loss", "ratio_mean", "ratio_max", "clip_frac", "entropy"):
        assert packed[key].tolist() == pytest.approx(padded[key].tolist(), rel=1e-4, abs=1e-6), key
    a, b = (load_file(tmp_path / run / "final" / "model.safetensors") for run in ("padded", "packed"))
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-6, msg=name)
