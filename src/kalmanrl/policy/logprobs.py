"""Per-token log-probabilities of sampled completions under a model: the one computation behind the old, reference
and new log-probs of every algorithm.

Memory: the decoder's last hidden states [B, T, H] go through the output head a slice of the sequence at a time, so
at most `chunk_tokens` rows x vocabulary float32 logits exist at once (never [B, T, vocab]). With gradients on,
each slice of several is recomputed in the backward pass (activation checkpointing), so the saved tensors are the
hidden states, not the logits."""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from kalmanrl.policy.batch import RolloutBatch
from kalmanrl.runtime.distributed import as_forward

DEFAULT_CHUNK_TOKENS = 8192


def token_logprobs(model, batch: RolloutBatch, *, with_entropy: bool = False,
                   chunk_tokens: int = DEFAULT_CHUNK_TOKENS):
    """Log-probs [B, T] of the completion tokens under `model` (and their per-token entropy [B, T], computed
    without gradient), as gather(log_softmax(logits)) in float32, `chunk_tokens` (rows x positions) at a
    time. A model sharded with FSDP gathers its embeddings and head for the whole computation (`as_forward`)."""
    return as_forward(model, _token_logprobs, batch, with_entropy=with_entropy, chunk_tokens=chunk_tokens)


def _token_logprobs(model, batch: RolloutBatch, *, with_entropy: bool, chunk_tokens: int):
    if getattr(model.config, "final_logit_softcapping", None):
        raise NotImplementedError(f"{model.config.model_type}: logit soft-capping is not supported by token_logprobs")
    hidden = model.get_decoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                 position_ids=batch.position_ids, use_cache=False).last_hidden_state
    hidden = hidden[:, batch.prompt_len - 1:-1]  # [B, T, H]: the states that predict the completion tokens
    targets = batch.input_ids[:, batch.prompt_len:]  # [B, T]
    head = model.get_output_embeddings()
    rows, steps = targets.shape
    width = max(1, chunk_tokens // max(1, rows))
    # One slice holds at most chunk_tokens x vocabulary logits whether kept for backward or not: recompute only
    # when there are several.
    recompute = torch.is_grad_enabled() and hidden.requires_grad and steps > width
    taken, entropy = [], []
    for start in range(0, steps, width):
        args = (head, hidden[:, start:start + width], targets[:, start:start + width], with_entropy)
        out = checkpoint(_chunk, *args, use_reentrant=False) if recompute else _chunk(*args)
        taken.append(out[0])
        entropy.append(out[1])
    taken = torch.cat(taken, dim=1)
    return (taken, torch.cat(entropy, dim=1)) if with_entropy else taken


def _chunk(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, with_entropy: bool
           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """hidden [B, t, H], targets [B, t] -> log-prob of each target [B, t] and, if asked, the entropy [B, t]."""
    logits = head(hidden).float()
    with torch.autocast(hidden.device.type, enabled=False):  # float32 from here on, whatever the caller's autocast
        # log_softmax, not gather - logsumexp: on the CPU logsumexp and its gradient take exp and log from MKL's VML,
        # whose bits depend on the CPU's vendor (kalmanrl.runtime.vendor_neutral); log_softmax's kernels are ATen's.
        log_probs = logits.log_softmax(-1)
        taken = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        if not with_entropy:
            return taken, None
        with torch.no_grad():
            entropy = -(torch.softmax(logits, dim=-1) * log_probs).sum(-1)
    return taken, entropy
