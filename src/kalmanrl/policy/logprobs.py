"""Per-token log-probabilities of sampled completions under a model: the one computation behind the old, reference
and new log-probs of every algorithm.

Memory: the decoder's last hidden states [B, T, H] go through the output head a slice of the sequence at a time, so
at most `chunk_tokens` rows x vocabulary float32 logits exist at once (never [B, T, vocab]). With gradients on,
each slice of several is recomputed in the backward pass (activation checkpointing), so the saved tensors are the
hidden states, not the logits.

Packed (`train.packing`): the rows' real tokens are concatenated into one sequence whose position ids restart per
row, and attention stays within each row (FlashAttention's variable-length path, or SDPA row by row:
`kalmanrl.policy.packed_attention`); the output head then runs on the completion tokens only, a flat slice of
`chunk_tokens` at a time. Padding costs nothing in either."""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from kalmanrl.policy.batch import RolloutBatch
from kalmanrl.policy.packed_attention import packed_attention
from kalmanrl.runtime.distributed import as_forward

DEFAULT_CHUNK_TOKENS = 8192


def token_logprobs(model, batch: RolloutBatch, *, with_entropy: bool = False,
                   chunk_tokens: int = DEFAULT_CHUNK_TOKENS, packed: bool = False):
    """Log-probs [B, T] of the completion tokens under `model` (and their per-token entropy [B, T], computed
    without gradient), as gather(log_softmax(logits)) in float32, `chunk_tokens` (rows x positions) at a
    time; with `packed` in one padding-free sequence (module docstring), 0 on padding. A model sharded with FSDP
    gathers its embeddings and head for the whole computation (`as_forward`)."""
    return as_forward(model, _packed_logprobs if packed else _token_logprobs, batch, with_entropy=with_entropy,
                      chunk_tokens=chunk_tokens)


def _check_head(model) -> None:
    if getattr(model.config, "final_logit_softcapping", None):
        raise NotImplementedError(f"{model.config.model_type}: logit soft-capping is not supported by token_logprobs")


def _packed_logprobs(model, batch: RolloutBatch, *, with_entropy: bool, chunk_tokens: int):
    _check_head(model)
    packed_attention(model)
    real = batch.attention_mask.bool()  # [B, P + T]; row-major selection concatenates the rows in order
    hidden = model.get_decoder()(input_ids=batch.input_ids[real][None], position_ids=batch.position_ids[real][None],
                                 attention_mask=None, use_cache=False).last_hidden_state[0]  # [N, H]
    # The state before each real completion token predicts it: the same columns as the padded layout's.
    predicts = torch.zeros_like(real)
    predicts[:, batch.prompt_len - 1:-1] = real[:, batch.prompt_len:]
    completion = real[:, batch.prompt_len:]
    states = hidden[predicts[real]]  # [M, H] in row-major order, as completion's True entries
    targets = batch.input_ids[:, batch.prompt_len:][completion]  # [M]
    taken, entropy = _through_head(model.get_output_embeddings(), states, targets, with_entropy, chunk_tokens, dim=0)
    logp = torch.zeros(completion.shape, dtype=torch.float32, device=hidden.device).masked_scatter(completion, taken)
    if not with_entropy:
        return logp
    return logp, torch.zeros_like(logp).masked_scatter(completion, entropy)


def _token_logprobs(model, batch: RolloutBatch, *, with_entropy: bool, chunk_tokens: int):
    _check_head(model)
    hidden = model.get_decoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                 position_ids=batch.position_ids, use_cache=False).last_hidden_state
    hidden = hidden[:, batch.prompt_len - 1:-1]  # [B, T, H]: the states that predict the completion tokens
    targets = batch.input_ids[:, batch.prompt_len:]  # [B, T]
    width = max(1, chunk_tokens // max(1, targets.shape[0]))
    taken, entropy = _through_head(model.get_output_embeddings(), hidden, targets, with_entropy, width, dim=1)
    return (taken, entropy) if with_entropy else taken


def _through_head(head: torch.nn.Module, states: torch.Tensor, targets: torch.Tensor, with_entropy: bool, width: int,
                  *, dim: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`_chunk` over slices of `width` along `dim` of states [..., H] and targets [...], concatenated. One slice holds
    at most chunk_tokens x vocabulary logits whether kept for backward or not: recompute only when there are
    several."""
    recompute = torch.is_grad_enabled() and states.requires_grad and targets.shape[dim] > width
    outs = []
    for part, wanted in zip(states.split(width, dim), targets.split(width, dim), strict=True):
        args = (head, part, wanted, with_entropy)
        outs.append(checkpoint(_chunk, *args, use_reentrant=False) if recompute else _chunk(*args))
    taken = torch.cat([out[0] for out in outs], dim)
    return taken, torch.cat([out[1] for out in outs], dim) if with_entropy else None


def _chunk(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, with_entropy: bool
           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """hidden [..., H], targets [...] -> log-prob of each target [...] and, if asked, the entropy [...]."""
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
