"""The scalar random-walk Kalman filter as a fixed linear recurrence (docs/algorithms.md, "Computing the
filter fast: a fixed linear recurrence"); KRPO filters the rewards of a group with it, KPO the token log-ratios
of a sequence.

Model: x_t = x_{t-1} + w (var q), z_t = x_t + v (var r). With constant q and r the gains K_t do not depend on the
observations, so the filtered means are a fixed linear map of z:

    xhat_t = (1 - K_t) xhat_{t-1} + K_t z_t  =  x0 prod_{j<=t} (1 - K_j) + sum_{i<=t} W[t, i] z_i,
    W[t, i] = K_i prod_{i<j<=t} (1 - K_j)

The gains are a cached float64 scalar loop (or, with gains="authors_float32", the KPO authors' float32 closed form,
which the paper recipe follows; see `_authors_float32_gains`). The means take one of two exact paths, both O(T) memory:
- rescaled cumulative sum, xhat_t = D_t (x0 + cumsum_i (K_i / D_i) z_i) with D_t = prod_{j<=t} (1 - K_j), when
  the whole decay fits the dtype (-log D_T <= RESCALE_RANGE): the case of KPO's small q/r (about 3 for q=1e-6, r=1,
  T=4096) and the fast path. (The authors' code uses this form unguarded, clamping D; for long T or large q/r D
  underflows and 1/D overflows, which is why it is guarded here.)
- otherwise a chunked scan: inside blocks of BLOCK tokens a small triangular matrix product, across blocks a second
  one over the block-end states. Every weight is exp of a sum of log(1 - K) <= 0, so nothing overflows for any q, r
  or length, and memory is O(T * BLOCK) instead of the O(T^2) of one dense W.

Masked positions are skipped, not treated as observations: the n-th valid token of a row uses gain K_n whatever the
padding before it, so a row filters exactly like its valid tokens packed to the left (and a prompt before the
response does not count as time). Their output is 0.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import numpy as np
import torch

from kalmanrl.runtime import vendor_neutral

BLOCK = 64  # tokens per block of the chunked scan: B*T*BLOCK multiply-adds inside blocks, B*(T/BLOCK)^2 across
# Largest -log D_T for the rescaled path: 1/D_T <= e^range leaves |z| up to ~1e25 (float32) / ~1e178 (float64) before
# (K/D) z could overflow.
RESCALE_RANGE = {torch.float32: 30.0, torch.float64: 300.0}
GAINS = ("exact", "authors_float32")  # the float64 recursion; the KPO authors' float32 closed form


@functools.lru_cache(maxsize=128)
def _gains(q: float, r: float, p0: float, steps: int, formula: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """K_1..K_T, P_1..P_T and log(1 - K_t) in float64 (read-only: shared by every caller through the cache), the gains
    by `formula` (GAINS)."""
    if formula == "authors_float32":
        gains = _authors_float32_gains(q, r, p0, steps)
        # P_t = r K_t, the authors' variance; 1 - K_t is exact in float64 for a float32 K_t in [1e-6, 1 - 1e-6].
        variances, log_keep = r * gains, np.array([math.log(1.0 - gain) for gain in gains])
    else:
        gains, variances, log_keep = np.empty(steps), np.empty(steps), np.empty(steps)
        p = p0
        for t in range(steps):
            prior = p + q
            gains[t] = prior / (prior + r)
            keep = r / (prior + r)  # 1 - K_t without cancellation when K_t is close to 1
            p = keep * prior
            variances[t], log_keep[t] = p, math.log(keep)
    for array in (gains, variances, log_keep):
        array.flags.writeable = False
    return gains, variances, log_keep


def _authors_float32_gains(q: float, r: float, p0: float, steps: int) -> np.ndarray:
    """K_1..K_T as the KPO authors' code computes them (shuohe1995/verl-kpo, verl/trainer/ppo/core_algos.py,
    `kalman_gains_nonsteady_1d`), bit for bit on the CPU: config/paper-kpo.yaml follows the authors.

    K_t = P_t / r is the t-th step of the Moebius map k -> (k + a) / (k + a + 1), a = q / r, from k_0 = p0 / r; its
    matrix [[1, a], [1, a + 1]] has determinant 1, so its t-th power is U_{t-1} M - U_{t-2} I with
    U_n = sinh((n + 1) eta) / sinh(eta), cosh(eta) = s = 1 + a / 2 (U_{-1} = 0; U_n = n + 1 when a < 1e-12), and
    K_t = ((U_{t-1} - U_{t-2}) k_0 + a U_{t-1}) / (U_{t-1} k_0 + (a + 1) U_{t-1} - U_{t-2}) clamped to
    [1e-6, 1 - 1e-6]. In float32, as they evaluate it, s^2 - 1 keeps few digits of a: at a = 1e-6 K_t drifts 2.4%
    from the exact gain by t = 4,096. Their float32 operations in their order; log and sqrt the vendor-neutral ones
    (correctly rounded, where torch's CPU ones are MKL's), sinh torch's. Over whole blocks: torch's vector loop
    leaves a ragged end to its scalar sinh, whose last bit differs, so their K_t depends on T unless T is a multiple
    of 32; these are theirs for such T, whatever `steps` asks for."""
    a, k0 = (torch.tensor(value, dtype=torch.float32) / torch.tensor(r, dtype=torch.float32) for value in (q, p0))
    s = 1.0 + 0.5 * a
    eta = vendor_neutral.log(s + vendor_neutral.sqrt((s * s - 1.0).clamp(min=0.0)))
    t = torch.arange(-(-steps // BLOCK) * BLOCK, dtype=torch.float32) + 1.0
    u = t if a.abs() < 1e-12 else torch.sinh(t * eta) / torch.sinh(eta).clamp(min=1e-20)  # U_{t-1}
    u_before = torch.cat([u.new_zeros(1), u[:-1]])  # U_{t-2}
    gain = (((u - u_before) * k0 + u * a) / (u * k0 + (u * (a + 1.0) - u_before))).clamp(1e-6, 1.0 - 1e-6)[:steps]
    if not gain.isfinite().all():  # theirs are NaN there too: refused rather than filtering into NaN
        raise ValueError(f"the authors' float32 gains overflow (sinh(t eta) beyond float32) from token "
                         f"{gain.isfinite().logical_not().nonzero()[0].item() + 1} at q / r = {q / r}: use gains exact")
    return gain.double().numpy()


def _check(q: float, r: float, p0: float, gains: str) -> tuple[float, float, float]:
    q, r, p0 = float(q), float(r), float(p0)
    if not (math.isfinite(q) and q >= 0 and math.isfinite(r) and r > 0 and math.isfinite(p0) and p0 >= 0):
        raise ValueError(f"Kalman filter needs finite q >= 0, r > 0, p0 >= 0; got q={q}, r={r}, p0={p0}")
    if gains not in GAINS:
        raise ValueError(f"unknown Kalman gains {gains!r}; known: {', '.join(GAINS)}")
    return q, r, p0


def kalman_gains(q: float, r: float, p0: float, steps: int,
                 gains: str = "exact") -> tuple[torch.Tensor, torch.Tensor]:
    """Gains K_1..K_T and posterior variances P_1..P_T ([steps] float64 each) of the filter started at variance p0:
    P_prior = P + q; K = P_prior / (P_prior + r); P = (1 - K) P_prior. gains="authors_float32": the KPO authors'
    float32 evaluation of the same K (P = r K)."""
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    gains, variances, _ = _gains(*_check(q, r, p0, gains), int(steps), gains)
    return torch.tensor(gains), torch.tensor(variances)


class _BlockScan(NamedTuple):
    """The filter's linear map for `blocks` blocks of BLOCK tokens (the first k blocks' map is its [:k] slice)."""

    local: torch.Tensor    # [blocks, BLOCK, BLOCK]  W restricted to each diagonal block (lower triangular)
    carry: torch.Tensor    # [blocks, blocks]        decay between block ends (lower triangular)
    enter: torch.Tensor    # [blocks, BLOCK]         decay from the previous block's end to each token
    initial: torch.Tensor  # [blocks]                decay from x0 to each block end


def _decay(log_to: torch.Tensor, log_from: torch.Tensor) -> torch.Tensor:
    """exp(log_to[..., :, None] - log_from[..., None, :]) below and on the diagonal, 0 above (never exp of > 0)."""
    diff = log_to.unsqueeze(-1) - log_from.unsqueeze(-2)
    upper = torch.ones(diff.shape[-2:], dtype=torch.bool).triu(1)
    return vendor_neutral.exp(diff.masked_fill(upper, -math.inf))


@functools.lru_cache(maxsize=32)
def _block_scan(q: float, r: float, p0: float, formula: str, blocks: int, dtype: torch.dtype,
                device: torch.device) -> _BlockScan:
    gains, _, log_keep = _gains(q, r, p0, blocks * BLOCK, formula)
    cum = torch.from_numpy(np.cumsum(log_keep)).view(blocks, BLOCK)  # log prod_{j<=t} (1 - K_j)
    ends = cum[:, -1]
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    local = _decay(cum, cum) * torch.tensor(gains).view(blocks, 1, BLOCK)
    scan = _BlockScan(local, _decay(ends, ends), vendor_neutral.exp(cum - starts[:, None]), vendor_neutral.exp(ends))
    return _BlockScan(*(x.to(dtype=dtype, device=device) for x in scan))


@functools.lru_cache(maxsize=32)
def _rescaled(q: float, r: float, p0: float, formula: str, steps: int, dtype: torch.dtype,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """D_t and K_t / D_t ([steps] each) for the rescaled cumulative sum, or None when D_T is out of range (then
    it is also out of range for every longer T)."""
    gains, _, log_keep = _gains(q, r, p0, steps, formula)
    cum = torch.from_numpy(np.cumsum(log_keep))
    if -cum[-1] > RESCALE_RANGE[dtype]:
        return None
    return (vendor_neutral.exp(cum).to(dtype=dtype, device=device),
            (torch.tensor(gains) * vendor_neutral.exp(-cum)).to(dtype=dtype, device=device))


def _scan(z: torch.Tensor, q: float, r: float, p0: float, gains: str, x0: float,
          valid: torch.Tensor | None = None) -> torch.Tensor:
    """Filtered means of every row of z [B, T], computed in z's dtype (z is left as it is). `valid` [B, T] bool:
    each row's observations, all before its skipped positions (right padding). The outputs at skipped positions
    are left for the caller to zero: causally they only depend on the tokens before them, and they are finite
    wherever z is. One new tensor, the rest in place (at B x T = 64 x 4096 a fresh tensor costs as much as the
    arithmetic)."""
    rows, steps = z.shape
    capacity = max(BLOCK, 1 << (steps - 1).bit_length())  # tables cached per power of two: T changes every batch
    if (rescaled := _rescaled(q, r, p0, gains, capacity, z.dtype, z.device)) is not None:
        decay, weight = rescaled
        out = torch.mul(z, weight[:steps]).cumsum_(-1)
        if x0:
            out.add_(x0)
        return out.mul_(decay[:steps])
    # Every block product reads every position of its block: skipped positions must be 0 first.
    return _chunked_scan(z if valid is None else z.masked_fill(~valid, 0.0), q, r, p0, gains, x0, capacity)


def _zero_skipped(out: torch.Tensor, mask: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """`out` with 0 at the skipped positions, in place. A floating 0/1 mask multiplies, a seventh of masked_fill's
    time on the CPU; exact where out is finite (x * 1 = x, x * 0 = 0), so a non-finite sum falls back to the fill."""
    if mask.is_floating_point():
        out.mul_(mask)
        if torch.isfinite(out.sum()):
            return out
    return out.masked_fill_(~valid, 0.0)


def _chunked_scan(z: torch.Tensor, q: float, r: float, p0: float, gains: str, x0: float,
                  capacity: int) -> torch.Tensor:
    """`_scan` by blocks (any q, r, length); `capacity`: the power of two the tables are cached for."""
    rows, steps = z.shape
    blocks = -(-steps // BLOCK)
    scan = _block_scan(q, r, p0, gains, capacity // BLOCK, z.dtype, z.device)
    scan = _BlockScan(scan.local[:blocks], scan.carry[:blocks, :blocks], scan.enter[:blocks], scan.initial[:blocks])
    chunks = torch.nn.functional.pad(z, (0, blocks * BLOCK - steps)).reshape(rows, blocks, BLOCK)
    inside = torch.einsum("bki,kti->bkt", chunks, scan.local)  # each block filtered from state 0
    ends = inside[:, :, -1] @ scan.carry.T + x0 * scan.initial  # [B, blocks] exact state at each block end
    entering = torch.cat([ends.new_full((rows, 1), x0), ends[:, :-1]], dim=1)
    return (inside + scan.enter * entering.unsqueeze(-1)).reshape(rows, -1)[:, :steps]


def kalman_filter(z: torch.Tensor, mask: torch.Tensor | None = None, *, q: float, r: float, x0: float = 0.0,
                  p0: float = 1.0, gains: str = "exact") -> torch.Tensor:
    """Causal filtered means xhat [..., T] of observations z [..., T], one independent filter per leading index.

    mask [..., T] (bool or 0/1): masked positions are skipped (state carried over, gain index not advanced) and
    output 0; their z is never read, so it may be anything. Runs in z's dtype (float32 or float64; lower precisions
    in float32) with no Python loop over rows or tokens; not differentiable (filter z.detach()). gains: "exact" (the
    float64 recursion) or "authors_float32" (`_authors_float32_gains`).
    """
    q, r, p0 = _check(q, r, p0, gains)
    shape = z.shape
    dtype = z.dtype if z.dtype in (torch.float32, torch.float64) else torch.float32
    flat = z.detach().reshape(-1, shape[-1]).to(dtype)
    if flat.numel() == 0:
        return torch.zeros(shape, dtype=z.dtype, device=z.device)
    if mask is None:
        return _scan(flat, q, r, p0, gains, float(x0)).view(shape).to(z.dtype)
    if mask.shape != shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} differs from z shape {tuple(shape)}")
    mask = mask.reshape(flat.shape)
    valid = mask.bool()  # nonzero (NaN included) = an observation
    # Right padding only (no skipped position before an observation): rows are already left-packed. A rise in
    # valid's int8 view is a skipped position followed by an observation.
    if valid.shape[-1] < 2 or torch.diff(valid.view(torch.int8)).max() <= 0:
        out = _zero_skipped(_scan(flat, q, r, p0, gains, float(x0), valid), mask, valid)
        return out.view(shape).to(z.dtype)
    rank = valid.cumsum(-1) - 1  # position of each valid token among its row's valid tokens
    packed = flat.new_zeros(flat.shape[0], flat.shape[1] + 1)
    packed.scatter_(-1, torch.where(valid, rank, flat.shape[1]), flat)  # masked tokens go to a spare column
    # causal: the zeros after a row's tokens cannot leak back
    filtered = _scan(packed[:, :-1], q, r, p0, gains, float(x0))
    return _zero_skipped(filtered.gather(-1, rank.clamp(min=0)), mask, valid).view(shape).to(z.dtype)
