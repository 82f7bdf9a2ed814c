"""Per-token log-probabilities of sampled completions under a model: the one computation behind the old, reference
and new log-probs of every algorithm."""

from __future__ import annotations

import torch

from kalmanrl.batch import RolloutBatch


def token_logprobs(model, batch: RolloutBatch, *, with_entropy: bool = False):
    """Log-probs [B, T] of the completion tokens under `model` (and their per-token entropy [B, T])."""
    steps = batch.completion_mask.shape[1]
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                   logits_to_keep=steps + 1).logits[:, :-1].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    targets = batch.input_ids[:, batch.prompt_len:]
    taken = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if not with_entropy:
        return taken
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    return taken, entropy
