"""Rollout engines behind one interface: prompts (token ids) -> n completions each, with the sampled tokens, their
sampling log-probs and finish reasons. `vllm` keeps one offline engine alive and receives the policy's new weights in
place after each update; `hf` is transformers `generate` on the policy itself, the fallback without vLLM.

Log-probs are *raw* in both engines: the log-softmax of the model's logits before temperature and top-p, i.e. vLLM's
`logprobs_mode="raw_logprobs"` (its default in 0.32, set explicitly here) and what the trainer recomputes, so they are
comparable with the trainer's old log-probs at any temperature. Randomness is a pure function of `SamplingConfig.seed`
(the trainer derives it from its seed and the step) and of each prompt's position in the whole batch, so engines hold
no RNG state to checkpoint, a resumed run samples exactly what an uninterrupted one would, and a prompt's completions
do not depend on which rank generated it."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from transformers import DynamicCache, GenerationConfig, LogitsProcessorList

from kalmanrl.policy.packed_attention import NAME as PACKED_ATTENTION
from kalmanrl.runtime import vendor_neutral
from kalmanrl.runtime.distributed import as_forward

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingConfig:
    """One generate call's sampling; the same seed gives the same completions (per engine and device)."""

    n: int = 1
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    max_tokens: int = 64
    seed: int = 0
    # Each prompt's position in the whole batch: a rank's share of a step's prompts, a benchmark's problems once
    # overlong ones are dropped. None: 0, 1, 2, ... (the call is the whole batch).
    positions: tuple[int, ...] | None = None
    budgets: tuple[int, ...] | None = None  # each prompt's own completion limit (<= max_tokens); None = max_tokens

    def budget(self, index: int) -> int:
        """The most completion tokens the `index`-th prompt of this call may get."""
        return self.max_tokens if self.budgets is None else self.budgets[index]

    def prompt_seed(self, index: int) -> int:
        """The seed of the `index`-th prompt of this call; its j-th sample takes this seed + j (both engines). A
        function of the call's seed and the prompt's position in the whole batch, so a prompt's completions do not
        depend on how the batch is split over ranks or calls. Prompts are `n` seeds apart, so no two samples of a
        call share a seed (one apart, prompt i's second sample would repeat prompt i+1's first), from a start that
        SeedSequence scatters over 32 bits (torch's CPU generator keeps only a seed's low 32 bits, so calls whose
        seeds differ by a multiple of 2**32, or sit side by side, would otherwise overlap)."""
        start = int(np.random.SeedSequence(self.seed).generate_state(1, dtype=np.uint32)[0])
        position = index if self.positions is None else self.positions[index]
        return (start + position * self.n) % 2**32


@dataclass
class Completion:
    token_ids: list[int]      # sampled tokens, the end-of-sequence token included when generation stopped on it
    logprobs: list[float]     # raw log-prob of each sampled token
    text: str                 # decoded completion, special tokens removed
    finish_reason: str        # "stop" (end of sequence) or "length" (the prompt's completion budget reached)


def make_completion(token_ids: list[int], logprobs: list[float], tokenizer, *, stopped: bool) -> Completion:
    """Both engines decode the text the same way, from the token ids."""
    return Completion(token_ids, logprobs, tokenizer.decode(token_ids, skip_special_tokens=True),
                      "stop" if stopped else "length")


def stop_token_ids(model: torch.nn.Module, tokenizer) -> tuple[int, ...]:
    """The ids that end a completion: the tokenizer's end of sequence and every id the model's generation config lists
    (an instruct model lists its end of turn and its end of text there), as vLLM stops on them."""
    listed = model.generation_config.eos_token_id
    listed = [] if listed is None else [listed] if isinstance(listed, int) else list(listed)
    return tuple(sorted({tokenizer.eos_token_id, *listed} - {None}))


class RolloutEngine(Protocol):
    # Whether the engine generates with the policy module itself (so under the trainer's precision policy, to sample
    # from the function that scores), rather than from its own copy of the weights in its own dtype.
    runs_policy: bool

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingConfig) -> list[list[Completion]]:
        """Outer list: one entry per prompt; inner: its `sampling.n` completions."""

    def sleep(self) -> None:
        """Give accelerator memory back for the policy update (the next `sync_weights` wakes the engine)."""

    def sync_weights(self, policy: torch.nn.Module) -> None:
        """Make the engine sample from `policy`'s current weights (plain or FSDP-sharded: with sharding every rank
        must call it, since parameters are gathered one at a time)."""

    def close(self) -> None: ...


class _ContextManaged:
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        pass


class HFEngine(_ContextManaged):
    """transformers `generate` with KV cache on the policy module itself (so a weight sync is a no-op), batched with
    left padding, at most `batch_size` rows per call (`rollout.hf_batch_size`). Each row samples with its own
    generator, seeded from its prompt's position (`prompt_seed`) and its sample index (Gumbel-max over the
    temperature-scaled, top-p-filtered logits, which draws exactly from their softmax): its random numbers do not
    depend on batch composition, and the global RNG stream is never touched, so a resumed run samples exactly what
    an uninterrupted one would, and a differently sharded or batched one draws the same numbers.

    Rows with the same prompt (a group's samples) share one prefill: each distinct prompt runs once, and its KV cache
    and first logits are copied to its rows, with plain `generate`'s numbers bit for bit on the CPU where it is used
    (`tests/test_rollout.py`; `_shares_prefill` keeps the products it could compute another way), so this only
    removes work: at the default study's shape the prefill was 40% of a rollout. On a GPU the batch size may pick
    other kernels, so there the last bits may differ from plain `generate` (not from run to run); so may another
    `batch_size` or rank count, on the CPU too (a product's rows are split over threads by their count), and near a
    tie so may a sampled token. On the CPU, a grouped-query model's attention reads the shared key and value heads in
    place (`_reading_shared_kv_heads`). `plain=True` is plain `generate`, the reference both are tested against."""

    runs_policy = True

    def __init__(self, policy: torch.nn.Module, tokenizer, *, batch_size: int = 256,
                 plain: bool = False) -> None:
        self.policy, self.tokenizer, self.batch_size, self.plain = policy, tokenizer, batch_size, plain
        self.stops = stop_token_ids(policy, tokenizer)
        # An FSDP-sharded policy gathers each layer with a collective in every forward: all ranks must run the same
        # number of decoding steps, so ranks that finish early keep stepping until every rank is done.
        self.synced = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
        # generate fills every setting it is not given from the model's generation_config.json, which may shape the
        # distribution, the search or the stopping (Qwen2.5-0.5B/1.5B-Instruct set repetition_penalty 1.1): the
        # engine generates under a config of its own instead, so it samples from `SamplingConfig` alone, as vLLM
        # does with explicit SamplingParams, and the recorded log-probs are those of the distribution sampled from.
        self.generation_config = GenerationConfig(bos_token_id=policy.generation_config.bos_token_id,
                                                  eos_token_id=list(self.stops),
                                                  pad_token_id=tokenizer.pad_token_id)

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], sampling: SamplingConfig) -> list[list[Completion]]:
        rows = [(ids, sampling.prompt_seed(i) + j, sampling.budget(i))
                for i, ids in enumerate(prompt_ids) for j in range(sampling.n)]
        device = next(self.policy.parameters()).device
        completions: list[Completion] = []
        for start in range(0, len(rows), self.batch_size):
            completions += self._generate_rows(rows[start:start + self.batch_size], sampling, device)
        return [completions[i:i + sampling.n] for i in range(0, len(completions), sampling.n)]

    def _generate_rows(self, rows: list[tuple[list[int], int, int]], sampling: SamplingConfig,
                       device) -> list[Completion]:
        """`_generate_batch` of `rows`, or of each budget's rows apart when generating the batch to its largest
        budget would feed a row positions past the model's `max_position_embeddings`: a prompt at the length limit
        has a smaller budget than a shorter one beside it, and a model with a table of positions (GPT-2) fails on
        them, one with dynamic rotary scaling rescales every row (a row's own tokens stay within its budget, so
        the others' longer generation is harmless otherwise). Rows of one budget fit, since every budget keeps its
        prompt within the limit.

        On several ranks (`synced`) every rank must make the same generate calls, and a rank that is done keeps
        stepping until every rank is: the ranks decide from all ranks' budgets and longest prompts, and each makes
        one call per budget of any rank, with a one-token stand-in row (its completion dropped) where it has none."""
        positions = getattr(self.policy.config.get_text_config(decoder=True), "max_position_embeddings", None)
        if positions is None:
            return self._generate_batch(rows, sampling, device)
        budgets, longest = sorted({budget for _, _, budget in rows}), max(len(ids) for ids, _, _ in rows)
        if self.synced:
            shares: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(shares, (budgets, longest))
            budgets = sorted({budget for share, _ in shares for budget in share})
            longest = max(length for _, length in shares)
        if longest + budgets[-1] - 1 <= positions:
            return self._generate_batch(rows, sampling, device)
        out: list[Completion | None] = [None] * len(rows)
        for budget in budgets:
            index = [i for i, (_, _, b) in enumerate(rows) if b == budget]
            if not index:
                self._generate_batch([([self.tokenizer.pad_token_id], 0, budget)], sampling, device)
                continue
            for i, completion in zip(index, self._generate_batch([rows[i] for i in index], sampling, device),
                                     strict=True):
                out[i] = completion
        return out

    def _generate_batch(self, rows: list[tuple[list[int], int, int]], sampling: SamplingConfig,
                        device) -> list[Completion]:
        """rows: (prompt ids, seed, completion budget). The batch generates to its largest budget and each row is cut
        at its own (a row's tokens do not depend on the others', so the cut equals stopping there)."""
        width = max(len(ids) for ids, _, _ in rows)
        pad, stops = self.tokenizer.pad_token_id, set(self.stops)
        input_ids = torch.tensor([[pad] * (width - len(r)) + r for r, _, _ in rows], device=device)
        attention = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r, _, _ in rows], device=device)
        steps = max(budget for _, _, budget in rows)
        recorder = _SampledLogprobs()
        processors = LogitsProcessorList([recorder] + ([] if sampling.temperature == 0 else [
            _RowSampler([seed for _, seed, _ in rows], sampling.temperature, sampling.top_p, device, steps)]))
        with (contextlib.nullcontext() if self.plain else _reading_shared_kv_heads(self.policy),
              _generating_under(self.policy, self.generation_config)):
            tokens = self._sample(input_ids, attention, [ids for ids, _, _ in rows], steps, processors)
        taken = recorder.finish(tokens)
        result = []
        for ids, lps, (_, _, budget) in zip(tokens.tolist(), taken.tolist(), rows, strict=True):
            ids, lps = ids[:budget], lps[:budget]
            end = next((k + 1 for k, token in enumerate(ids) if token in stops), None)
            result.append(make_completion(ids[:end], lps[:end], self.tokenizer, stopped=end is not None))
        return result

    def _sample(self, input_ids: torch.Tensor, attention: torch.Tensor, prompts: list[list[int]], steps: int,
                processors: LogitsProcessorList) -> torch.Tensor:
        """Sampled tokens [B, t], t <= steps (`generate` stops early once every row has ended its turn; tokens after
        a row's end are not its own); `processors` see every step's raw logits."""
        options = dict(do_sample=False, logits_processor=processors, synced_gpus=self.synced)
        distinct: dict[tuple[int, ...], int] = {}
        row_prompt = [distinct.setdefault(tuple(ids), len(distinct)) for ids in prompts]
        if not self._shares_prefill(len(distinct), len(prompts), input_ids.shape[1], steps):
            out = self.policy.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=steps, **options)
            return out[:, input_ids.shape[1]:]
        logits, cache = self._shared_prefill(input_ids, attention, row_prompt, len(distinct))
        first = processors(input_ids, logits).argmax(-1, keepdim=True)  # generate's step with do_sample=False
        if steps == 1:
            return first
        # generate continues from the prompts' cache: its first forward is the sampled token's, as it would have been.
        out = self.policy.generate(input_ids=torch.cat([input_ids, first], dim=1),
                                   attention_mask=torch.cat([attention, torch.ones_like(first)], dim=1),
                                   past_key_values=cache, max_new_tokens=steps - 1, **options)
        return torch.cat([first, out[:, input_ids.shape[1] + 1:]], dim=1)

    def _shares_prefill(self, distinct: int, rows: int, width: int, steps: int) -> bool:
        """Whether `_shared_prefill` replaces generate's: only when prompts repeat, with logits that are the output
        head's as they are (the head is applied by hand: no soft-capping, and no scaling such as Granite's
        `logits_scaling`, Cohere's `logit_scale` or Falcon-H1's `lm_head_multiplier`, which the model's forward
        applies after it); not on several ranks (the extra forward must be made by all of them, whatever their
        prompts); and when the distinct prompts' products have enough rows: MKL computes a product of a few rows
        (here below 4 per thread) another way, which would move the last bits. (generate runs under the engine's
        own generation config, so it adds no logits processor or cache type of the model's.)"""
        config = self.policy.config.get_text_config(decoder=True)
        return (not self.plain and distinct < rows and steps >= 1 and not self.synced
                and not getattr(config, "final_logit_softcapping", None)
                and all(getattr(config, key, None) in (None, 1) for key in _LOGIT_SCALES)
                and distinct * width >= 8 * torch.get_num_threads())

    def _shared_prefill(self, input_ids: torch.Tensor, attention: torch.Tensor, row_prompt: list[int],
                        prompts: int) -> tuple[torch.Tensor, DynamicCache]:
        """generate's prefill run once per distinct prompt (`row_prompt`: each row's prompt among `prompts`), with
        the inputs generate would give it; returns each row's float32 logits at its last position [B, vocab] and the
        KV cache with one copy per row."""
        first_row = torch.tensor([row_prompt.index(k) for k in range(prompts)], device=input_ids.device)
        rows = torch.tensor(row_prompt, device=input_ids.device)
        positions = (attention.cumsum(-1) - 1).masked_fill_(attention == 0, 1)  # left padding, as generate numbers it
        cache = DynamicCache(config=self.policy.config.get_text_config(decoder=True))
        logits = as_forward(self.policy, _prefill_logits, input_ids[first_row], attention[first_row],
                            positions[first_row], cache, rows)
        cache.batch_select_indices(rows)
        return logits, cache

    def sleep(self) -> None:
        """Nothing to release: the engine is the policy."""

    def sync_weights(self, policy: torch.nn.Module) -> None:
        if policy is not self.policy:
            raise ValueError("the hf engine samples from the policy module it was made with")


# Config attributes of models whose forward scales the output head's logits (Granite's divisor, Cohere's and
# Falcon-H1's multipliers); 1 (or unset) leaves them as the head gives them.
_LOGIT_SCALES = ("logits_scaling", "logit_scale", "lm_head_multiplier")


@contextlib.contextmanager
def _generating_under(model: torch.nn.Module, config: GenerationConfig) -> Iterator[None]:
    """`model.generate` reads `config` instead of the model's own generation config while inside (generate fills any
    setting a call leaves unset from `model.generation_config`, so passing a config would not be enough)."""
    previous = model.generation_config
    model.generation_config = config
    try:
        yield
    finally:
        model.generation_config = previous


@contextlib.contextmanager
def _reading_shared_kv_heads(model: torch.nn.Module) -> Iterator[None]:
    """A grouped-query model on the CPU attends with SDPA reading each shared key/value head in place while inside.
    transformers' sdpa attention copies the shared heads once per query head whenever there is a padding mask (every
    left-padded batch): at every decoding step the whole KV cache, about a fifth of a rollout of the default study's
    model. SDPA's own `enable_gqa` gives the same outputs bit for bit here (`tests/test_rollout.py`); on CUDA it would
    leave the fast kernels for a masked batch, so GPUs keep the copies. Generation only: in a backward pass the
    shared heads' gradients would be summed in another order."""
    config = model.config.get_text_config(decoder=True)
    grouped = getattr(config, "num_key_value_heads", None) not in (None, config.num_attention_heads)
    previous = config._attn_implementation  # sdpa, or the packed-training attention, which is sdpa for generation
    if not (grouped and previous in ("sdpa", PACKED_ATTENTION) and next(model.parameters()).device.type == "cpu"):
        yield
        return
    model.set_attn_implementation(_grouped_sdpa())
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


@functools.cache
def _grouped_sdpa() -> str:
    """Register (once) transformers' sdpa attention with masked grouped-query batches handed to SDPA's enable_gqa."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                  **kwargs):
        shared_heads = getattr(module, "num_key_value_groups", 1) > 1
        if not shared_heads or attention_mask is None or kwargs.get("position_bias") is not None:
            # transformers' own path (without a mask it passes enable_gqa itself)
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                          **kwargs)
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                               dropout_p=dropout, scale=scaling, enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None

    name = "kalmanrl_grouped_sdpa"
    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


def _prefill_logits(model: torch.nn.Module, input_ids: torch.Tensor, attention: torch.Tensor,
                    positions: torch.Tensor, cache: DynamicCache, rows: torch.Tensor) -> torch.Tensor:
    """The decoder over the distinct prompts, then the output head on each row's copy of its prompt's last hidden
    state: a product of one row per batch row, as in generate's prefill. [B, vocab] float32."""
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention, position_ids=positions,
                                 past_key_values=cache, use_cache=True).last_hidden_state
    return model.get_output_embeddings()(hidden[rows, -1:]).to(torch.float32)[:, -1]


class _SampledLogprobs:
    """A logits processor, first of the engine's, that keeps each sampled token's raw log-prob: the log-softmax of a
    step's logits as generate gives them to processors (float32), of which the next step's call, seeing the token
    taken, keeps that token's entry. One step's [rows, vocab] at a time, where generate's `output_logits` would keep
    every step's (at a 151,936-token vocabulary, 0.6 MB per row and token: 160 GB for 64 rows of 4,096 tokens)."""

    def __init__(self) -> None:
        self.pending: torch.Tensor | None = None  # [rows, vocab]: the last step's log-probs, its token not yet seen
        self.taken: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self._take(input_ids[:, -1])
        self.pending = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def _take(self, tokens: torch.Tensor) -> None:
        if self.pending is not None:
            self.taken.append(self.pending.gather(-1, tokens.unsqueeze(-1)).squeeze(-1))
            self.pending = None

    def finish(self, tokens: torch.Tensor) -> torch.Tensor:
        """The log-probs [rows, t] of the sampled tokens [rows, t]. generate may have run steps past the last it
        returns and dropped them (its deferred stop check, on MPS in transformers 5.19): they are dropped here too."""
        if len(self.taken) < tokens.shape[1]:
            self._take(tokens[:, -1])
        return torch.stack(self.taken[:tokens.shape[1]], dim=1)


class _RowSampler:
    """A logits processor that turns greedy decoding into sampling with one generator per row: the argmax of
    temperature-scaled, top-p-filtered logits plus Gumbel noise is a draw from their softmax (the Gumbel-max trick).
    `_SampledLogprobs`, before it, records the raw logits' log-probs.

    On the CPU each generator draws the uniforms of several decoding steps at once (at most DRAW_BUDGET numbers over
    all rows): the same numbers as one step at a time, since its Mersenne Twister stream is consumed in order, for a
    sixteenth of the calls at the default study's shape. CUDA's Philox generator rounds every call's offset up, so
    there each step draws on its own."""

    DRAW_BUDGET = 1 << 22

    def __init__(self, seeds: list[int], temperature: float, top_p: float, device: torch.device,
                 steps: int) -> None:
        self.generators = [torch.Generator(device).manual_seed(seed) for seed in seeds]
        self.temperature, self.top_p = temperature, top_p
        self.remaining = steps  # decoding steps not yet drawn for
        self.drawn = torch.empty(len(seeds), 0, 0)  # [rows, k, vocab]: the uniforms of the next k steps (CPU)
        self.next = 0

    def _uniform(self, rows: int, vocab: int, device: torch.device) -> torch.Tensor:
        """[rows, vocab] uniforms of this decoding step, row i from generator i."""
        if device.type != "cpu":
            return torch.stack([torch.rand(vocab, generator=g, device=device) for g in self.generators])
        if self.next == self.drawn.shape[1]:
            steps = max(1, min(self.remaining, self.DRAW_BUDGET // (rows * vocab)))
            self.drawn = torch.empty(rows, steps, vocab)
            for generator, row in zip(self.generators, self.drawn, strict=True):
                row.uniform_(generator=generator)
            self.remaining, self.next = self.remaining - steps, 0
        self.next += 1
        return self.drawn[:, self.next - 1]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """scores: [rows, vocab] -> perturbed scores whose argmax is the sampled token."""
        logits = scores.float() / self.temperature
        if self.top_p < 1:
            ordered, order = logits.sort(dim=-1, descending=True)
            mass_before = ordered.softmax(-1).cumsum(-1) - ordered.softmax(-1)
            logits = logits.scatter(-1, order, ordered.masked_fill(mass_before >= self.top_p, -torch.inf))
        uniform = self._uniform(*logits.shape, logits.device)
        return logits - vendor_neutral.log(-vendor_neutral.log(uniform.clamp(min=torch.finfo(torch.float32).tiny)))


class VLLMEngine(_ContextManaged):
    """vLLM's offline engine, in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so new policy weights can be pushed into
    its model with `push_weights`: no save-and-reload per step, as TRL's colocate mode. One live engine per process:
    closing one tears down vLLM's process-global parallel state.

    The engine serves `dtype` (the model's configured dtype, bf16 for hub models), whatever the trainer's master
    weights are: pushed weights are cast to it one tensor at a time. With `sleep` (and a GPU build of vLLM) the engine
    sleeps from the scoring pass through the policy update at level 2: its weights and KV cache are discarded (vLLM
    keeps the model's buffers), since the next push replaces every weight anyway (level 1 would copy them to host
    memory and back each step). `sync_weights` re-allocates the weights, pushes the new ones (a push that leaves a
    weight of the engine out raises), and only then re-allocates the KV cache."""

    runs_policy = False

    def __init__(self, model_dir: str | Path, tokenizer, *, dtype: str = "float32", max_model_len: int = 512,
                 gpu_memory_utilization: float = 0.3, kv_cache_gib: float = 1, enforce_eager: bool = True,
                 tensor_parallel_size: int = 1, sleep: bool = False) -> None:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM
        from vllm.platforms import current_platform

        self.tokenizer, self.dtype = tokenizer, getattr(torch, dtype)
        self.sleep_mode = sleep and sleep_mode_available()
        self.asleep = False
        # On the CPU the KV cache is a fixed size (the legacy VLLM_CPU_KVCACHE_SPACE, when set, overrides it); on a
        # GPU it is the given share of memory.
        kv_cache = {"kv_cache_memory_bytes": int(kv_cache_gib * 2**30)} if current_platform.is_cpu() else {}
        with _caller_state_kept():
            self.llm = LLM(model=str(model_dir), dtype=dtype, max_model_len=max_model_len,
                           enforce_eager=enforce_eager, gpu_memory_utilization=gpu_memory_utilization,
                           tensor_parallel_size=tensor_parallel_size, enable_sleep_mode=self.sleep_mode,
                           logprobs_mode="raw_logprobs", seed=0, **kv_cache,
                           **executor_options(tensor_parallel_size))

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingConfig) -> list[list[Completion]]:
        from vllm import SamplingParams, TokensPrompt

        # One seed per request (its prompt's, see `prompt_seed`); with n > 1, vLLM gives the j-th sample of a request
        # the seed `seed + j`. Text is decoded here, as in the hf engine (vLLM's incremental detokenizer would hold
        # back a trailing partial UTF-8 character).
        params = [SamplingParams(n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
                                 max_tokens=sampling.budget(i), seed=sampling.prompt_seed(i), logprobs=0,
                                 detokenize=False) for i in range(len(prompt_ids))]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids], params,
                                    use_tqdm=False)
        return [[vllm_completion(o, self.tokenizer) for o in request.outputs] for request in outputs]

    def sleep(self) -> None:
        if self.sleep_mode and not self.asleep:
            self.llm.sleep(level=2)
            self.asleep = True

    def sync_weights(self, policy: torch.nn.Module) -> None:
        from kalmanrl.policy.lora import merged_parameters

        if self.asleep:
            self.llm.wake_up(tags=["weights"])
        # The base model's names and weights, LoRA adapters merged in: vLLM serves the base architecture.
        push_weights(self.llm, ((name, tensor.to(self.dtype)) for name, tensor in merged_parameters(policy)))
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False

    def close(self) -> None:
        del self.llm


def vllm_completion(output, tokenizer) -> Completion:
    """One vLLM completion output as a `Completion`. vLLM's offline `generate` returns a request it aborted or that
    failed (finish reason `abort`, `error`) like any other, its tokens cut short: counted as a stop, it would be judged
    and trained as if the policy had ended its answer there, so it raises."""
    if output.finish_reason not in ("stop", "length"):
        raise RuntimeError(f"vLLM finished a completion with reason {output.finish_reason!r} after "
                           f"{len(output.token_ids)} tokens (not 'stop' or 'length'): the engine aborted or failed the "
                           "request; its log above says why")
    return make_completion(list(output.token_ids),
                           [step[t].logprob for step, t in zip(output.logprobs, output.token_ids, strict=True)],
                           tokenizer, stopped=output.finish_reason == "stop")


def executor_options(tensor_parallel_size: int, env: dict[str, str] | None = None) -> dict[str, str]:
    """How vLLM runs the engine of one rank. Under torchrun (WORLD_SIZE > 1) every rank has an engine of its own for
    its share of the prompts: vLLM's torchrun executor (`external_launcher`, as TRL's colocate mode) puts it on this
    rank's device (LOCAL_RANK), joins the job's process group as one data-parallel replica and keys its caches by
    rank. The default single-process executor would take `cuda:0` on every rank (and make it the rank's current
    device). A tensor-parallel engine would need every rank of its group to get the same prompts, which per-rank
    shares are not."""
    env = os.environ if env is None else env
    if int(env.get("WORLD_SIZE", "1")) == 1:
        return {}
    if tensor_parallel_size > 1:
        raise ValueError(f"rollout.tensor_parallel_size = {tensor_parallel_size} under torchrun: each rank samples "
                         "its own prompts with an engine of its own, which needs rollout.tensor_parallel_size = 1")
    return {"distributed_executor_backend": "external_launcher"}


def sleep_mode_available() -> bool:
    """vLLM's sleep mode needs its CUDA memory pool; elsewhere (the CPU build) the engine stays awake, said once."""
    from vllm.platforms import current_platform

    if current_platform.is_sleep_mode_available():
        return True
    log.info("rollout.sleep: vLLM's sleep mode is not available on %s (it needs a GPU build); the engine keeps its "
             "memory during updates", current_platform.device_name)
    return False


def push_weights(llm, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Load new weights (checkpoint names, e.g. a transformers state_dict) into a live in-process vLLM engine, then
    drop its prefix cache, whose KV entries were computed with the old weights. The tensors are consumed one at a
    time, so a generator that gathers each from a sharded model never holds a full copy of the state dict.

    The worker's `reload_weights` (vLLM 0.32) reloads in place and re-runs the backend's post-load processing (the CPU
    backend repacks linear weights, so the model's own `load_weights` alone fails there). It is reached through
    `collective_rpc`, a public method; in-process the iterator is passed by reference, nothing is serialised. vLLM
    only logs a warning when the tensors leave some of its weights as they were (stale, or uninitialised after a
    level-2 sleep), and when requests still hold cache blocks its prefix cache is left as it was (`reset_prefix_cache`
    returns False): both raise here, since the next samples would come from old weights or their KV entries."""
    with _warnings_of(RELOAD_LOGGER) as warnings:
        llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(named_tensors)})
    if stale := [w for w in warnings if "were not loaded" in w]:
        raise RuntimeError(f"the weight push left weights of the vLLM engine as they were: {'; '.join(stale)}")
    if not llm.reset_prefix_cache():
        raise RuntimeError("vLLM could not reset its prefix cache after the weight push (requests still hold cache "
                           "blocks): later prompts would reuse KV entries computed with the old weights")


RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.inplace"


@contextlib.contextmanager
def _warnings_of(logger_name: str) -> Iterator[list[str]]:
    """The warnings `logger_name` emits inside the block, whatever level the user set for it."""
    caught: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            caught.append(record.getMessage())

    logger, handler = logging.getLogger(logger_name), Catch(logging.WARNING)
    level = logger.level
    logger.setLevel(min(logger.getEffectiveLevel(), logging.WARNING))
    logger.addHandler(handler)
    try:
        yield caught
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@contextlib.contextmanager
def _caller_state_kept() -> Iterator[None]:
    """Undo what an in-process vLLM engine does to the caller at start-up: it reseeds the global torch / numpy /
    random generators (which would break the trainer's RNG stream) and replaces `torch.set_num_threads` with a no-op
    (which would silently ignore the trainer's thread setting)."""
    set_num_threads, py_state, np_state = torch.set_num_threads, random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
            yield
    finally:
        torch.set_num_threads = set_num_threads
        random.setstate(py_state)
        np.random.set_state(np_state)


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def make_engine(backend: str, *, policy: torch.nn.Module | None, tokenizer, model_dir: str | Path,
                dtype: str = "float32", **options) -> RolloutEngine:
    """`hf` or `vllm` (`rollout.backend` resolved: `kalmanrl.configuration.settings.resolve_backend`). `hf` samples from
    `policy`; `vllm` loads its own copy of `model_dir` in `dtype` (the model's configured dtype), so `policy` may be
    None. Options are the config's `rollout` section; each engine takes the ones it uses."""
    if backend not in ("hf", "vllm"):
        raise ValueError(f"unknown rollout backend {backend!r} (resolve `auto` with "
                         "kalmanrl.configuration.settings first); known: hf, vllm")
    if backend == "hf":
        if policy is None:
            raise ValueError("the hf rollout engine samples from the policy: load it first")
        return HFEngine(policy, tokenizer, batch_size=options.get("hf_batch_size", 256))
    return VLLMEngine(model_dir, tokenizer, dtype=dtype, max_model_len=options.get("max_model_len", 512),
                      gpu_memory_utilization=options.get("gpu_memory_utilization", 0.3),
                      kv_cache_gib=options.get("kv_cache_gib", 1), enforce_eager=options.get("enforce_eager", True),
                      tensor_parallel_size=options.get("tensor_parallel_size", 1), sleep=options.get("sleep", True))
