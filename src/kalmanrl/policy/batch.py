"""The rollout batch: prompts and their sampled completions packed into padded tensors the log-prob passes and the
update read, response-aligned so every per-token tensor is [B, T]."""

from __future__ import annotations

import heapq
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass, fields, replace

import torch

from kalmanrl.policy.rollout import Completion


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
    engine_logp: torch.Tensor | None = None  # [B, T] the rollout engine's log-prob of each sampled token
    old_logp: torch.Tensor | None = None  # [B, T]
    ref_logp: torch.Tensor | None = None  # [B, T]
    # A rollout correction's (`kalmanrl.rl.correction`; None without one): the weight of each token's policy-gradient
    # term, and the tokens the loss keeps (completion_mask less the rejected ones).
    weights: torch.Tensor | None = None  # [B, T]
    loss_mask: torch.Tensor | None = None  # [B, T]

    PER_TOKEN = ("completion_mask", "engine_logp", "old_logp", "ref_logp", "weights", "loss_mask")

    def map_tensors(self, fn) -> RolloutBatch:
        """The batch with `fn` applied to each of its tensors."""
        return replace(self, **{f.name: fn(getattr(self, f.name)) for f in fields(self)
                                if torch.is_tensor(getattr(self, f.name))})

    def loss_tokens(self) -> torch.Tensor:
        """The tokens the loss trains [B, T]: a rollout correction's mask if there is one, else the completion mask."""
        return self.completion_mask if self.loss_mask is None else self.loss_mask

    def select(self, index: torch.Tensor) -> RolloutBatch:
        return self.map_tensors(lambda t: t[index])

    def to(self, device: torch.device) -> RolloutBatch:
        return self.map_tensors(lambda t: t.to(device))

    def widths(self) -> tuple[list[int], list[int]]:
        """Per row: prompt tokens and completion tokens (the columns a forward pass of that row alone needs)."""
        prompt = self.attention_mask[:, :self.prompt_len].sum(-1)
        return prompt.tolist(), self.completion_mask.sum(-1).long().tolist()

    def trimmed(self) -> RolloutBatch:
        """The same rows without the columns that are padding in every row: leading prompt padding and trailing
        completion padding (at least one completion column is kept). Per-token tensors become [B, T'], T' <= T."""
        prompt, completion = self.widths()
        drop = self.prompt_len - max(prompt)
        steps = max(1, max(completion))
        end = self.prompt_len + steps
        return replace(self, input_ids=self.input_ids[:, drop:end], attention_mask=self.attention_mask[:, drop:end],
                       position_ids=self.position_ids[:, drop:end], prompt_len=self.prompt_len - drop,
                       **{name: getattr(self, name)[:, :steps] for name in self.PER_TOKEN
                          if getattr(self, name) is not None})


def row_tokens(batch: RolloutBatch) -> list[int]:
    """Per row: its real tokens, prompt plus completion (what a packed forward of the row costs)."""
    prompt, completion = batch.widths()
    return [p + c for p, c in zip(prompt, completion, strict=True)]


def balanced_parts(costs: Sequence[int], rows: Sequence[int], parts: int) -> list[list[int]]:
    """`rows` split into `parts` parts of near-equal summed `costs[row]` (verl's sequence-length balancing): the
    costliest row first, each to the part that costs least so far (ties: the lower part; equal rows in row order),
    every part's rows in ascending order. Greedy (LPT: the largest part is within 4/3 of the best split's) and a pure
    function of the costs, so every rank computes the same split without communicating."""
    loads = [(0, part) for part in range(parts)]
    out: list[list[int]] = [[] for _ in range(parts)]
    for row in sorted(rows, key=lambda r: (-costs[r], r)):
        load, part = heapq.heappop(loads)
        out[part].append(row)
        heapq.heappush(loads, (load + costs[row], part))
    return [sorted(part) for part in out]


def rank_rows(batch: RolloutBatch, mini: torch.Tensor, world_size: int, rank: int) -> torch.Tensor:
    """The rows of the mini-batch `mini` (rows of the whole batch) that rank `rank` of `world_size` computes: the
    mini-batch balanced over the ranks by real tokens, so no rank waits on another's long rows."""
    if world_size == 1:
        return mini
    part = balanced_parts(row_tokens(batch), mini.tolist(), world_size)[rank]
    return torch.tensor(part, dtype=torch.long, device=mini.device)


def micro_batches(batch: RolloutBatch, index: torch.Tensor, budget: int, *, packed: bool = False
                  ) -> list[torch.Tensor]:
    """Split the rows `index` [n] of `batch` into micro-batches of at most `budget` tokens each, by length (a row
    wider than the budget is a micro-batch of its own; deterministic, each micro-batch's rows in ascending order):
    - packed (`train.packing`), a micro-batch costs its rows' real tokens: the fewest balanced parts
      (`balanced_parts`) that keep every part within the budget, from ceil(real tokens / budget) up;
    - padded, a micro-batch costs rows x the padded width of its trimmed batch: the rows longest first, cut greedily
      (a row that does not fit starts the next micro-batch), so rows of like length share a micro-batch."""
    if not len(index):
        return []
    rows, costs = index.tolist(), row_tokens(batch)
    if packed:
        count = min(len(rows), max(1, math.ceil(sum(costs[r] for r in rows) / budget)))
        while True:
            parts = [part for part in balanced_parts(costs, rows, count) if part]
            if all(len(part) == 1 or sum(costs[r] for r in part) <= budget for part in parts):
                return [torch.tensor(part, dtype=index.dtype, device=index.device) for part in parts]
            count += 1
    prompt, completion = batch.widths()
    groups: list[list[int]] = []
    widest_prompt = widest_completion = 0
    for row in sorted(rows, key=lambda r: (-costs[r], r)):
        wider_prompt, wider_completion = max(widest_prompt, prompt[row]), max(widest_completion, completion[row], 1)
        if groups and (len(groups[-1]) + 1) * (wider_prompt + wider_completion) <= budget:
            groups[-1].append(row)
        else:
            groups.append([row])
            wider_prompt, wider_completion = prompt[row], max(1, completion[row])
        widest_prompt, widest_completion = wider_prompt, wider_completion
    return [torch.tensor(sorted(group), dtype=index.dtype, device=index.device) for group in groups]


def build_batch(prompt_ids: list[list[int]], completions: list[list[Completion]], advantages: torch.Tensor,
                pad_id: int, *, untrained_stops: Collection[int] = (), prompt_len: int = 0, completion_len: int = 0
                ) -> RolloutBatch:
    """Pack prompts [N] and their completions [N][G] into one padded batch of N*G rows (prompt-major order), with
    the engine's log-prob of every sampled token (`engine_logp`). With `untrained_stops` (the ids that end a completion,
    `rollout.stop_token_ids`), a completion's final token among them stays an input but leaves the completion mask, so
    the loss never trains it (the KRPO authors' loss mask, which drops pad = EOS). `prompt_len` and `completion_len`:
    at least these widths (the widest over all ranks, so that the ranks' batches concatenate into the one-process
    batch)."""
    rows = [(p, c.token_ids) for p, group in zip(prompt_ids, completions, strict=True) for c in group]
    prompt_len = max(prompt_len, *(len(p) for p, _ in rows))
    max_completion = max(1, completion_len, *(len(c) for _, c in rows))
    ids = torch.full((len(rows), prompt_len + max_completion), pad_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    engine_logp = torch.zeros(len(rows), max_completion)
    sampled = [c for group in completions for c in group]
    for i, ((p, c), completion) in enumerate(zip(rows, sampled, strict=True)):
        ids[i, prompt_len - len(p):prompt_len] = torch.tensor(p)
        ids[i, prompt_len:prompt_len + len(c)] = torch.tensor(c, dtype=torch.long)
        attention[i, prompt_len - len(p):prompt_len + len(c)] = 1
        if len(completion.logprobs) != len(c):
            raise ValueError(f"completion {i}: {len(c)} tokens but {len(completion.logprobs)} engine log-probs")
        engine_logp[i, :len(c)] = torch.tensor(completion.logprobs, dtype=torch.float)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    completion_mask = attention[:, prompt_len:].float()
    for i, (_, c) in enumerate(rows):
        if c and c[-1] in untrained_stops:
            completion_mask[i, len(c) - 1] = 0
    return RolloutBatch(ids, attention, positions, completion_mask, prompt_len, advantages.reshape(-1).float(),
                        engine_logp=engine_logp)
