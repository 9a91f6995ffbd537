"""The training objective: token-weighted causal language-model cross-entropy."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from models.cross_entropy import IGNORE_INDEX, linear_cross_entropy


def lm_head_weight(model: nn.Module) -> mx.array:
    """The vocabulary projection `(vocab_size, hidden_size)` as a dense array in the compute dtype, whether
    the head is a plain linear, a quantized one, or tied to the (possibly quantized) embedding."""
    head = model.model.embed_tokens if model.args.tie_word_embeddings else model.lm_head
    if hasattr(head, "dequantize"):
        return head.dequantize(model.dtype)
    return head.weight


def causal_lm_loss(model: nn.Module, batch: dict[str, mx.array]) -> tuple[mx.array, mx.array]:
    """Sum of next-token cross-entropies (nats) over the loss tokens of `batch`, and how many there are.

    `batch` holds `input_ids (B, L)` and `labels (B, L)` (HF convention, not shifted; -100 = no loss), and
    optionally `segment_ids (B, L)` for packed sequences. Logits at position t are scored against `labels[t+1]`.
    Returning the sum and the count (not the mean) lets gradient accumulation and validation weight every
    token equally, whatever the micro-batch sizes. The vocabulary projection and the cross-entropy run fused
    and chunked (`models.cross_entropy`): the full `(B, L, vocab)` logits never exist. In training mode the
    gradient with respect to the hidden states is computed in the same pass; `model.eval()` skips that work.
    """
    hidden = model.model(batch["input_ids"], segment_ids=batch.get("segment_ids"))  # (B, L, H)
    return loss_from_hidden(model, hidden, batch["labels"])


def loss_from_hidden(model: nn.Module, hidden: mx.array, labels: mx.array) -> tuple[mx.array, mx.array]:
    """`causal_lm_loss` from the final (normed) hidden states `(B, L, H)` and the unshifted `labels (B, L)`."""
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # (B * (L-1), H)
    targets = labels[:, 1:].reshape(-1)  # (B * (L-1),)
    return linear_cross_entropy(hidden, lm_head_weight(model), targets, with_grad=model.training)


__all__ = ["IGNORE_INDEX", "causal_lm_loss", "lm_head_weight", "loss_from_hidden"]
