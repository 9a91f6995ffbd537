"""Language-model head fused with cross-entropy, chunked over positions.

A 32,000-token vocabulary makes the logits the largest tensor of a training step (8 x 512 tokens: 0.5 GB in
float32, plus as much again for their gradient). `linear_cross_entropy` never holds more than one chunk of
logits: for each chunk of positions it computes the logits, their log-sum-exp and, in the same pass, the
gradient with respect to the hidden states (`softmax - onehot) @ W`). The gradient rides along as a second
output and the custom VJP only scales it, so the backward pass neither stores nor recomputes any logits.

On the CPU, MLX's `exp` is a scalar loop (about 0.1 G/s); a polynomial `exp` built from vectorized
arithmetic runs several times faster at float32 accuracy, so the CPU path uses it. GPUs use `mx.exp`.
The CPU path also splits the vocabulary into blocks that keep each block of logits under 2 MB (larger fresh
buffers page-fault on every pass) and combines the blocks with the online-softmax identity.
"""

from __future__ import annotations

import mlx.core as mx

from models.backend import is_cpu

IGNORE_INDEX = -100
_LOG2E = 1.4426950408889634
# Taylor series of 2**f = exp(f ln 2) to degree 6; on |f| <= 1/2 its relative error is about 1e-7.
_EXP2_COEFFS = (
    1.0,
    0.6931471805599453,
    0.2402265069591007,
    0.05550410866482158,
    0.009618129107628477,
    0.0013333558146428443,
    0.00015403530393381606,
)
_ROUND_MAGIC = 12582912.0  # 1.5 * 2**23: y + this rounds y (|y| < 2**22) to an integer in float32
_ROUND_MAGIC_BITS = 0x4B400000  # the bits of 1.5 * 2**23 as a float32


def polynomial_exp(x: mx.array) -> mx.array:
    """`exp(x)` in float32 from vectorizable arithmetic (relative error below 1e-6 for |x| < 88).

    Splits `x * log2(e)` into the nearest integer `n` and a fraction `|f| <= 1/2`, evaluates 2**f with a polynomial
    and scales by 2**n by building the float's exponent bits. Inputs below -87 flush to about 1e-38.
    Rounding adds and subtracts 1.5 * 2**23 (no `floor`, which is a slow scalar op on the CPU), and the float
    that holds `n + 1.5 * 2**23` carries `n` in its low mantissa bits, which become the exponent field.
    """
    y = mx.maximum(x.astype(mx.float32) * _LOG2E, -126.0)
    shifted = y + _ROUND_MAGIC
    f = y - (shifted - _ROUND_MAGIC)
    p = mx.array(_EXP2_COEFFS[-1], dtype=mx.float32)
    for c in reversed(_EXP2_COEFFS[:-1]):
        p = p * f + c
    scale = ((shifted.view(mx.int32) - (_ROUND_MAGIC_BITS - 127)) << 23).view(mx.float32)
    return p * scale


def default_exp() -> str:
    """'polynomial' on the CPU (where `mx.exp` is scalar), 'native' on GPUs."""
    return "polynomial" if is_cpu() else "native"


def default_chunk_size(hidden_size: int, vocab_size: int) -> int:
    """Positions per chunk: 256 on the CPU (the vocabulary is split into blocks too, see `default_vocab_block`),
    larger on GPUs (keeps matmuls big)."""
    if is_cpu():
        return 256
    return max(256, min(4096, (1 << 28) // (4 * vocab_size)))  # about 256 MB of float32 logits


# On the CPU, large arrays come from fresh pages on every allocation, so every elementwise pass over a big block of
# logits page-faults; blocks this small are reused from MLX's cache (BENCHMARKS.md, "Why the code is as it is").
_CPU_BLOCK_BYTES = 2_000_000


def default_vocab_block(chunk_size: int, vocab_size: int) -> int:
    """Vocabulary entries per block of logits: the whole vocabulary on GPUs; on the CPU as many as keep one
    `(chunk_size, block)` float32 block under 2 MB."""
    if mx.default_device() != mx.cpu:
        return vocab_size
    return min(vocab_size, max(64, _CPU_BLOCK_BYTES // (4 * chunk_size)))


def _chunk_loss_and_grad(h, weight, labels, exp, with_grad):
    logits = (h @ weight.T).astype(mx.float32)
    row_max = mx.stop_gradient(logits.max(axis=-1, keepdims=True))
    e = exp(logits - row_max)
    total = e.sum(axis=-1, keepdims=True)
    lse = (row_max + mx.log(total)).squeeze(-1)
    valid = labels != IGNORE_INDEX
    safe = mx.where(valid, labels, 0)
    target = mx.take_along_axis(logits, safe[:, None], axis=-1).squeeze(-1)
    loss = mx.where(valid, lse - target, 0.0).sum()
    if not with_grad:
        return loss, None
    probs = (e / total).astype(h.dtype)
    grad = probs @ weight - weight[safe]  # (softmax - onehot) @ W without building the one-hot
    return loss, mx.where(valid[:, None], grad, mx.zeros_like(grad))


def _blocked_chunk_loss_and_grad(h, weight, labels, exp, with_grad, vocab_block, after=None):
    """`_chunk_loss_and_grad` over vocabulary blocks: each block keeps its own row maximum, exponential sum and
    unnormalized `exp(logits - max) @ W_block`; the blocks are then rescaled to the common maximum and summed
    (the online-softmax identity), so no array is larger than one block of logits.

    Each block's logits wait for the previous block's results (and the first block's for `after`, the previous
    chunk's): however wide MLX's evaluation order is (`harness/step/cpu_streams.py`), one block of logits and its
    temporaries are alive at a time. Returns `(loss, grad, last)`, `last` for the next chunk."""
    maxes, sums, partials = [], [], []
    ones = mx.ones((vocab_block, 1), dtype=mx.float32)
    for start in range(0, weight.shape[0], vocab_block):
        w_block = weight[start : start + vocab_block]
        if after:
            (h,) = mx.depends([h], after)
        logits = (h @ w_block.T).astype(mx.float32)
        block_max = mx.stop_gradient(logits.max(axis=-1, keepdims=True))
        e = exp(logits - block_max)
        maxes.append(block_max)
        sums.append(e @ ones[: w_block.shape[0]])  # a BLAS matrix-vector product: several times a sum's speed
        after = [sums[-1]]  # every consumer of this block's exponentials: then they can be freed
        if with_grad:
            partials.append(e.astype(h.dtype) @ w_block)
            after.append(partials[-1])
    maxes = mx.concatenate(maxes, axis=-1)  # (rows, blocks)
    row_max = maxes.max(axis=-1, keepdims=True)
    rescale = exp(maxes - row_max)  # exp(block max - row max) <= 1
    total = (mx.concatenate(sums, axis=-1) * rescale).sum(axis=-1, keepdims=True)
    lse = (row_max + mx.log(total)).squeeze(-1)
    valid = labels != IGNORE_INDEX
    safe = mx.where(valid, labels, 0)
    target_rows = weight[safe]
    target = (h.astype(mx.float32) * target_rows.astype(mx.float32)).sum(axis=-1)  # the label's logit
    loss = mx.where(valid, lse - target, 0.0).sum()
    if not with_grad:
        return loss, None, after
    weights = (rescale / total).astype(h.dtype)  # (rows, blocks): softmax normalization of each block
    grad = partials[0] * weights[:, :1]
    for i, partial in enumerate(partials[1:], start=1):
        grad = grad + partial * weights[:, i : i + 1]
    grad = grad - target_rows
    return loss, mx.where(valid[:, None], grad, mx.zeros_like(grad)), after


def _loss_and_grad_of_chunk(h, weight, labels, exp, with_grad, vocab_block, after=None):
    """`(loss, grad, last)` of one chunk of positions; `last`, arrays of this chunk's last block, goes in as
    the next chunk's `after` (the blocked path evaluates the chunks one after another; see there)."""
    if vocab_block >= weight.shape[0]:
        return (*_chunk_loss_and_grad(h, weight, labels, exp, with_grad), None)
    return _blocked_chunk_loss_and_grad(h, weight, labels, exp, with_grad, vocab_block, after)


def _fused(exp_name: str, chunk_size: int, vocab_block: int):
    exp = polynomial_exp if exp_name == "polynomial" else mx.exp

    @mx.custom_function
    def loss_and_grad(hidden, weight, labels):
        losses, grads, last = [], [], None
        for start in range(0, hidden.shape[0], chunk_size):
            stop = start + chunk_size
            loss, grad, last = _loss_and_grad_of_chunk(
                hidden[start:stop], weight, labels[start:stop], exp, True, vocab_block, last
            )
            losses.append(loss)
            grads.append(grad)
        return sum(losses[1:], losses[0]), mx.concatenate(grads, axis=0)

    @loss_and_grad.vjp
    def loss_and_grad_vjp(primals, cotangents, outputs):
        hidden, weight, labels = primals
        grad_hidden = outputs[1] * cotangents[0].astype(outputs[1].dtype)
        # The head is frozen in LoRA training; its gradient is never requested, so this stays unevaluated.
        return grad_hidden, mx.zeros_like(weight), mx.zeros_like(labels)

    return loss_and_grad


_FUSED_CACHE: dict[tuple[str, int, int], object] = {}


def linear_cross_entropy(
    hidden: mx.array,
    weight: mx.array,
    labels: mx.array,
    *,
    chunk_size: int | None = None,
    exp: str | None = None,
    vocab_block: int | None = None,
    with_grad: bool = True,
) -> tuple[mx.array, mx.array]:
    """Summed cross-entropy of `hidden @ weight.T` against `labels`, and the number of labelled positions.

    hidden: `(N, hidden_size)` in the compute dtype; weight: `(vocab_size, hidden_size)` (the LM head,
    frozen: no gradient flows to it); labels: `(N,)` int, `IGNORE_INDEX` (-100) where no loss is taken.
    Differentiable with respect to `hidden`. `with_grad=False` (evaluation) skips the gradient work.
    `chunk_size` positions and `vocab_block` vocabulary entries make one block of logits (defaults per backend:
    `default_chunk_size`, `default_vocab_block`); `exp` is "native" (`mx.exp`) or "polynomial".
    Returns `(loss_sum, n_tokens)`, both float32 scalars; divide for the token-weighted mean.
    """
    n = hidden.shape[0]
    chunk_size = chunk_size or default_chunk_size(hidden.shape[-1], weight.shape[0])
    chunk_size = min(chunk_size, max(n, 1))
    exp = exp or default_exp()
    vocab_block = vocab_block or default_vocab_block(chunk_size, weight.shape[0])
    n_tokens = (labels != IGNORE_INDEX).sum().astype(mx.float32)
    if not with_grad:
        fn = polynomial_exp if exp == "polynomial" else mx.exp
        losses, last = [], None
        for s in range(0, n, chunk_size):
            loss, _, last = _loss_and_grad_of_chunk(
                hidden[s : s + chunk_size], weight, labels[s : s + chunk_size], fn, False, vocab_block, last
            )
            losses.append(loss)
        return sum(losses[1:], losses[0]), n_tokens
    key = (exp, chunk_size, vocab_block)
    if key not in _FUSED_CACHE:
        _FUSED_CACHE[key] = _fused(exp, chunk_size, vocab_block)
    loss, _ = _FUSED_CACHE[key](hidden, weight, labels)
    return loss, n_tokens


def reference_cross_entropy(hidden: mx.array, weight: mx.array, labels: mx.array) -> tuple[mx.array, mx.array]:
    """Unfused float32 reference: full logits, `mx.logsumexp`, autodiff backward."""
    logits = (hidden.astype(mx.float32) @ weight.astype(mx.float32).T)
    valid = labels != IGNORE_INDEX
    safe = mx.where(valid, labels, 0)
    nll = mx.logsumexp(logits, axis=-1) - mx.take_along_axis(logits, safe[:, None], axis=-1).squeeze(-1)
    return mx.where(valid, nll, 0.0).sum(), valid.sum().astype(mx.float32)


__all__ = [
    "IGNORE_INDEX",
    "default_chunk_size",
    "default_vocab_block",
    "linear_cross_entropy",
    "polynomial_exp",
    "reference_cross_entropy",
]
