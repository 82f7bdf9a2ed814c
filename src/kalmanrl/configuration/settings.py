"""Settings resolved once. A stage job receives its settings as plain JSON (`config.stage_settings`: the Snakemake
param, hashed into checkpoints); `resolve_train` and `resolve_evaluate` turn a training or evaluation job's into
frozen, typed objects and decide, here and nowhere else, every default that depends on the run: the precision
(`auto`: by device), gradient checkpointing (null: by the model's source), the rollout backend (`auto`: by what is
installed), the engine's context (vLLM's `max_model_len` or the model's `max_position_embeddings`) and the bound
algorithm parts. The trainer, evaluation and `kalmanrl plan` read these rules and objects instead of working them out
again."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from kalmanrl.policy.lora import Lora
from kalmanrl.rl import algorithms, correction

BACKENDS = ("auto", "hf", "vllm")
PRECISIONS = ("auto", "float32", "autocast_bf16", "bfloat16")


@dataclass(frozen=True)
class Precision:
    """One precision policy for every pass that produces log-probs (old, reference, new): the same weights dtype and
    the same autocast context for all three, so the ratio is exactly 1 before any update and clipping, KL and the token
    noise diagnostic measure the policy's change rather than rounding. Logits leave the output head as float32.

    float32: float32 weights and compute; autocast_bf16: float32 master weights, bf16 matrix products (autocast);
    bfloat16: bf16 weights, gradients and optimiser state (as the KRPO authors trained)."""

    name: str
    device_type: str

    @property
    def weights_dtype(self) -> torch.dtype:
        """The trained policy's parameters, and the frozen reference's."""
        return torch.bfloat16 if self.name == "bfloat16" else torch.float32

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context every log-prob forward runs under."""
        return torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.name == "autocast_bf16")

    def generating(self, engine) -> contextlib.AbstractContextManager:
        """The context `engine.generate` runs under: `autocast` for an engine that generates with the policy module
        itself (hf), which then samples from the function that scores; none for one with its own copy of the weights
        in its own dtype (vLLM, in-process on this thread: autocast would recast its matrix products and meet its
        kernels and compiled graphs, which expect that dtype)."""
        return self.autocast() if engine.runs_policy else contextlib.nullcontext()


def resolve_precision(name: str, device_type: str) -> Precision:
    """train.precision on a device: auto = autocast_bf16 on CUDA, float32 elsewhere."""
    if name not in PRECISIONS:
        raise ValueError(f"train.precision = {name!r}; known: {', '.join(PRECISIONS)}")
    if name == "auto":
        name = "autocast_bf16" if device_type == "cuda" else "float32"
    return Precision(name, device_type)


def resolve_gradient_checkpointing(chosen: bool | None, source: str) -> bool:
    """train.gradient_checkpointing, where null means on for hub and local models and off for the tiny one."""
    return source != "tiny" if chosen is None else bool(chosen)


def resolve_backend(chosen: str, *, vllm_installed: bool) -> str:
    """rollout.backend, where auto means vllm when it is installed, else hf."""
    if chosen not in BACKENDS:
        raise ValueError(f"unknown rollout backend {chosen!r}; known: {', '.join(BACKENDS)}")
    if chosen == "auto":
        return "vllm" if vllm_installed else "hf"
    return chosen


@dataclass(frozen=True)
class OverlongBuffer:
    """algorithms.<name>.overlong_buffer: DAPO's soft penalty over the last `length` tokens before max_tokens (0:
    off)."""

    length: int
    penalty: float


@dataclass(frozen=True)
class DynamicSampling:
    """algorithms.<name>.dynamic_sampling: draw again until a step has prompts_per_step groups that vary in `metric`
    ("accuracy" or "reward")."""

    enabled: bool
    max_draws: int
    metric: str


@dataclass(frozen=True)
class Validation:
    """train.validation, with what a validating job needs beside it: each benchmark's dataset entry (template,
    reward) and the evaluate section's sampling."""

    every: int
    benchmarks: Sequence[str] | None
    max_problems: int
    k: int
    datasets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    sampling: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Train:
    """The `train` section, with `precision` and `gradient_checkpointing` resolved."""

    steps: int
    prompts_per_step: int
    group_size: int
    ppo_epochs: int
    mini_batches: int
    mini_batch_order: str
    validation: Validation
    micro_batch_tokens: int
    packing: bool
    logit_chunk_tokens: int
    precision: Precision
    gradient_checkpointing: bool
    lr: float
    weight_decay: float
    warmup_ratio: float
    schedule: str
    loss_on_eos: bool
    max_grad_norm: float
    temperature: float
    top_p: float
    max_tokens: int
    max_length: int | None
    checkpoint_every: int
    keep_every: int
    max_nonfinite: int
    loggers: Sequence[str]

    @property
    def optimizer_steps(self) -> int:
        """Optimiser steps per rollout batch."""
        return self.ppo_epochs * self.mini_batches

    def optimizer(self) -> dict[str, Any]:
        """What `kalmanrl.policy.optim` reads (its functions serve the warm start's section too)."""
        return {key: getattr(self, key) for key in ("lr", "weight_decay", "warmup_ratio", "schedule", "steps")}


@dataclass(frozen=True)
class Rollout:
    """The `rollout` section, with `backend` resolved ("hf" or "vllm")."""

    backend: str
    max_model_len: int
    gpu_memory_utilization: float
    eval_gpu_memory_utilization: float
    kv_cache_gib: float
    hf_batch_size: int
    enforce_eager: bool
    tensor_parallel_size: int
    sleep: bool
    overlong_prompts: str

    def context(self, max_position_embeddings: int | None) -> int | None:
        """The most tokens (prompt plus completion) the engine holds for a model: vLLM's `rollout.max_model_len`; for
        the hf engine the model's `max_position_embeddings` (None when the model's config gives none)."""
        return self.max_model_len if self.backend == "vllm" else max_position_embeddings

    def engine_options(self) -> dict[str, Any]:
        """The options `rollout.make_engine` passes on to the engine."""
        return {key: getattr(self, key) for key in ("max_model_len", "gpu_memory_utilization", "kv_cache_gib",
                                                    "enforce_eager", "tensor_parallel_size", "sleep",
                                                    "hf_batch_size")}


@dataclass(frozen=True)
class Algorithm:
    """An `algorithms.<name>` entry with its parts bound: the advantage estimator, the ratio transform, the loss
    aggregate (with its micro-batch share) and the rollout correction, plus the KPO filter the token-noise diagnostic
    uses for every algorithm (KPO's own parameters under KPO, the defaults otherwise)."""

    advantage: str
    advantage_params: Mapping[str, Any]
    ratio: str
    ratio_params: Mapping[str, Any]
    surrogate: str
    aggregate: str
    eps_low: float
    eps_high: float
    clip: bool
    clip_ratio_c: float | None
    beta: float
    overlong_buffer: OverlongBuffer
    dynamic_sampling: DynamicSampling
    rollout_correction: Mapping[str, Any]
    estimator: algorithms.AdvantageEstimator = field(repr=False, compare=False)
    ratio_transform: algorithms.RatioTransform = field(repr=False, compare=False)
    aggregation: algorithms.Aggregate = field(repr=False, compare=False)
    correction: correction.Correction = field(repr=False, compare=False)
    noise_filter: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Sft:
    """The `sft` section: the supervised warm start."""

    steps: int
    batch_size: int
    lr: float
    weight_decay: float
    warmup_steps: int
    schedule: str
    max_length: int
    max_grad_norm: float
    log_every: int
    precision: str  # as written (auto resolves on the job's device: `resolved_precision`)

    def optimizer(self) -> dict[str, Any]:
        """What `kalmanrl.policy.optim.make_optimizer` reads."""
        return {key: getattr(self, key) for key in ("lr", "weight_decay", "warmup_steps", "schedule")}

    def resolved_precision(self, device_type: str) -> Precision:
        """sft.precision on the job's device, as train.precision resolves."""
        return resolve_precision(self.precision, device_type)


@dataclass(frozen=True)
class Evaluate:
    """The `evaluate` section."""

    k: int
    pass_k: Sequence[int]
    extra_metrics: Sequence[str]
    temperature: float
    top_p: float
    max_tokens: int
    max_length: int | None
    max_problems: int
    batch_size: int
    seed: int


@dataclass(frozen=True)
class EvaluateSettings:
    """Everything an evaluation job reads, resolved. `raw` is the job's settings as given (what its summary hashes)."""

    evaluate: Evaluate
    rollout: Rollout
    ident: Mapping[str, Any]
    model_dtype: str
    template: str
    chat_template_kwargs: Mapping[str, Any]
    add_special_tokens: bool
    reward: str
    reward_params: Mapping[str, Any]
    raw: Mapping[str, Any] = field(repr=False)


@dataclass(frozen=True)
class TrainSettings:
    """Everything a training job reads, resolved. `raw` is the job's settings as given (what checkpoints hash)."""

    train: Train
    algorithm: Algorithm
    rollout: Rollout
    ident: Mapping[str, Any]
    model_source: str
    model_dtype: str  # the model's configured dtype: what checkpoints, the final policy and vLLM use
    lora: Lora | None  # models.<name>.lora: adapters trained instead of the weights (None: full fine-tuning)
    template: str
    chat_template_kwargs: Mapping[str, Any]
    add_special_tokens: bool
    reward: str
    reward_params: Mapping[str, Any]
    raw: Mapping[str, Any] = field(repr=False)

    @property
    def seed(self) -> int:
        return self.ident["seed"]

    @property
    def lora_key(self) -> str:
        return f"models.{self.ident['model']}.lora"

    def with_train(self, **changes: Any) -> TrainSettings:
        """A copy with some train settings changed (a benchmark sweeping a budget, a test forcing a precision)."""
        return dataclasses.replace(self, train=dataclasses.replace(self.train, **changes))


def resolve_train(settings: Mapping[str, Any], device_type: str, *, vllm_installed: bool | None = None
                  ) -> TrainSettings:
    """A training job's settings (`config.stage_settings(config, "train", ...)`) resolved for a device ("cuda",
    "cpu"). `vllm_installed` (default: whether vllm imports here) decides `rollout.backend: auto`."""
    section, model = dict(settings["train"]), settings["model"]
    train = Train(**{**section, "precision": resolve_precision(section["precision"], device_type),
                     "gradient_checkpointing": resolve_gradient_checkpointing(section["gradient_checkpointing"],
                                                                              model["source"]),
                     "validation": resolve_validation(section["validation"], settings.get("validation"))})
    algorithms.check_algorithm(dict(settings["algorithm"]), train.optimizer_steps)
    # rollout.tensor_parallel_size is for evaluation (README, schema): training pushes new weights into an
    # in-process vLLM engine per rank, so its engine always spans one GPU. The rollout section is the config's one,
    # shared with evaluation, so a training job refusing it made the setting unusable in any workflow.
    rollout = resolve_rollout({**settings["rollout"], "tensor_parallel_size": 1}, vllm_installed=vllm_installed)
    task = settings["task"]
    return TrainSettings(train=train, algorithm=bind_algorithm(settings["algorithm"]), rollout=rollout,
                         ident=settings["ident"], model_source=model["source"], model_dtype=model["dtype"],
                         lora=Lora(**model["lora"]) if model.get("lora") is not None else None,
                         template=task["template"], chat_template_kwargs=task["chat_template_kwargs"],
                         add_special_tokens=task["add_special_tokens"],
                         reward=task["reward"], reward_params=task["reward_params"], raw=settings)


def resolve_validation(section: Mapping[str, Any], given: Mapping[str, Any] | None) -> Validation:
    """train.validation with the benchmarks' dataset entries and the sampling a job's settings carry beside it
    (`config.stage_settings` adds them when validation is on)."""
    if not section["every"]:
        return Validation(**section)
    if not given or not given.get("datasets"):
        raise ValueError(f"train.validation.every = {section['every']} but the job's settings carry no validation "
                         "datasets (`kalmanrl settings train ...` prints what a job gets)")
    return Validation(**section, datasets=given["datasets"], sampling=given["sampling"])


def resolve_evaluate(settings: Mapping[str, Any], *, vllm_installed: bool | None = None) -> EvaluateSettings:
    """An evaluation job's settings (`config.stage_settings(config, "evaluate", ...)`) resolved; `vllm_installed`
    (default: whether vllm imports here) decides `rollout.backend: auto`."""
    benchmark = settings["benchmark"]
    return EvaluateSettings(evaluate=Evaluate(**settings["evaluate"]),
                            rollout=resolve_rollout(settings["rollout"], vllm_installed=vllm_installed),
                            ident=settings["ident"], model_dtype=settings["model"]["dtype"],
                            template=benchmark["template"], chat_template_kwargs=benchmark["chat_template_kwargs"],
                            add_special_tokens=benchmark["add_special_tokens"],
                            reward=benchmark["reward"], reward_params=benchmark["reward_params"], raw=settings)


def config_train_settings(config: Mapping[str, Any], device_type: str = "cpu", *, algorithm: str | None = None,
                          seed: int = 0, vllm_installed: bool = False) -> TrainSettings:
    """The resolved training settings of a validated config's first model and task (and first algorithm unless one
    is named): for benchmarks and tests that drive the update functions without a workflow job."""
    from kalmanrl.configuration.config import stage_settings

    chosen = algorithm or next(iter(config["algorithms"]))
    raw = stage_settings(config, "train", model=next(iter(config["models"])), task=config["tasks"][0],
                         algorithm=chosen, seed=str(seed))
    return resolve_train(raw, device_type, vllm_installed=vllm_installed)


def resolve_rollout(section: Mapping[str, Any], *, vllm_installed: bool | None = None) -> Rollout:
    """The `rollout` section with its backend resolved (`auto`: by `vllm_installed`, default whether vllm imports
    here)."""
    if vllm_installed is None:
        from kalmanrl.policy.rollout import vllm_available

        vllm_installed = vllm_available()
    return Rollout(**{**section, "backend": resolve_backend(section["backend"], vllm_installed=vllm_installed)})


def bind_algorithm(section: Mapping[str, Any]) -> Algorithm:
    """An algorithm entry with its estimator, ratio transform and aggregate looked up and bound."""
    noise_filter = ({k: v for k, v in section["ratio_params"].items() if k != "clamp"} if section["ratio"] == "kpo"
                    else {})
    return Algorithm(**{**section, "overlong_buffer": OverlongBuffer(**section["overlong_buffer"]),
                        "dynamic_sampling": DynamicSampling(**section["dynamic_sampling"])},
                     estimator=algorithms.get_advantage_estimator(section["advantage"], **section["advantage_params"]),
                     ratio_transform=algorithms.get_ratio_transform(section["ratio"], **section["ratio_params"]),
                     aggregation=algorithms.AGGREGATES.get(section["aggregate"]),
                     correction=correction.get_rollout_correction(section["rollout_correction"]["name"],
                                                                  **section["rollout_correction"]["params"]),
                     noise_filter=noise_filter)


def as_dict(settings: TrainSettings) -> dict[str, Any]:
    """The resolved settings as JSON-ready values (`kalmanrl settings --resolved`): bound functions left out."""
    bound = {"estimator", "ratio_transform", "aggregation", "correction", "raw"}
    out = {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings) if f.name not in bound}
    for name in ("train", "algorithm", "rollout"):
        part = out[name]
        out[name] = {f.name: dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
                     for f in dataclasses.fields(part) if f.name not in bound for value in [getattr(part, f.name)]}
    out["train"]["precision"] = settings.train.precision.name
    return out
