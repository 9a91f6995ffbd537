import models  # noqa: F401  (loads the fast BLAS before MLX)
import mlx.core as mx
import numpy as np
import pytest

from models.cross_entropy import (
    IGNORE_INDEX,
    default_chunk_size,
    default_vocab_block,
    linear_cross_entropy,
    polynomial_exp,
    reference_cross_entropy,
)


def _problem(n=300, d=48, vocab=1000, ignored=0.3, seed=0):
    rng = np.random.default_rng(seed)
    hidden = mx.array(rng.normal(size=(n, d)).astype(np.float32))
    weight = mx.array((rng.normal(size=(vocab, d)) * 0.2).astype(np.float32))
    labels = rng.integers(0, vocab, size=n)
    labels[rng.random(n) < ignored] = IGNORE_INDEX
    return hidden, weight, mx.array(labels.astype(np.int32))


def test_polynomial_exp_matches_exp_to_float32_accuracy():
    x = mx.array(np.linspace(-80.0, 80.0, 100_001, dtype=np.float32))
    rel = mx.abs(polynomial_exp(x) - mx.exp(x)) / mx.exp(x)
    assert rel.max().item() < 1e-6


@pytest.mark.parametrize("exp", ["native", "polynomial"])
@pytest.mark.parametrize("chunk_size", [7, 64, 1024])
def test_fused_loss_and_gradient_match_reference(exp, chunk_size):
    hidden, weight, labels = _problem()

    def mean_loss(fn, h, **kw):
        loss, count = fn(h, weight, labels, **kw)
        return loss / count

    ref, ref_grad = mx.value_and_grad(lambda h: mean_loss(reference_cross_entropy, h))(hidden)
    got, grad = mx.value_and_grad(
        lambda h: mean_loss(linear_cross_entropy, h, chunk_size=chunk_size, exp=exp)
    )(hidden)
    assert abs(got.item() - ref.item()) < 1e-5 * abs(ref.item())
    np.testing.assert_allclose(np.array(grad), np.array(ref_grad), rtol=1e-4, atol=1e-7)
    ignored = np.array(labels) == IGNORE_INDEX
    assert np.all(np.array(grad)[ignored] == 0)


@pytest.mark.parametrize("exp", ["native", "polynomial"])
@pytest.mark.parametrize("chunk_size, vocab_block", [(64, 256), (300, 333), (7, 999)])
def test_vocabulary_blocks_match_reference(exp, chunk_size, vocab_block):
    hidden, weight, labels = _problem(seed=3)
    hidden = hidden * 3  # wide logits: the blocks' maxima differ, so their rescaling matters

    def mean_loss(fn, h, **kw):
        loss, count = fn(h, weight, labels, **kw)
        return loss / count

    ref, ref_grad = mx.value_and_grad(lambda h: mean_loss(reference_cross_entropy, h))(hidden)
    step = mx.compile(
        mx.value_and_grad(
            lambda h: mean_loss(linear_cross_entropy, h, chunk_size=chunk_size, vocab_block=vocab_block, exp=exp)
        )
    )
    got, grad = step(hidden)
    assert abs(got.item() - ref.item()) < 1e-5 * abs(ref.item())
    np.testing.assert_allclose(np.array(grad), np.array(ref_grad), rtol=1e-4, atol=1e-6)
    assert np.all(np.array(grad)[np.array(labels) == IGNORE_INDEX] == 0)
    loss_sum, count = linear_cross_entropy(
        hidden, weight, labels, chunk_size=chunk_size, vocab_block=vocab_block, exp=exp, with_grad=False
    )
    assert abs(loss_sum.item() / count.item() - ref.item()) < 1e-5 * abs(ref.item())


def test_cpu_blocks_stay_small_and_gpu_blocks_cover_the_vocabulary():
    chunk = default_chunk_size(4096, 32000)
    if mx.default_device() == mx.cpu:
        assert chunk * default_vocab_block(chunk, 32000) * 4 <= 2_000_000
        assert default_vocab_block(1, 500) == 500
    else:
        assert default_vocab_block(chunk, 32000) == 32000


def test_loss_without_gradient_and_token_count():
    hidden, weight, labels = _problem(n=50, ignored=0.5, seed=1)
    ref, ref_count = reference_cross_entropy(hidden, weight, labels)
    got, count = linear_cross_entropy(hidden, weight, labels, with_grad=False, chunk_size=16)
    assert count.item() == ref_count.item() == int((np.array(labels) != IGNORE_INDEX).sum())
    assert abs(got.item() - ref.item()) < 1e-5 * abs(ref.item())


def test_compiled_bfloat16_path_stays_close_to_float32_reference():
    hidden, weight, labels = _problem(n=128, seed=2)
    ref, _ = reference_cross_entropy(hidden, weight, labels)
    step = mx.compile(lambda h, w: linear_cross_entropy(h, w, labels, chunk_size=32)[0])
    got = step(hidden.astype(mx.bfloat16), weight.astype(mx.bfloat16))
    assert abs(got.item() - ref.item()) < 2e-2 * abs(ref.item())
