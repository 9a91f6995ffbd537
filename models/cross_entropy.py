"""Language-model head fused with cross-entropy, chunked over positions.

A 32,000-token vocabulary makes the logits the largest tensor of a training step (8 x 512 tokens: 0.5 GB in
float32, plus as much again for their gradient). `linear_cross_entropy` never holds more than one chunk of
logits: for each chunk of positions it computes the logits, their log-sum-exp and, in the same pass, the
gradient with respect to the hidden states (`softmax - onehot) @ W`). The gradient rides along as a second
output and the custom VJP only scales it, so the backward pass neither stores nor recomputes any logits.

On the CPU, MLX's `exp` is a scalar loop (about 0.1 G/s); a polynomial `exp` built from vectorized
arithmetic runs several times faster at float32 accuracy, so the CPU path uses it. GPUs use `mx.exp`.
"""

from __future__ import annotations

import mlx.core as mx

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


def polynomial_exp(x: mx.array) -> mx.array:
    """`exp(x)` in float32 from vectorizable arithmetic (relative error below 1e-6 for |x| < 88).

    Splits `x * log2(e)` into the nearest integer `n` and a fraction `|f| <= 1/2`, evaluates 2**f with a polynomial
    and scales by 2**n by building the float's exponent bits. Inputs below -87 flush to about 1e-38.
    """
    y = mx.maximum(x.astype(mx.float32) * _LOG2E, -126.0)
    n = mx.floor(y + 0.5)
    f = y - n
    p = mx.array(_EXP2_COEFFS[-1], dtype=mx.float32)
    for c in reversed(_EXP2_COEFFS[:-1]):
        p = p * f + c
    scale = ((n.astype(mx.int32) + 127) << 23).view(mx.float32)
    return p * scale


def default_exp() -> str:
    """'polynomial' on the CPU (where `mx.exp` is scalar), 'native' on GPUs."""
    return "polynomial" if mx.default_device() == mx.cpu else "native"


def default_chunk_size(hidden_size: int, vocab_size: int) -> int:
    """Positions per chunk: small on the CPU (keeps logits in cache), larger on GPUs (keeps matmuls big)."""
    if mx.default_device() == mx.cpu:
        return 128
    return max(256, min(4096, (1 << 28) // (4 * vocab_size)))  # about 256 MB of float32 logits


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


def _fused(exp_name: str, chunk_size: int):
    exp = polynomial_exp if exp_name == "polynomial" else mx.exp

    @mx.custom_function
    def loss_and_grad(hidden, weight, labels):
        losses, grads = [], []
        for start in range(0, hidden.shape[0], chunk_size):
            stop = start + chunk_size
            loss, grad = _chunk_loss_and_grad(hidden[start:stop], weight, labels[start:stop], exp, True)
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


_FUSED_CACHE: dict[tuple[str, int], object] = {}


def linear_cross_entropy(
    hidden: mx.array,
    weight: mx.array,
    labels: mx.array,
    *,
    chunk_size: int | None = None,
    exp: str | None = None,
    with_grad: bool = True,
) -> tuple[mx.array, mx.array]:
    """Summed cross-entropy of `hidden @ weight.T` against `labels`, and the number of labelled positions.

    hidden: `(N, hidden_size)` in the compute dtype; weight: `(vocab_size, hidden_size)` (the LM head,
    frozen: no gradient flows to it); labels: `(N,)` int, `IGNORE_INDEX` (-100) where no loss is taken.
    Differentiable with respect to `hidden`. `with_grad=False` (evaluation) skips the gradient work.
    Returns `(loss_sum, n_tokens)`, both float32 scalars; divide for the token-weighted mean.
    """
    n = hidden.shape[0]
    chunk_size = chunk_size or default_chunk_size(hidden.shape[-1], weight.shape[0])
    chunk_size = min(chunk_size, max(n, 1))
    exp = exp or default_exp()
    n_tokens = (labels != IGNORE_INDEX).sum().astype(mx.float32)
    if not with_grad:
        fn = polynomial_exp if exp == "polynomial" else mx.exp
        losses = [
            _chunk_loss_and_grad(hidden[s : s + chunk_size], weight, labels[s : s + chunk_size], fn, False)[0]
            for s in range(0, n, chunk_size)
        ]
        return sum(losses[1:], losses[0]), n_tokens
    key = (exp, chunk_size)
    if key not in _FUSED_CACHE:
        _FUSED_CACHE[key] = _fused(exp, chunk_size)
    loss, _ = _FUSED_CACHE[key](hidden, weight, labels)
    return loss, n_tokens


def reference_cross_entropy(hidden: mx.array, weight: mx.array, labels: mx.array) -> tuple[mx.array, mx.array]:
    """Unfused float32 reference: full logits, `mx.logsumexp`, autodiff backward."""
    logits = (hidden.astype(mx.float32) @ weight.astype(mx.float32).T)
    valid = labels != IGNORE_INDEX
    safe = mx.where(valid, labels, 0)
    nll = mx.logsumexp(logits, axis=-1) - mx.take_along_axis(logits, safe[:, None], axis=-1).squeeze(-1)
    return mx.where(valid, nll, 0.0).sum(), valid.sum().astype(mx.float32)


__all__ = ["IGNORE_INDEX", "linear_cross_entropy", "polynomial_exp", "reference_cross_entropy"]
