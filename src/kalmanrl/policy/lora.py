"""LoRA through peft: low-rank adapters injected into the policy in place (`peft.inject_adapter_in_model`), so the
policy stays the transformers model it was (FSDP2 shards its decoder layers, the hf engine generates with it, the
log-prob head runs its decoder) while only the adapters train and the base weights stay frozen, bit for bit.

What leaves training is merged, W + scale * B A under the base model's parameter names: the weights pushed into vLLM,
the final policy and kept checkpoints' model/ (a plain model that evaluation loads as any other). The frozen
reference (beta > 0) is the policy itself with its adapters disabled: no second copy of the base. peft is imported
when adapters are made or looked for, not with the settings that name them."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from kalmanrl.runtime.distributed import full_parameters

ADAPTER = "default"


@dataclass(frozen=True)
class Lora:
    """models.<name>.lora: the adapters' rank, scale numerator (scale = alpha / r), dropout and the modules they
    wrap (names or name suffixes, as peft matches them)."""

    r: int
    alpha: float
    dropout: float
    target_modules: Sequence[str]

    def config(self):
        from peft import LoraConfig

        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=list(self.target_modules), bias="none")


def add_adapters(model: torch.nn.Module, lora: Lora, *, key: str) -> torch.nn.Module:
    """Inject `lora`'s adapters into `model` in place and freeze everything else; the adapters' A is drawn from the
    global RNG (seeded runs get the same adapters), B is 0, so the policy starts as the base. Refuses target modules
    that match nothing or that could not be merged back into a plain model (`key`: the config key, for errors)."""
    from peft import inject_adapter_in_model
    from peft.tuners.lora import Linear

    try:
        inject_adapter_in_model(lora.config(), model, adapter_name=ADAPTER)
    except ValueError as err:
        raise ValueError(f"{key}.target_modules = {list(lora.target_modules)}: {err}") from None
    layers = adapter_layers(model)
    embeddings = model.get_input_embeddings().weight
    unmergeable = [name for name, layer in layers.items()
                   if not isinstance(layer, Linear) or layer.base_layer.weight is embeddings]
    if unmergeable:
        raise ValueError(f"{key}.target_modules = {list(lora.target_modules)} wraps {unmergeable}: only linear layers "
                         "that share no weight with the embeddings (a tied output head does) can be merged back")
    return model


def adapter_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The modules peft wrapped, by name (none for a model without adapters). Without peft imported no model can
    hold its layers: plain runs never import it."""
    tuners = sys.modules.get("peft.tuners.tuners_utils")
    if tuners is None:
        return {}
    return {name: module for name, module in model.named_modules() if isinstance(module, tuners.BaseTunerLayer)}


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """What the optimiser steps: every parameter of a plain model, only the adapters of one with adapters."""
    return [parameter for parameter in model.parameters() if parameter.requires_grad]


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module) -> Iterator[None]:
    """The base model inside (peft's `disable_adapter()`, for a model with injected adapters): the reference of a
    LoRA run. A model without adapters is left as it is."""
    layers = list(adapter_layers(model).values())
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def merged_parameters(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(base model's name, full tensor) of every state-dict entry, adapters merged into their base weight as peft's
    `merge_and_unload` would (W + scale * B A) and left out themselves; a model without adapters streams its
    `full_parameters` as they are. Gathered one tensor at a time from a sharded model (every rank must exhaust the
    iterator); the model itself is not changed."""
    layers = adapter_layers(model)
    pending: dict[str, dict[str, torch.Tensor]] = {}  # a wrapped layer's base tensors until its A and B have come
    for name, tensor in full_parameters(model):
        layer, adapter_part, leaf = _split(name, layers)
        if layer is None:
            yield name, tensor
            continue
        parts = pending.setdefault(layer, {})
        parts[adapter_part or leaf] = tensor
        if {"lora_A", "lora_B"} <= parts.keys():  # peft registers them after the base layer: the layer is complete
            del pending[layer]
            a, b = parts.pop("lora_A"), parts.pop("lora_B")
            for entry, value in parts.items():
                if entry == "weight":
                    value = value + _delta(layers[layer], a, b, value)
                yield f"{layer}.{entry}", value
    if pending:
        raise RuntimeError(f"adapters without both their A and B weights in the state dict: {sorted(pending)}")


def _split(name: str, layers: dict[str, torch.nn.Module]) -> tuple[str | None, str | None, str]:
    """(wrapped layer, "lora_A" / "lora_B" or None, the base tensor's own name) of a state-dict entry; (None, None,
    name) outside every wrapped layer."""
    head, _, leaf = name.partition(".base_layer.")
    if leaf and head in layers:
        return head, None, leaf
    for part in ("lora_A", "lora_B"):
        head, _, leaf = name.partition(f".{part}.{ADAPTER}.")
        if leaf and head in layers:
            return head, part, leaf
    return None, None, name


def _delta(layer: torch.nn.Module, a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """scale * B A in the weight's dtype, as peft's `get_delta_weight` computes it (for half-precision weights in
    float32, rounded once, as peft does on the CPU; transposed for a layer that stores its weight [in, out], as
    GPT-2's Conv1D does: peft's `fan_in_fan_out`)."""
    product = b.float() @ a.float() if weight.dtype in (torch.float16, torch.bfloat16) else b @ a
    if getattr(layer, "fan_in_fan_out", False):
        product = product.T
    return (product * layer.scaling[ADAPTER]).to(weight.dtype)
