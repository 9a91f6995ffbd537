"""Scaled dot-product attention: MLX's fused kernel, and a CPU path built on `polynomial_exp`.

`fused_attention` is `mx.fast.scaled_dot_product_attention` (Metal, CUDA, CPU). On the CPU its softmax uses a
scalar `exp`, where most of a short sequence's attention time goes. `polynomial_attention` computes the same
thing with two matmuls and a softmax on `polynomial_exp` with a hand-written backward, which is faster there
(BENCHMARKS.md, "Why the code is as it is"). It materializes the
`(batch, heads, queries, keys)` scores, so it suits the CPU's short training sequences; GPUs keep the fused kernel.
Both take the masks `models.mistral.attention_mask` makes: None, "causal", or a boolean array.
"""

from __future__ import annotations

import mlx.core as mx

from models.cross_entropy import polynomial_exp

_MASKED = -1e30  # below any real score; masked entries are then set to exactly zero after the exp


def fused_attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array | str | None) -> mx.array:
    """`softmax(q k^T * scale + mask) v` by MLX's fused kernel. q `(B, H, L, D)`, k and v `(B, KVH, S, D)`."""
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)


@mx.custom_function
def _masked_softmax(scores: mx.array, keep: mx.array) -> mx.array:
    """Softmax over the last axis of float32 `scores`, exactly zero where `keep` is False."""
    scores = mx.where(keep, scores, _MASKED)
    row_max = mx.stop_gradient(scores.max(axis=-1, keepdims=True))
    e = polynomial_exp(scores - row_max) * keep
    return e * (1.0 / e.sum(axis=-1, keepdims=True))


@_masked_softmax.vjp
def _masked_softmax_vjp(primals, cotangent, probs):
    scores, keep = primals
    grad = probs * (cotangent - (cotangent * probs).sum(axis=-1, keepdims=True))
    return grad, mx.zeros_like(keep)


def _keep_mask(mask: mx.array | str | None, query_len: int, key_len: int) -> mx.array:
    if mask is None:
        return mx.ones((query_len, key_len), dtype=mx.bool_)
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"unknown attention mask {mask!r}")
        q_pos = mx.arange(key_len - query_len, key_len)[:, None]
        return mx.arange(key_len)[None, :] <= q_pos
    return mask


def polynomial_attention(
    q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array | str | None
) -> mx.array:
    """`fused_attention` from matmuls and a float32 softmax on `polynomial_exp` (same shapes, masks, GQA)."""
    batch, heads, query_len, head_dim = q.shape
    kv_heads, key_len = k.shape[1], k.shape[2]
    groups = heads // kv_heads
    # Query heads that share a key/value head are stacked along the query axis: one matmul per KV head.
    q = (q * scale).reshape(batch, kv_heads, groups * query_len, head_dim)
    scores = (q @ k.swapaxes(-1, -2)).astype(mx.float32).reshape(batch, kv_heads, groups, query_len, key_len)
    keep = _keep_mask(mask, query_len, key_len)
    if keep.ndim == 4:  # (B, 1, L, S) for packed sequences: broadcast over KV heads and groups
        keep = keep[:, :, None]
    probs = _masked_softmax(scores, keep).astype(v.dtype)
    out = probs.reshape(batch, kv_heads, groups * query_len, key_len) @ v
    return out.reshape(batch, heads, query_len, head_dim)


__all__ = ["fused_attention", "polynomial_attention"]
