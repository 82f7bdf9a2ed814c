"""The rollout batch: prompts and their sampled completions packed into padded tensors the log-prob passes and the
update read, response-aligned so every per-token tensor is [B, T]."""

from __future__ import annotations

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

    def _map(self, fn) -> RolloutBatch:
        return replace(self, **{f.name: fn(getattr(self, f.name)) for f in fields(self)
                                if torch.is_tensor(getattr(self, f.name))})

    def loss_tokens(self) -> torch.Tensor:
        """The tokens the loss trains [B, T]: a rollout correction's mask if there is one, else the completion mask."""
        return self.completion_mask if self.loss_mask is None else self.loss_mask

    def select(self, index: torch.Tensor) -> RolloutBatch:
        return self._map(lambda t: t[index])

    def to(self, device: torch.device) -> RolloutBatch:
        return self._map(lambda t: t.to(device))

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


def micro_batches(batch: RolloutBatch, index: torch.Tensor, budget: int, *, packed: bool = False
                  ) -> list[torch.Tensor]:
    """Split the rows `index` [n] of `batch`, in that order, into consecutive micro-batches of at most `budget`
    tokens each: a micro-batch costs rows x the padded width of its trimmed batch, or with `packed` the sum of its
    rows' real tokens (`train.packing`). Greedy (a row that does not fit starts the next micro-batch),
    deterministic, and a row wider than the budget is a micro-batch of its own."""
    if not len(index):
        return []
    prompt, completion = batch.widths()
    groups, start, max_prompt, max_completion, real = [], 0, 0, 1, 0
    for position, row in enumerate(index.tolist()):
        wider_prompt, wider_completion = max(max_prompt, prompt[row]), max(max_completion, completion[row])
        real += prompt[row] + completion[row]
        cost = real if packed else (position - start + 1) * (wider_prompt + wider_completion)
        if position > start and cost > budget:
            groups.append(index[start:position])
            start, wider_prompt, wider_completion = position, prompt[row], max(1, completion[row])
            real = prompt[row] + completion[row]
        max_prompt, max_completion = wider_prompt, wider_completion
    groups.append(index[start:])
    return groups


def build_batch(prompt_ids: list[list[int]], completions: list[list[Completion]], advantages: torch.Tensor,
                pad_id: int, *, untrained_eos: int | None = None) -> RolloutBatch:
    """Pack prompts [N] and their completions [N][G] into one padded batch of N*G rows (prompt-major order), with
    the engine's log-prob of every sampled token (`engine_logp`). With `untrained_eos` (an EOS id), a completion's final
    token equal to it stays an input but leaves the completion mask, so the loss never trains it (the KRPO authors' loss
    mask, which drops pad = EOS)."""
    rows = [(p, c.token_ids) for p, group in zip(prompt_ids, completions) for c in group]
    prompt_len = max(len(p) for p, _ in rows)
    max_completion = max(1, max(len(c) for _, c in rows))
    ids = torch.full((len(rows), prompt_len + max_completion), pad_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    engine_logp = torch.zeros(len(rows), max_completion)
    sampled = [c for group in completions for c in group]
    for i, ((p, c), completion) in enumerate(zip(rows, sampled)):
        ids[i, prompt_len - len(p):prompt_len] = torch.tensor(p)
        ids[i, prompt_len:prompt_len + len(c)] = torch.tensor(c, dtype=torch.long)
        attention[i, prompt_len - len(p):prompt_len + len(c)] = 1
        if len(completion.logprobs) != len(c):
            raise ValueError(f"completion {i}: {len(c)} tokens but {len(completion.logprobs)} engine log-probs")
        engine_logp[i, :len(c)] = torch.tensor(completion.logprobs, dtype=torch.float)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    completion_mask = attention[:, prompt_len:].float()
    if untrained_eos is not None:
        for i, (_, c) in enumerate(rows):
            if c and c[-1] == untrained_eos:
                completion_mask[i, len(c) - 1] = 0
    return RolloutBatch(ids, attention, positions, completion_mask, prompt_len, advantages.reshape(-1).float(),
                        engine_logp=engine_logp)
