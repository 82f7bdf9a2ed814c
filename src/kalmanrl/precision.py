"""One precision policy for every pass that produces log-probs (old, reference, new): the same weights dtype and
the same autocast context for all three, so the ratio is exactly 1 before any update and clipping, KL and the token
noise diagnostic measure the policy's change rather than rounding. Logits leave the output head as float32."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

PRECISIONS = ("auto", "float32", "autocast_bf16", "bfloat16")


@dataclass(frozen=True)
class Precision:
    """float32: float32 weights and compute; autocast_bf16: float32 master weights, bf16 matrix products (autocast);
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
