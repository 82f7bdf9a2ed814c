"""exp, log, sqrt, cos and sin whose CPU results are the same bits on every x86-64 CPU, Intel or AMD.

torch's CPU build sends `exp`, `log`, `sqrt`, `cos`, `sin` (and `tanh`, `erf`, `log2`, ...) of contiguous float
tensors to MKL's vector-math library (VML, `at::vml` in ATen). No dispatch variable reaches it: `MKL_CBWR` and
`MKL_ENABLE_INSTRUCTIONS` leave its results unchanged (an AMD EPYC, 2026-12-05), MKL picks its code by the CPU's
vendor and instruction set, and its results are not correctly rounded (`torch.sqrt` differs from the IEEE square root
in one float32 result in five there: benchmarks/bench_vml.py). So nothing makes an AMD and an Intel machine agree
on the last bit of an AdamW step, a rotary embedding or a sampled token's Gumbel noise, whatever
`kalmanrl.runtime.cpu` pins (the smoke run's warm start on an AMD EPYC parted from an Intel Xeon's record at its
third step).

These functions reach the same values through ATen kernels that the pinned capability fixes (SLEEF's float64
`exp2` and `log1p`; `rsqrt`, the IEEE square root and a division) or through glibc (float64 `cos` and `sin`), and
round to the input's dtype: correctly rounded but for a float64 result within 2^-29 of a tie, differentiable with
the gradient formulas of torch's own functions. On any other device they are torch's functions. AdamW's square root
is kept out of VML by its fused kernel (`kalmanrl.policy.optim`), the rotary embedding's cos and sin by
`kalmanrl.policy.model`, logsumexp by a gathered log_softmax (`kalmanrl.policy.logprobs`).
`tests/test_vendor_neutral.py` checks them against correctly rounded references and that a warm-start step, an RL
step of every algorithm and sampling call none of VML's functions on the CPU.
"""

from __future__ import annotations

import math

import torch

LOG2_E = 1 / math.log(2)
LN_2 = math.log(2)


def _by_vml(x: torch.Tensor) -> bool:
    """Whether torch would send this tensor to MKL's VML (CPU floating point; VML has no bf16 or fp16 kernels)."""
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)


class _Exp(torch.autograd.Function):
    """exp(x) = 2^(x log2 e) in float64 (SLEEF's exp2), rounded to x's dtype; gradient grad * exp(x) as torch.exp's."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        result = torch.exp2(x.double() * LOG2_E).to(x.dtype)
        ctx.save_for_backward(result)
        return result

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (result,) = ctx.saved_tensors
        return grad * result


class _Log(torch.autograd.Function):
    """log(x) = log1p(m - 1) + e ln 2 for x = m 2^e with m in [0.5, 1) (m - 1 is exact), in float64 (SLEEF's log1p),
    rounded to x's dtype; 0 -> -inf, negative -> NaN, as torch.log. Gradient grad / x as torch.log's."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        mantissa, exponent = torch.frexp(x.double())
        result = (torch.log1p(mantissa - 1) + exponent.double() * LN_2).to(x.dtype)
        ctx.save_for_backward(x)
        return result

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad / x


class _Sqrt(torch.autograd.Function):
    """sqrt(x) = 1 / rsqrt(x) in float64 (ATen's rsqrt is the IEEE square root and a division; `x ** 0.5` goes to
    VML too), rounded to x's dtype; gradient grad / (2 sqrt(x)) as torch.sqrt's."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        result = torch.rsqrt(x.double()).reciprocal().to(x.dtype)
        ctx.save_for_backward(result)
        return result

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (result,) = ctx.saved_tensors
        return grad / (2 * result)


def exp(x: torch.Tensor) -> torch.Tensor:
    return _Exp.apply(x) if _by_vml(x) else x.exp()


def log(x: torch.Tensor) -> torch.Tensor:
    return _Log.apply(x) if _by_vml(x) else x.log()


def sqrt(x: torch.Tensor) -> torch.Tensor:
    return _Sqrt.apply(x) if _by_vml(x) else x.sqrt()


def cos_sin(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos(x) and sin(x), without gradient (rotary embeddings need none): on the CPU through glibc's float64 cos and
    sin (`torch.polar`, one scalar call per element), rounded to x's dtype."""
    if not _by_vml(x):
        return x.cos(), x.sin()
    unit = torch.polar(torch.ones_like(x, dtype=torch.float64), x.detach().double())
    return unit.real.to(x.dtype), unit.imag.to(x.dtype)
