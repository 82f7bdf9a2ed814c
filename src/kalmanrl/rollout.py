"""Rollout engines behind one interface: prompts (token ids) -> n completions each, with the sampled tokens, their
sampling log-probs and finish reasons. `vllm` keeps one offline engine alive and receives the policy's new weights in
place after each update; `hf` is transformers `generate` on the policy itself, the fallback without vLLM.

Both return *raw* log-probs (log-softmax of the model's logits before temperature / top-p), which is what vLLM
returns by default; the trainer recomputes old log-probs itself, these are for diagnostics and engine checks."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch


@dataclass(frozen=True)
class SamplingConfig:
    n: int = 1
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    max_tokens: int = 64
    seed: int = 0


@dataclass
class Completion:
    token_ids: list[int]      # sampled tokens, the end-of-sequence token included when generation stopped on it
    logprobs: list[float]     # raw log-prob of each sampled token
    text: str                 # decoded completion, special tokens removed
    finish_reason: str        # "stop" (end of sequence) or "length" (max_tokens reached)


class RolloutEngine(Protocol):
    def generate(self, prompt_ids: list[list[int]], sampling: SamplingConfig) -> list[list[Completion]]:
        """Outer list: one entry per prompt; inner: its `sampling.n` completions."""

    def sync_weights(self, policy: torch.nn.Module) -> None:
        """Make the engine sample from `policy`'s current weights."""

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
    left padding. Randomness comes only from `sampling.seed`, inside a forked RNG, so the trainer's RNG stream is
    untouched and a resumed run samples exactly what an uninterrupted one would."""

    def __init__(self, policy: torch.nn.Module, tokenizer, *, batch_size: int = 256) -> None:
        self.policy, self.tokenizer, self.batch_size = policy, tokenizer, batch_size

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], sampling: SamplingConfig) -> list[list[Completion]]:
        rows = [ids for ids in prompt_ids for _ in range(sampling.n)]
        device = next(self.policy.parameters()).device
        completions: list[Completion] = []
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(sampling.seed)
            for start in range(0, len(rows), self.batch_size):
                completions += self._generate_batch(rows[start:start + self.batch_size], sampling, device)
        return [completions[i:i + sampling.n] for i in range(0, len(completions), sampling.n)]

    def _generate_batch(self, rows: list[list[int]], sampling: SamplingConfig, device) -> list[Completion]:
        width = max(map(len, rows))
        pad, eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
        attention = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
        greedy = sampling.temperature == 0
        out = self.policy.generate(
            input_ids=input_ids, attention_mask=attention, max_new_tokens=sampling.max_tokens, do_sample=not greedy,
            temperature=None if greedy else sampling.temperature, top_p=None if greedy else sampling.top_p,
            top_k=None, eos_token_id=eos, pad_token_id=pad, return_dict_in_generate=True, output_logits=True)
        tokens = out.sequences[:, width:]
        logprobs = torch.log_softmax(torch.stack(out.logits, dim=1).float(), dim=-1)
        taken = logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        result = []
        for ids, lps in zip(tokens.tolist(), taken.tolist()):
            stop = ids.index(eos) + 1 if eos in ids else len(ids)
            result.append(Completion(token_ids=ids[:stop], logprobs=lps[:stop],
                                     text=self.tokenizer.decode(ids[:stop], skip_special_tokens=True),
                                     finish_reason="stop" if eos in ids else "length"))
        return result

    def sync_weights(self, policy: torch.nn.Module) -> None:
        if policy is not self.policy:
            raise ValueError("the hf engine samples from the policy module it was made with")


class VLLMEngine(_ContextManaged):
    """vLLM's offline engine, in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so new policy weights can be pushed into
    its model runner with `reload_weights` — no save-and-reload per step, as TRL's colocate mode."""

    def __init__(self, model_dir: str | Path, *, dtype: str = "float32", max_model_len: int = 512,
                 gpu_memory_utilization: float = 0.3, kv_cache_gib: float = 1, enforce_eager: bool = True) -> None:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(kv_cache_gib))))
        from vllm import LLM

        self.llm = LLM(model=str(model_dir), dtype=dtype, max_model_len=max_model_len, enforce_eager=enforce_eager,
                       gpu_memory_utilization=gpu_memory_utilization, seed=0)

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingConfig) -> list[list[Completion]]:
        from vllm import SamplingParams, TokensPrompt

        params = SamplingParams(n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
                                max_tokens=sampling.max_tokens, seed=sampling.seed, logprobs=0)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids], params,
                                    use_tqdm=False)
        return [[Completion(token_ids=list(o.token_ids),
                            logprobs=[step[token].logprob for step, token in zip(o.logprobs, o.token_ids)],
                            text=o.text, finish_reason="length" if o.finish_reason == "length" else "stop")
                 for o in request.outputs] for request in outputs]

    def sync_weights(self, policy: torch.nn.Module) -> None:
        model_runner(self.llm).reload_weights(weights_iterator=iter(policy.state_dict().items()))
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        del self.llm


def model_runner(llm):
    """The in-process model runner of a vLLM engine. Internal path, checked for vLLM 0.32; tested, since it moves
    between releases."""
    return llm.llm_engine.model_executor.driver_worker.worker.model_runner


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def make_engine(backend: str, *, policy: torch.nn.Module, tokenizer, model_dir: str | Path,
                **options) -> RolloutEngine:
    """`hf`, `vllm`, or `auto` (vllm when importable). Options are the config's `rollout` section; each engine takes
    the ones it uses."""
    if backend == "auto":
        backend = "vllm" if vllm_available() else "hf"
    if backend == "hf":
        return HFEngine(policy, tokenizer)
    if backend == "vllm":
        dtype = str(next(policy.parameters()).dtype).removeprefix("torch.")
        return VLLMEngine(model_dir, dtype=dtype, max_model_len=options.get("max_model_len", 512),
                          gpu_memory_utilization=options.get("gpu_memory_utilization", 0.3),
                          kv_cache_gib=options.get("kv_cache_gib", 1), enforce_eager=options.get("enforce_eager", True))
    raise ValueError(f"unknown rollout backend {backend!r}; known: auto, hf, vllm")
