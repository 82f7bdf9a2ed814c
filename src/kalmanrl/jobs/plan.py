"""The memory plan: peak memory per GPU of every training and evaluation job of a config, estimated before anything is
loaded, and the check the train and evaluate stages run before they load a model.

A model's shape comes from its config alone: the model is built on the `meta` device (no weights are allocated or
downloaded) to count parameters, and one and two of its decoder layers run forward on `meta` tensors under a
saved-tensor hook, so the activations kept for backward are counted from the model's own autograd graph, per token
and per layer. Attention is counted as a fused kernel (FlashAttention on a GPU, the flash kernel of `sdpa` on the
CPU) that keeps query, key, value, output and log-sum-exp, never a [T, T] matrix.

What one training rank holds (FSDP2 shards weights, gradients, optimiser state and the reference model over
gpus x nodes ranks):
- static: weights, AdamW's two moments, the reference model (when `beta > 0`, stored as the policy is);
- while scoring (old and reference log-probs, no grad) and updating (forward + backward of one micro-batch of
  `train.micro_batch_tokens`): activations, one `train.logit_chunk_tokens` chunk of the log-prob head's float32
  logits, and the compute copy of the weights (autocast's bf16 cache; on several ranks also FSDP2's all-gathered
  layers); gradients while updating and at the optimiser step (freed before generating);
- the colocated vLLM engine: `rollout.gpu_memory_utilization` of the GPU while generating; with `rollout.sleep`,
  only a residue during scoring and the update; or the hf engine's generate: its KV cache and one decoding step's
  logits and sampling tensors.
The peak is the static part plus the largest phase: generating, scoring, updating or the optimiser step. With LoRA
(`models.<m>.lora`) the base weights are still held, gradients and AdamW's moments exist for the adapters only (their
count from the model's shape, r and the target modules), and there is no reference copy (the base is the reference).
`benchmarks/bench_memory.py` measures the CPU case against real training steps."""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
import os
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from kalmanrl.configuration.config import ConfigError, load_configs, stage_settings
from kalmanrl.configuration.settings import (
    EvaluateSettings,
    Rollout,
    Train,
    TrainSettings,
    resolve_evaluate,
    resolve_train,
)
from kalmanrl.core.layout import config_jobs, parse_run_name
from kalmanrl.policy.lora import Lora

log = logging.getLogger(__name__)

GIB = 2**30
MIB = 2**20
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Unmeasured on this machine (no GPU): the CUDA context and allocator slack of a GPU process, and what a sleeping vLLM
# engine keeps on the GPU (its weights go to host memory and its KV cache is freed; its CUDA graphs and buffers stay).
CUDA_OVERHEAD = 1 * GIB
VLLM_ASLEEP = 1 * GIB
# vLLM's own activation and sampler workspace inside its budget (profiled by vLLM at start-up; not modelled here).
VLLM_WORKSPACE = 1 * GIB
# float32 [chunk tokens, vocab] tensors alive at the peak of the log-prob head (`kalmanrl.policy.logprobs`, one chunk of
# `train.logit_chunk_tokens` at a time), as measured on the CPU (benchmarks/README.md): scoring (no grad) 2, the
# logits and their log-softmax; the update (grad and entropy) 4, the log-softmax, the entropy's softmax and product,
# and in the backward pass the log-softmax's gradient; the same whether the chunk's logits were kept for backward
# (one chunk) or are recomputed there (several).
LOGIT_COPIES_UPDATE = 4
LOGIT_COPIES_SCORE = 2
# [rows, vocab] float32 tensors alive at once in a decoding step of the hf engine (`HFEngine`: the step's logits,
# generate's float32 copy, their log-softmax, and the sampler's scaled logits, float64 Gumbel noise and perturbed
# scores), as measured on the CPU (tests/test_memory.py): greedy 5, sampling 16, with top-p 20. The engine keeps only
# the sampled tokens' log-probs of earlier steps. Not counted: the CPU sampler's uniforms drawn ahead (at most 16 MiB).
GENERATE_STEP_COPIES = 20
GPUS_PER_NODE = 8
# The parts a training rank holds throughout a step; the rest come and go with its phases.
STATIC_PARTS = ("weights", "optimizer", "reference", "overhead")


class MemoryPlanError(ConfigError):
    """A job does not fit the memory it asks for; the message names the setting to change."""


# ---------------------------------------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class Activations:
    """Bytes kept for backward per token of a micro-batch, counted on the meta device for one activation dtype."""

    per_layer: int   # one decoder layer
    outside: int     # embedding, final norm (the lm_head is the logits term)


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs of a model: sizes from its config, the parameter count from a meta-device build."""

    params: int
    layer_params: int
    embedding_params: int
    layers: int
    hidden: int
    intermediate: int
    kv_heads: int
    head_dim: int
    vocab: int
    serve_dtype: str  # what vLLM serves (models.<m>.dtype)
    config_json: str = field(repr=False)  # the transformers config, for counting activations

    def kv_bytes_per_token(self, dtype: str) -> int:
        """Keys and values of one token in every layer."""
        return 2 * self.layers * self.kv_heads * self.head_dim * DTYPE_BYTES[dtype]

    def activations(self, dtype: str) -> Activations:
        return _count_activations(self.config_json, dtype)


class _VocabularyOfSpec:
    """What `model.tiny_config` reads of a tokenizer, for planning before the tokenizer exists: the spec's vocab_size
    is the size the trained tokenizer reaches (its special tokens included)."""

    eos_token_id = pad_token_id = None

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size


def model_config(entry: dict, config_dir: str | Path | None = None):
    """The transformers config of a `models.<m>` entry: the tiny model from its spec; a hub or local model from
    `config_dir` when given (planning offline), else through AutoConfig (the hub cache, or one small download)."""
    from transformers import AutoConfig

    from kalmanrl.policy.model import tiny_config

    if config_dir is not None:
        return AutoConfig.from_pretrained(config_dir)
    if entry["source"] == "tiny":
        return tiny_config(entry["tiny"], _VocabularyOfSpec(entry["tiny"]["vocab_size"]))
    if entry["source"] == "hub":
        return AutoConfig.from_pretrained(entry["id"], revision=entry.get("revision"))
    return AutoConfig.from_pretrained(entry["path"])


def model_shape(config, serve_dtype: str | None = None) -> ModelShape:
    """Shape of a causal LM from its transformers config; `serve_dtype` defaults to the config's own dtype."""
    model = _meta_model(config, config.num_hidden_layers)
    params = sum(p.numel() for p in model.parameters())
    layer_params = sum(p.numel() for p in model.model.layers[0].parameters())
    embedding_params = model.get_input_embeddings().weight.numel()
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    dtype = serve_dtype or str(getattr(config, "dtype", None) or "float32").removeprefix("torch.")
    return ModelShape(params=params, layer_params=layer_params, embedding_params=embedding_params,
                      layers=text.num_hidden_layers, hidden=text.hidden_size,
                      intermediate=getattr(text, "intermediate_size", None) or 4 * text.hidden_size,
                      kv_heads=getattr(text, "num_key_value_heads", None) or heads, head_dim=head_dim,
                      vocab=text.vocab_size, serve_dtype=dtype if dtype in DTYPE_BYTES else "float32",
                      config_json=config.to_json_string())


def _with_layers(config, layers: int):
    config = copy.deepcopy(config)
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None):
        config.layer_types = (config.layer_types * layers)[:layers]
    return config


def _meta_model(config, layers: int, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(_with_layers(config, layers), dtype=dtype,
                                                attn_implementation=_fused_attention())


class _FusedAttention(torch.autograd.Function):
    """What a fused attention kernel keeps for backward (q, k, v, output, log-sum-exp), for counting on meta tensors;
    never run on real data."""

    @staticmethod
    def forward(ctx, query, key, value):  # [B, H, T, D], [B, Hkv, T, D] x 2
        out = torch.empty_like(query)
        lse = query.new_empty(query.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(query, key, value, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("the plan's attention only counts memory")


@functools.cache
def _fused_attention() -> str:
    """Register the counting attention with transformers (once) and return its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    name = "kalmanrl_plan_fused"

    def attention(module, query, key, value, attention_mask, **kwargs):
        return _FusedAttention.apply(query, key, value).transpose(1, 2), None  # [B, T, H, D]

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, lambda *args, **kwargs: None)
    return name


@functools.cache
def _count_activations(config_json: str, dtype: str, tokens: int = 64) -> Activations:
    """Saved-for-backward bytes of a 1- and a 2-layer copy of the model on `tokens` meta tokens: the difference is one
    layer, the rest is outside the layers. Parameters (and views of them) are weights, not activations."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(**json.loads(config_json))
    torch_dtype = getattr(torch, dtype)

    def saved(layers: int) -> int:
        model = _meta_model(config, layers, torch_dtype).train()
        params = {id(p) for p in model.parameters()}
        kept: dict[int, int] = {}

        def pack(tensor):
            base = tensor if tensor._base is None else tensor._base
            if id(base) not in params and id(tensor) not in params:
                kept[id(base)] = base.numel() * base.element_size()
            return tensor

        ids = torch.zeros(1, tokens, dtype=torch.long, device="meta")
        positions = torch.arange(tokens, device="meta").unsqueeze(0)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            model(input_ids=ids, position_ids=positions, logits_to_keep=1)
        return sum(kept.values())

    one, two = saved(1), saved(2)
    return Activations(per_layer=(two - one) // tokens, outside=(2 * one - two) // tokens)


def adapter_params(shape: ModelShape, lora: Lora, *, key: str) -> int:
    """Parameters LoRA adds, r x (inputs + outputs) of every adapted linear layer: the trainer's own injection into a
    meta-device copy of the model, so they match exactly and nothing is allocated (`key`: the config key, for
    errors)."""
    return _count_adapters(shape.config_json, lora.r, tuple(lora.target_modules), key)


@functools.cache
def _count_adapters(config_json: str, r: int, target_modules: tuple[str, ...], key: str) -> int:
    from transformers import AutoConfig

    from kalmanrl.policy.lora import add_adapters, trainable_parameters

    config = AutoConfig.for_model(**json.loads(config_json))
    with torch.device("meta"):
        model = add_adapters(_meta_model(config, config.num_hidden_layers),
                             Lora(r=r, alpha=r, dropout=0.0, target_modules=target_modules), key=key)
    return sum(p.numel() for p in trainable_parameters(model))


# -------------------------------------------------------------------------------------------------------- estimates


@dataclass
class Estimate:
    """Peak bytes per device of one job, by part; `limit` is what the job asks for (0 = not checked: a CPU job)."""

    stage: str
    device: str
    backend: str  # what generates: "vllm" or "hf" (transformers generate), as rollout.backend resolves
    ranks: int
    parts: dict[str, float]
    limit: float
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    static: float = 0.0  # training: bytes held throughout (the STATIC_PARTS)
    phases: dict[str, float] = field(default_factory=dict)  # training: bytes above `static` in each phase of a step

    @property
    def total(self) -> float:
        return self.parts["total"]

    @property
    def fits(self) -> bool:
        return not self.problems and (not self.limit or self.total <= self.limit)


@dataclass(frozen=True)
class Resources:
    gpus: int = 0
    nodes: int = 1
    gpu_mem_gb: float = 80.0

    @property
    def ranks(self) -> int:
        return max(1, self.gpus) * self.nodes


def resolve_for_plan(stage: str, settings: dict, resources: Resources) -> TrainSettings | EvaluateSettings:
    """A job's settings resolved as the job will resolve them on the devices it asks for, before it starts:
    `rollout.backend: auto` taken as vLLM on a GPU machine (where the GPU lock installs it) and transformers on the
    CPU. A setting the job would refuse is refused here, naming it."""
    device = "cuda" if resources.gpus else "cpu"
    try:
        if stage == "train":
            return resolve_train(settings, device, vllm_installed=device == "cuda")
        if stage == "evaluate":
            return resolve_evaluate(settings, vllm_installed=device == "cuda")
    except ValueError as err:
        raise ConfigError(f"{stage} {' '.join(f'{k}={v}' for k, v in settings.get('ident', {}).items())}: {err}"
                          ) from None
    raise ValueError(f"the memory plan covers train and evaluate, not {stage!r}")


@dataclass(frozen=True)
class TrainShape:
    """The token counts of one training step (rows = prompts x G, each prompt_len + completion_len tokens)."""

    rows: int
    prompt_len: int
    completion_len: int
    micro_rows: int    # rows of one micro-batch, of the update and of the no-grad scoring passes alike

    @property
    def seq_len(self) -> int:
        return self.prompt_len + self.completion_len


def sequence_lengths(max_tokens: int, max_length: int | None, rollout: Rollout, shape: ModelShape
                     ) -> tuple[int, int]:
    """(prompt, completion) tokens of the longest row a stage can produce, where the stage cuts it
    (`stage.length_limit`): the engine's context (`Rollout.context`: vLLM's `rollout.max_model_len`, the model's
    max_position_embeddings for transformers generate) and the stage's `max_length` (prompt plus completion, the KRPO
    authors' limit). Completions take at most `max_tokens` of it, prompts the rest."""
    from kalmanrl.jobs.stage import length_limit

    positions = json.loads(shape.config_json).get("max_position_embeddings")
    # An estimate needs a finite row: a model without max_position_embeddings is taken at rollout.max_model_len.
    context = rollout.context(positions) or rollout.max_model_len
    limit = int(length_limit(context, max_length))
    completion = min(max_tokens, limit - 1)
    return limit - completion, completion


def train_shape(train: Train, *, prompt_len: int, completion_len: int | None = None) -> TrainShape:
    """Micro-batches as `batch.micro_batches` cuts every mini-batch (for scoring and the update alike): as many rows
    of padded length as `train.micro_batch_tokens` holds, at least one, at most a mini-batch. Packed
    (`train.packing`) a micro-batch holds that many real tokens instead: at the rows' longest, which the plan
    assumes, the same rows and tokens (shorter rows only make a packed micro-batch hold more of them)."""
    rows = train.prompts_per_step * train.group_size
    completion_len = train.max_tokens if completion_len is None else completion_len
    seq = prompt_len + completion_len
    mini = math.ceil(rows / train.mini_batches)
    return TrainShape(rows, prompt_len, completion_len, min(mini, max(1, train.micro_batch_tokens // seq)))


def logit_bytes(train: Train, vocab: int, rows: int, completion_len: int, *, grad: bool) -> float:
    """The log-prob head's float32 tensors of one chunk: `logprobs.token_logprobs` takes chunk_tokens // rows
    positions (at least one) of every row of the micro-batch at a time, at most its completion_len positions."""
    width = min(completion_len, max(1, train.logit_chunk_tokens // max(1, rows)))
    return rows * width * vocab * 4 * (LOGIT_COPIES_UPDATE if grad else LOGIT_COPIES_SCORE)


def estimate_train(shape: ModelShape, settings: TrainSettings, resources: Resources, *,
                   prompt_len: int | None = None, completion_len: int | None = None) -> Estimate:
    """Peak memory per rank of one training job (its settings resolved for these resources: `resolve_for_plan`).
    Rows are taken as long as the trainer lets them grow (`sequence_lengths`: the engine's context and
    `train.max_length`) unless the lengths are given."""
    train, rollout, beta = settings.train, settings.rollout, settings.algorithm.beta
    device = "cuda" if resources.gpus else "cpu"
    ranks = resources.ranks if device == "cuda" else 1
    mode, ckpt = train.precision.name, train.gradient_checkpointing
    if prompt_len is None:
        prompt_len, longest_completion = sequence_lengths(train.max_tokens, train.max_length, rollout, shape)
        completion_len = longest_completion if completion_len is None else completion_len
    step = train_shape(train, prompt_len=prompt_len, completion_len=completion_len)
    weight_bytes, state_bytes = (2, 2) if mode == "bfloat16" else (4, 4)
    act_dtype = "float32" if mode == "float32" else "bfloat16"
    p, lora = shape.params, settings.lora
    adapters = 0 if lora is None else adapter_params(shape, lora, key=settings.lora_key)
    trained = p if lora is None else adapters  # what has gradients and AdamW state
    parts: dict[str, float] = {
        "weights": (p + adapters) * weight_bytes / ranks,
        "gradients": trained * weight_bytes / ranks,
        "optimizer": 2 * trained * state_bytes / ranks,
        # stored as the policy is; under LoRA the policy's own base (adapters disabled)
        "reference": p * weight_bytes / ranks if beta > 0 and lora is None else 0.0,
    }
    # The compute copy: FSDP2 all-gathers one layer ahead in the weights' dtype (two layers live) plus the root
    # group's embedding; autocast caches a bf16 copy of every weight it casts during a forward (one rank or N).
    gathered = weight_bytes * (2 * shape.layer_params + shape.embedding_params) if ranks > 1 else 0.0
    parts["compute_copy"] = gathered + (2 * p if mode == "autocast_bf16" else 0.0)
    # Counted with the model in the activation dtype. Under autocast the residual stream between layers stays float32
    # (float32 embedding plus bf16 branches): what checkpointing keeps per layer is that float32 hidden state.
    act = shape.activations(act_dtype)
    residual = shape.hidden * (2 if mode == "bfloat16" else 4)
    micro_tokens = step.micro_rows * step.seq_len
    full = micro_tokens * (act.outside + shape.layers * act.per_layer)
    checkpointed = micro_tokens * (act.outside + shape.layers * residual + act.per_layer)
    parts["activations_full"], parts["activations_ckpt"] = full, checkpointed
    parts["activations"] = checkpointed if ckpt else full
    update_logits = logit_bytes(train, shape.vocab, step.micro_rows, step.completion_len, grad=True)
    score_logits = logit_bytes(train, shape.vocab, step.micro_rows, step.completion_len, grad=False)
    # A no-grad forward keeps nothing for backward: alive at once are the residual stream, a normed copy and the
    # MLP's gate, up and their product.
    score_acts = step.micro_rows * step.seq_len * (2 * shape.hidden + 3 * shape.intermediate) * DTYPE_BYTES[act_dtype]
    parts["logits"] = max(update_logits, score_logits)
    update = parts["compute_copy"] + parts["activations"] + update_logits
    score = parts["compute_copy"] + score_acts + score_logits
    # AdamW's foreach step makes one temporary the size of the (local) parameters (the square root of the second
    # moment) while gradients and both moments are alive.
    optimizer_step = trained * state_bytes / ranks
    notes = [f"precision {mode}", f"gradient checkpointing {'on' if ckpt else 'off'}",
             f"{step.rows} rows x {step.seq_len} tokens; micro-batches of {step.micro_rows} rows"]
    if lora is not None:
        notes.append(f"LoRA r={lora.r}: {adapters:,} adapter parameters train, the base weights are frozen")
    problems: list[str] = []
    engine_live = engine_asleep = 0.0
    parts["vllm_weights"] = parts["kv_cache"] = 0.0
    backend = rollout.backend
    if device == "cuda" and backend == "vllm":
        engine_live, engine_asleep = _colocated_vllm(shape, rollout, resources, parts, problems, notes)
        notes += _kv_capacity_warning(shape, rollout, parts["kv_cache"], math.ceil(step.rows / ranks))
    elif backend == "hf":
        # each rank generates for its share of the step's prompts
        parts["kv_cache"] = hf_generate_bytes(shape, math.ceil(step.rows / ranks), step.seq_len,
                                              generation_cache_dtype(mode), batch_size=rollout.hf_batch_size)
        engine_live = parts["kv_cache"]
    else:  # vLLM on the CPU: weights in the policy's dtype (float32) and a fixed KV cache
        parts["vllm_weights"] = p * 4
        parts["kv_cache"] = rollout.kv_cache_gib * GIB
        engine_live = engine_asleep = parts["vllm_weights"] + parts["kv_cache"]
    parts["overhead"] = CUDA_OVERHEAD if device == "cuda" else 0.0
    # Gradients exist from the first backward of a rollout batch to its last optimiser step (the trainer frees them
    # before generating).
    static = sum(parts[k] for k in STATIC_PARTS)
    grads = parts["gradients"]
    phases = {"generating": engine_live, "scoring": engine_asleep + score, "updating": engine_asleep + grads + update,
              "optimiser step": engine_asleep + grads + optimizer_step}
    parts["total"] = static + max(phases.values())
    return Estimate("train", device, backend, ranks, parts, resources.gpu_mem_gb * GIB if device == "cuda" else 0.0,
                    notes, problems, static, phases)


def _vllm_share(shape: ModelShape, rollout: Rollout, parts: dict, problems: list[str], setting: str,
                utilization: float, gpu_mem_gb: float) -> float:
    """vLLM's share of the GPU (`utilization`, the value of `setting`, x its memory), returned, and split in `parts`
    into its weights, its workspace and the KV cache that fills the rest; checks that cache holds one sequence."""
    tp = rollout.tensor_parallel_size
    budget = utilization * gpu_mem_gb * GIB
    parts["vllm_weights"] = shape.params * DTYPE_BYTES[shape.serve_dtype] / tp
    parts["vllm_workspace"] = VLLM_WORKSPACE
    parts["kv_cache"] = budget - parts["vllm_weights"] - parts["vllm_workspace"]
    _check_kv(shape, rollout, parts["kv_cache"], tp, problems, setting, utilization, gpu_mem_gb)
    return budget


def _colocated_vllm(shape: ModelShape, rollout: Rollout, resources: Resources, parts: dict, problems: list[str],
                    notes: list[str]) -> tuple[float, float]:
    """The engine's share of the GPU while live, and its residue asleep; checks its KV cache holds one sequence."""
    budget = _vllm_share(shape, rollout, parts, problems, "rollout.gpu_memory_utilization",
                         rollout.gpu_memory_utilization, resources.gpu_mem_gb)
    notes.append(f"vLLM {'sleeps' if rollout.sleep else 'stays awake'} during scoring and the update")
    return budget, VLLM_ASLEEP if rollout.sleep else budget


def _kv_capacity_warning(shape: ModelShape, rollout: Rollout, kv_cache: float, rows: int) -> list[str]:
    """A warning when vLLM's KV cache holds fewer whole sequences than a rank generates per step: vLLM then preempts
    and recomputes sequences (slower, the same numbers), which nothing else would say."""
    per_sequence = rollout.max_model_len * shape.kv_bytes_per_token(shape.serve_dtype) / rollout.tensor_parallel_size
    held = max(0, int(kv_cache // per_sequence))
    if held >= rows:
        return []
    return [f"WARNING: vLLM's KV cache holds {held} sequences of rollout.max_model_len tokens at once, fewer than the "
            f"{rows} rows a rank generates per step, so vLLM preempts and recomputes (slower, same numbers): raise "
            f"rollout.gpu_memory_utilization or lower rollout.max_model_len"]


def _check_kv(shape: ModelShape, rollout: Rollout, kv_cache: float, tp: int, problems: list[str], key: str,
              utilization: float, gpu_mem_gb: float) -> None:
    per_token = shape.kv_bytes_per_token(shape.serve_dtype) / tp
    need = rollout.max_model_len * per_token
    if kv_cache < need:
        wanted = (shape.params * DTYPE_BYTES[shape.serve_dtype] / tp + VLLM_WORKSPACE + need) / (gpu_mem_gb * GIB)
        problems.append(f"vLLM's KV cache ({kv_cache / GIB:.1f} GiB) cannot hold one sequence of rollout.max_model_len"
                        f" = {rollout.max_model_len} tokens ({need / GIB:.2f} GiB): raise {key} from "
                        f"{utilization} to {math.ceil(wanted * 100) / 100}")


def generation_cache_dtype(precision: str) -> str:
    """The dtype of transformers' KV cache when the policy generates under `train.precision` (resolved): the weights'
    dtype. Under autocast_bf16 the keys and values leave bf16 products, but the cache starts as an empty tensor of
    the first keys' dtype, float32 (rotated by the float32 cos and sin of the float32 residual stream), and
    `torch.cat` promotes every later bf16 value to it: the whole cache is float32."""
    return "bfloat16" if precision == "bfloat16" else "float32"


def hf_generate_bytes(shape: ModelShape, rows: int, seq_len: int, dtype: str, *, batch_size: int) -> float:
    """transformers `generate` on the policy (the hf engine, `batch_size` rows per call: `rollout.hf_batch_size`):
    the KV cache and one decoding step's logits and sampling tensors (`GENERATE_STEP_COPIES`) of its largest call."""
    batch = min(rows, batch_size)
    return batch * seq_len * shape.kv_bytes_per_token(dtype) + GENERATE_STEP_COPIES * batch * shape.vocab * 4


def estimate_evaluate(shape: ModelShape, settings: EvaluateSettings, resources: Resources) -> Estimate:
    """Peak memory per GPU of one evaluation job: with vLLM, the engine alone at `rollout.eval_gpu_memory_utilization`
    (what the evaluate stage gives vLLM); with transformers, the float32 policy and its generation."""
    evaluate, rollout = settings.evaluate, settings.rollout
    device = "cuda" if resources.gpus else "cpu"
    parts = {key: 0.0 for key in ("weights", "gradients", "optimizer", "reference", "compute_copy",
                                  "activations_full", "activations_ckpt", "activations", "logits")}
    problems: list[str] = []
    notes: list[str] = []
    rows = evaluate.batch_size * evaluate.k
    backend = rollout.backend
    if device == "cuda" and backend == "vllm":
        budget = _vllm_share(shape, rollout, parts, problems, "rollout.eval_gpu_memory_utilization",
                             rollout.eval_gpu_memory_utilization, resources.gpu_mem_gb)
        per_sequence = (rollout.max_model_len * shape.kv_bytes_per_token(shape.serve_dtype)
                        / rollout.tensor_parallel_size)
        notes.append(f"vLLM alone; its KV cache holds {max(0, int(parts['kv_cache'] // per_sequence))} sequences of "
                     f"rollout.max_model_len tokens at once ({rows} per generate call)")
        parts["overhead"] = CUDA_OVERHEAD
        parts["total"] = budget + CUDA_OVERHEAD
    else:  # the float32 policy loaded for generation, and beside it on the CPU vLLM's float32 copy and KV cache
        parts["weights"] = shape.params * 4
        if backend == "vllm":
            parts["vllm_weights"], parts["kv_cache"] = shape.params * 4, rollout.kv_cache_gib * GIB
        else:
            parts["vllm_weights"] = 0.0
            prompt_len, completion_len = sequence_lengths(evaluate.max_tokens, evaluate.max_length, rollout, shape)
            parts["kv_cache"] = hf_generate_bytes(shape, rows, prompt_len + completion_len, "float32",
                                                  batch_size=rollout.hf_batch_size)
        parts["overhead"] = CUDA_OVERHEAD if device == "cuda" else 0.0
        parts["total"] = parts["weights"] + parts["vllm_weights"] + parts["kv_cache"] + parts["overhead"]
    return Estimate("evaluate", device, backend, resources.ranks if device == "cuda" else 1, parts,
                    resources.gpu_mem_gb * GIB if device == "cuda" else 0.0, notes, problems)


# ------------------------------------------------------------------------------------------------- jobs and checks


def resources_of(config: dict, stage: str) -> Resources:
    section = config["resources"][stage]
    return Resources(gpus=section["gpus"], nodes=section.get("nodes", 1), gpu_mem_gb=section.get("gpu_mem_gb", 80))


def jobs(config: dict) -> Iterator[tuple[str, dict]]:
    """(stage, wildcards) of every training and evaluation job, in the workflow's own list of them
    (kalmanrl.core.layout.config_jobs), an evaluation's {run} read back into the algorithm, seed and step that
    `stage_settings` takes, as the evaluate rule does."""
    for stage, wildcards in config_jobs(config):
        if stage == "evaluate":
            wildcards = {"model": wildcards["model"], "task": wildcards["task"], **parse_run_name(wildcards["run"]),
                         "benchmark": wildcards["benchmark"]}
        yield stage, wildcards


def estimate_job(stage: str, settings: TrainSettings | EvaluateSettings, shape: ModelShape,
                 resources: Resources) -> Estimate:
    if stage == "train":
        return estimate_train(shape, settings, resources)
    if stage == "evaluate":
        return estimate_evaluate(shape, settings, resources)
    raise ValueError(f"the memory plan covers train and evaluate, not {stage!r}")


def suggestions(stage: str, settings: TrainSettings | EvaluateSettings, shape: ModelShape,
                resources: Resources) -> list[str]:
    """Alternative changes that make a job fit, each checked with the plan itself: more GPUs (or nodes) alone; with
    transformers generate (`rollout.backend: hf`), the largest power of two below `rollout.hf_batch_size` at which
    generation fits (alone when nothing else is too big); or, for training, smaller logit chunks, gradient
    checkpointing, that `rollout.hf_batch_size` where generation does not fit, and the largest micro-batch budget
    that fits (on the GPUs asked for, else on the fewest that suffice). The plan's own problems (vLLM's KV cache)
    come first."""
    first = estimate_job(stage, settings, shape, resources)
    found = list(first.problems)
    if first.device != "cuda" or first.fits or found:
        return found

    def fits(new_settings: TrainSettings | EvaluateSettings, new_resources: Resources) -> bool:
        return estimate_job(stage, new_settings, shape, new_resources).fits

    def fewest_ranks(new_settings: TrainSettings | EvaluateSettings) -> Resources | None:
        for ranks in range(resources.ranks + 1, 8 * GPUS_PER_NODE + 1):
            gpus, nodes = (ranks, 1) if ranks <= GPUS_PER_NODE else (GPUS_PER_NODE, ranks // GPUS_PER_NODE)
            if gpus * nodes == ranks and fits(new_settings, replace(resources, gpus=gpus, nodes=nodes)):
                return replace(resources, gpus=gpus, nodes=nodes)
        return None

    def asking(new: Resources) -> str:
        return (f"raise resources.{stage}.gpus to {new.gpus}" if new.nodes == 1 else
                f"raise resources.{stage}.nodes to {new.nodes} (with gpus: {new.gpus})")

    def with_hf_batch(new_settings: TrainSettings | EvaluateSettings, rows: int) -> TrainSettings | EvaluateSettings:
        return replace(new_settings, rollout=replace(new_settings.rollout, hf_batch_size=rows))

    def generation_fits(estimate: Estimate) -> bool:  # an evaluation with transformers is its generation
        return estimate.static + estimate.phases["generating"] <= estimate.limit if estimate.phases else estimate.fits

    def hf_batch() -> int | None:
        """The largest power of two below rollout.hf_batch_size at which generation fits on the GPUs asked for
        (the KV cache and step tensors grow with the rows per call): None when it already fits, or fits at none."""
        if settings.rollout.backend != "hf" or generation_fits(first):
            return None
        size = 1 << (settings.rollout.hf_batch_size - 1).bit_length() >> 1  # the largest power of two below it
        while size and not generation_fits(estimate_job(stage, with_hf_batch(settings, size), shape, resources)):
            size //= 2
        return size or None

    if (more := fewest_ranks(settings)) is not None:
        found.append(asking(more))
    if (batch := hf_batch()) is not None and fits(with_hf_batch(settings, batch), resources):
        return [*found, f"set rollout.hf_batch_size: {batch}"]  # generation was all that did not fit
    if stage != "train":
        return found
    changes = []
    if settings.train.logit_chunk_tokens > 4096:
        settings = settings.with_train(logit_chunk_tokens=4096)
        changes.append("train.logit_chunk_tokens: 4096")
    if not settings.train.gradient_checkpointing:
        settings = settings.with_train(gradient_checkpointing=True)
        changes.append("train.gradient_checkpointing: true")
    if batch is not None:
        settings = with_hf_batch(settings, batch)
        changes.append(f"rollout.hf_batch_size: {batch}")
    seq = sum(sequence_lengths(settings.train.max_tokens, settings.train.max_length, settings.rollout, shape))
    rows = settings.train.prompts_per_step * settings.train.group_size

    def with_budget(tokens: int) -> TrainSettings:
        return settings.with_train(micro_batch_tokens=tokens)

    target = resources if fits(with_budget(seq), resources) else fewest_ranks(with_budget(seq))
    if target is None or target is not resources and more is not None and not changes:
        return found  # nothing fits, or only more GPUs help and that is already said
    low, high = 1, rows  # the most rows per micro-batch that fit
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(with_budget(middle * seq), target) else (low, middle - 1)
    low *= seq
    change = f"set {', '.join(changes + [f'train.micro_batch_tokens <= {low}'])}"
    found.append(change if target is resources else f"{asking(target)} and {change}")
    return found


def refusal(stage: str, label: str, estimate: Estimate, fixes: list[str]) -> str:
    need = f"needs {estimate.total / GIB:.1f} GiB per GPU of {estimate.limit / GIB:.0f}"
    return f"{stage} {label}: {need}" + (f"; {'; or '.join(fixes)}" if fixes else "")


def settings_of(config: dict, stage: str, wildcards: dict) -> dict:
    """The stage's settings (as the workflow passes them) with the model entry and the stage's resources."""
    return {**stage_settings(config, stage, **wildcards), "model": config["models"][wildcards["model"]],
            "resources": config["resources"][stage]}


@dataclass
class PlannedGroup:
    """Jobs with the same estimate (seeds, tasks, benchmarks usually do not change memory)."""

    stage: str
    estimate: Estimate
    resources: Resources
    wildcards: list[dict] = field(default_factory=list)
    fixes: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        keys = [k for k in ("model", "algorithm", "task", "benchmark", "seed", "step") if k in self.wildcards[0]]
        parts = []
        for key in keys:
            values = list(dict.fromkeys(str(w[key]) for w in self.wildcards if key in w))
            parts.append(f"{key}={','.join(values) if len(values) <= 4 else f'{len(values)} values'}")
        return " ".join(parts)


def plan_config(config: dict, shapes: dict[str, ModelShape]) -> list[PlannedGroup]:
    """Estimate every training and evaluation job of a validated config; `shapes` by model name."""
    groups: dict[str, PlannedGroup] = {}
    for stage, wildcards in jobs(config):
        resources = resources_of(config, stage)
        settings = resolve_for_plan(stage, settings_of(config, stage, wildcards), resources)
        estimate = estimate_job(stage, settings, shapes[wildcards["model"]], resources)
        key = json.dumps([stage, wildcards["model"], estimate.backend,
                          {k: round(v) for k, v in estimate.parts.items()}, estimate.notes, estimate.problems])
        if key not in groups:
            fixes = [] if estimate.fits else suggestions(stage, settings, shapes[wildcards["model"]], resources)
            groups[key] = PlannedGroup(stage, estimate, resources, fixes=fixes)
        groups[key].wildcards.append(wildcards)
    return list(groups.values())


def part_names(est: Estimate) -> dict[str, str]:
    """The printed name of each part of an estimate, in the plan's order, as it is for the job's device and backend:
    `kv_cache` is vLLM's KV cache (on a GPU its share of `rollout.gpu_memory_utilization`, on the CPU
    `rollout.kv_cache_gib`), or with transformers generate (`rollout.backend: hf`) the KV cache and one decoding
    step's logits of one generate call (`hf_generate_bytes`); `overhead`, the CUDA context, is held on a GPU only."""
    return {"weights": "weights", "gradients": "gradients", "optimizer": "optimiser state (AdamW)",
            "reference": "reference model", "compute_copy": "compute copy of weights",
            "activations_full": "activations, no checkpointing", "activations_ckpt": "activations, checkpointing",
            "logits": "log-prob logits (largest pass)", "vllm_weights": "vLLM weights",
            "vllm_workspace": "vLLM activations and sampler",
            "kv_cache": "vLLM KV cache" if est.backend == "vllm" else "generate's KV cache and logits",
            **({"overhead": "CUDA context and slack"} if est.device == "cuda" else {})}


def format_group(group: PlannedGroup) -> str:
    est, res = group.estimate, group.resources
    where = (f"{res.gpus} GPU(s) x {res.nodes} node(s) = {est.ranks} rank(s), {res.gpu_mem_gb:g} GiB per GPU"
             if est.device == "cuda" else "CPU (host memory, not checked)")
    lines = [f"{group.stage}  {group.label}  ({len(group.wildcards)} job{'s' * (len(group.wildcards) > 1)})",
             *textwrap.wrap("; ".join([f"on {where}", *est.notes]), 116, initial_indent="  ",
                            subsequent_indent="    ")]
    used = "activations_ckpt" if est.parts.get("activations") == est.parts.get("activations_ckpt") else \
        "activations_full"
    unit, scale = ("GiB", GIB) if est.total >= GIB else ("MiB", MIB)
    names = part_names(est)
    for key, name in names.items():
        value = est.parts.get(key, 0.0)
        if value or key.startswith("activations") and est.stage == "train":
            mark = "  <- used" if key == used and est.stage == "train" else ""
            lines.append(f"  {name:<34}{value / scale:>9.2f} {unit}{mark}")
    if est.phases:
        # the parts held, by name without its parenthesis ("optimiser state (AdamW)": "optimiser state")
        held = ", ".join(names[key].split(" (")[0] for key in STATIC_PARTS if est.parts.get(key))
        lines.append(f"  {'held throughout':<34}{est.static / scale:>9.2f} {unit}  ({held})")
        lines.append("  " + "; ".join(f"{name} +{value / scale:.2f}" for name, value in est.phases.items())
                     + f" {unit}")
    verdict = ("fits" if est.fits else "DOES NOT FIT") if est.device == "cuda" else "not checked"
    limit = f" of {est.limit / scale:.0f}" if est.limit else ""
    lines.append(f"  {'peak per device':<34}{est.total / scale:>9.2f} {unit}{limit}: {verdict}")
    lines.extend(f"  -> {fix}" for fix in group.fixes)
    return "\n".join(lines)


def shapes_of(config: dict, config_dirs: dict[str, str | Path]) -> dict[str, ModelShape]:
    """Each model's shape, from `config_dirs[name]` (--model-config) where given; a name the config does not have,
    or a config.json that cannot be read (no network, no hub cache), is a ConfigError naming the model."""
    if unknown := sorted(set(config_dirs) - set(config["models"])):
        raise ConfigError(f"--model-config {', '.join(unknown)}: not in the config's models "
                          f"(known: {', '.join(sorted(config['models']))})")
    shapes = {}
    for name, entry in config["models"].items():
        try:
            transformers_config = model_config(entry, config_dirs.get(name))
        except OSError as err:
            raise ConfigError(f"models.{name}: its config.json cannot be read ({str(err).splitlines()[0]}); to plan "
                              f"offline, pass --model-config {name}=DIR, a directory holding it") from None
        shapes[name] = model_shape(transformers_config, entry["dtype"] if entry["source"] != "tiny" else "float32")
    return shapes


def run_plan(paths: list[str | Path], overrides: list[str], config_dirs: dict[str, str | Path]) -> list[PlannedGroup]:
    """`kalmanrl plan`: print every job's estimate; raise MemoryPlanError naming each job that does not fit."""
    config = load_configs(paths, overrides)
    groups = plan_config(config, shapes_of(config, config_dirs))
    print("\n\n".join(format_group(group) for group in groups))
    refused = [refusal(g.stage, g.label, g.estimate, g.fixes) for g in groups if not g.estimate.fits]
    if refused:
        raise MemoryPlanError(f"{len(refused)} job group(s) do not fit:\n  " + "\n  ".join(refused))
    return groups


def check_fits(stage: str, settings: dict, model_dir: str | Path) -> Estimate:
    """Refuse (MemoryPlanError) a train or evaluate job that cannot fit its GPUs, before any weights are loaded.

    The shape comes from `model_dir`'s config.json; GPUs, nodes and per-GPU memory from `settings["resources"]`
    when the workflow passes them, else from what this process sees (torchrun's WORLD_SIZE, the device's memory). On
    a machine without CUDA the job runs on the CPU: the estimate is logged, nothing is refused."""
    from transformers import AutoConfig

    model = settings.get("model", {})
    shape = model_shape(AutoConfig.from_pretrained(model_dir), model.get("dtype"))
    given = settings.get("resources") or {}
    if not torch.cuda.is_available():
        resources = Resources(gpus=0)
    else:
        ranks = int(os.environ.get("WORLD_SIZE", 1))
        memory = torch.cuda.get_device_properties(0).total_memory / GIB
        resources = Resources(gpus=given.get("gpus") or ranks, nodes=given.get("nodes", 1),
                              gpu_mem_gb=given.get("gpu_mem_gb") or memory)
    resolved = resolve_for_plan(stage, settings, resources)
    estimate = estimate_job(stage, resolved, shape, resources)
    log.info("memory plan (%s, %s): %.2f GiB per device", stage, estimate.device, estimate.total / GIB)
    if not estimate.fits:
        label = " ".join(f"{k}={v}" for k, v in settings.get("ident", {}).items())
        raise MemoryPlanError(refusal(stage, label, estimate, suggestions(stage, resolved, shape, resources)))
    return estimate
