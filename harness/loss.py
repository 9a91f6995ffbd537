"""The training objective: token-weighted causal language-model cross-entropy."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

IGNORE_INDEX = -100


def causal_lm_loss(model: nn.Module, batch: dict[str, mx.array]) -> tuple[mx.array, mx.array]:
    """Sum of next-token cross-entropies (nats) over the loss tokens of `batch`, and how many there are.

    `batch` holds `input_ids (B, L)` and `labels (B, L)` (HF convention, not shifted; -100 = no loss), and
    optionally `segment_ids (B, L)` for packed sequences. Logits at position t are scored against `labels[t+1]`.
    Returning the sum and the count (not the mean) lets gradient accumulation and validation weight every
    token equally, whatever the micro-batch sizes. Hidden states -> logits -> cross-entropy stay in this one
    function so the vocabulary projection can later be chunked without materializing all logits.
    """
    hidden = model.model(batch["input_ids"], segment_ids=batch.get("segment_ids"))  # (B, L, H)
    targets = batch["labels"][:, 1:]  # (B, L-1)
    mask = targets != IGNORE_INDEX
    logits = model.logits(hidden[:, :-1]).astype(mx.float32)  # (B, L-1, V); float32 for a stable log-sum-exp
    token_losses = nn.losses.cross_entropy(logits, mx.where(mask, targets, 0), reduction="none")
    return (token_losses * mask).sum(), mask.sum()
