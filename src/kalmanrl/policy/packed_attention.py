"""Attention for packed sequences without a [tokens, tokens] mask: SDPA row by row.

transformers turns position ids that restart inside one sequence into a block-diagonal mask for SDPA, and SDPA with
a mask computes every block of it: on the CPU a packed micro-batch of N tokens then costs N^2 in attention, which made
packing five times slower than padding there (benchmarks/README.md). FlashAttention's variable-length path has no
such cost, and transformers uses it on its own. For every other implementation `packed_attention` registers
"kalmanrl_packed": it asks for no mask when there is no padding mask (a packed batch has none) and runs causal SDPA on
each row's span of a packed sequence (the spans are where the position ids restart, as transformers finds them),
the spans of one length in one call; every other call (padded batches, generation with a cache) is transformers' SDPA
unchanged. Finding the spans reads the position ids on the host (a device sync on a GPU), so it is done once per
packed sequence: every layer, and a checkpointed layer's recompute, gets the same position ids tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import torch
from torch.utils.weak import WeakIdKeyDictionary
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "kalmanrl_packed"


def _mask(*, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor | None:
    """No mask without a padding mask (the attention below is causal per row); SDPA's otherwise."""
    return None if attention_mask is None else sdpa_mask(attention_mask=attention_mask, **kwargs)


@dataclass(frozen=True)
class _Spans:
    """Where a packed sequence's rows are: `lengths` (span length -> the rows of that length, as counts), and `order`
    [N], the token indices in length order (the spans of a length consecutive), with its inverse `back`."""
    lengths: dict[int, int]
    order: torch.Tensor
    back: torch.Tensor


_SPANS: WeakIdKeyDictionary = WeakIdKeyDictionary()  # position ids tensor -> its _Spans, while the tensor lives


def _find_spans(position_ids: torch.Tensor) -> _Spans | None:
    """The rows of a packed sequence (None for one row): spans start where the position ids do not go up by one."""
    positions = position_ids.reshape(-1)
    starts = [0, *((positions[1:] - positions[:-1]) != 1).nonzero().flatten().add(1).tolist(), len(positions)]
    if len(starts) == 2:
        return None
    by_length: dict[int, list[int]] = {}
    for a, b in pairwise(starts):
        by_length.setdefault(b - a, []).append(a)
    order = torch.cat([(torch.tensor(firsts)[:, None] + torch.arange(length)).flatten()
                       for length, firsts in by_length.items()]).to(positions.device)
    return _Spans({length: len(firsts) for length, firsts in by_length.items()}, order, order.argsort())


def _spans(position_ids: torch.Tensor) -> _Spans | None:
    if position_ids not in _SPANS:
        _SPANS[position_ids] = _find_spans(position_ids)
    return _SPANS[position_ids]


def _attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, *, position_ids: torch.Tensor | None = None, **kwargs
               ) -> tuple[torch.Tensor, None]:
    """query [1, heads, N, d] of a packed sequence: causal SDPA on each row's span, one call per span length (the
    spans of a length stacked as a batch, which SDPA computes row by row alike); anything else: SDPA."""
    if attention_mask is not None or position_ids is None or query.shape[0] != 1 or query.shape[2] < 2:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    spans = _spans(position_ids)
    if spans is None:
        return sdpa_attention_forward(module, query, key, value, None, **kwargs)
    kwargs.pop("is_causal", None)
    # One gather into length order and one back (not a slice per span: each slice's backward writes a gradient the
    # size of the whole sequence).
    sizes = [rows * length for length, rows in spans.lengths.items()]
    parts = [t.squeeze(0).index_select(1, spans.order).split(sizes, dim=1) for t in (query, key, value)]
    pieces = []
    for (length, rows), *grouped in zip(spans.lengths.items(), *parts, strict=True):
        grouped = [span.unflatten(1, (rows, length)).transpose(0, 1) for span in grouped]  # [rows, heads, L, d]
        out = sdpa_attention_forward(module, *grouped, None, is_causal=True, **kwargs)[0]  # [rows, L, heads, d]
        pieces.append(out.flatten(0, 1))
    packed = torch.cat(pieces)[spans.back]  # back to the packed order
    return packed.unsqueeze(0), None  # [1, N, heads, d], as SDPA's output


AttentionInterface.register(NAME, _attention)
AttentionMaskInterface.register(NAME, _mask)


def packed_attention(model: torch.nn.Module) -> None:
    """Give `model` the row-by-row attention for packed sequences, unless it uses FlashAttention (whose
    variable-length path transformers takes itself). Idempotent; models with sliding-window layers are refused (their
    window would need a mask)."""
    config = model.config
    implementation = config._attn_implementation
    if implementation == NAME or "flash" in (implementation or ""):
        return
    if implementation != "sdpa":
        raise NotImplementedError(f"train.packing with attention {implementation!r}: use sdpa or flash_attention_2")
    if getattr(config, "use_sliding_window", False) or any(
            kind == "sliding_attention" for kind in getattr(config, "layer_types", None) or ()):
        raise NotImplementedError(f"{config.model_type}: train.packing with sliding-window attention")
    model.set_attn_implementation(NAME)
