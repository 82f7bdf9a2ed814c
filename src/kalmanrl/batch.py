"""The rollout batch: prompts and their sampled completions packed into padded tensors the log-prob passes and the
update read, response-aligned so every per-token tensor is [B, T]."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from kalmanrl.rollout import Completion


@dataclass
class RolloutBatch:
    """B = prompts x G sequences: left-padded prompts then right-padded completions, so every completion starts at
    column `prompt_len` and per-token tensors are response-aligned ([B, T])."""

    input_ids: torch.Tensor        # [B, P + T]
    attention_mask: torch.Tensor   # [B, P + T]
    position_ids: torch.Tensor     # [B, P + T]
    completion_mask: torch.Tensor  # [B, T] float
    prompt_len: int
    advantages: torch.Tensor       # [B]
    old_logp: torch.Tensor | None = None  # [B, T]
    ref_logp: torch.Tensor | None = None  # [B, T]

    def _map(self, fn) -> RolloutBatch:
        return replace(self, **{f.name: fn(getattr(self, f.name)) for f in fields(self)
                                if torch.is_tensor(getattr(self, f.name))})

    def select(self, index: torch.Tensor) -> RolloutBatch:
        return self._map(lambda t: t[index])

    def to(self, device: torch.device) -> RolloutBatch:
        return self._map(lambda t: t.to(device))


def build_batch(prompt_ids: list[list[int]], completions: list[list[Completion]], advantages: torch.Tensor,
                pad_id: int) -> RolloutBatch:
    """Pack prompts [N] and their completions [N][G] into one padded batch of N*G rows (prompt-major order)."""
    rows = [(p, c.token_ids) for p, group in zip(prompt_ids, completions) for c in group]
    prompt_len = max(len(p) for p, _ in rows)
    max_completion = max(1, max(len(c) for _, c in rows))
    ids = torch.full((len(rows), prompt_len + max_completion), pad_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for i, (p, c) in enumerate(rows):
        ids[i, prompt_len - len(p):prompt_len] = torch.tensor(p)
        ids[i, prompt_len:prompt_len + len(c)] = torch.tensor(c, dtype=torch.long)
        attention[i, prompt_len - len(p):prompt_len + len(c)] = 1
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    return RolloutBatch(ids, attention, positions, attention[:, prompt_len:].float(), prompt_len,
                        advantages.reshape(-1).float())
