"""The optimizer update every training step shares (`harness.step.accumulate.make_update`) against MLX's own
pieces: the mean over loss tokens, `optim.clip_grad_norm`, then AdamW."""

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

from harness.step.accumulate import make_update


class Adapters(nn.Module):
    def __init__(self):
        super().__init__()
        self.lora_a = mx.random.normal((8, 64), key=mx.random.key(1))
        self.lora_b = mx.random.normal((64, 8), key=mx.random.key(2)) * 0.1
        self.scale = mx.random.normal((3,), key=mx.random.key(3))


def reference_update(model, optimizer, grads, n_tokens: int, grad_clip: float):
    grads = tree_map(lambda g: g / n_tokens, grads)
    if grad_clip > 0:
        grads, norm = optim.clip_grad_norm(grads, grad_clip)
    else:
        norm = mx.sqrt(sum((g**2).sum() for _, g in tree_flatten(grads)))
    optimizer.update(model, grads)
    return norm


OPTIMIZERS = {
    "adamw": lambda: optim.AdamW(learning_rate=optim.cosine_decay(1e-2, 10), weight_decay=0.1),
    "sgd with momentum": lambda: optim.SGD(learning_rate=1e-2, momentum=0.9),
    "adafactor": lambda: optim.Adafactor(learning_rate=1e-2),
}


@pytest.mark.parametrize("optimizer", OPTIMIZERS, ids=OPTIMIZERS.keys())
@pytest.mark.parametrize("compile", [True, False])
@pytest.mark.parametrize("grad_clip, grad_size", [(1.0, 50.0), (1.0, 0.01), (0.0, 50.0)])  # clipped, not, off
def test_update_is_the_token_mean_clipped_then_the_optimizer(optimizer, compile, grad_clip, grad_size):
    n_tokens = 37
    ours, reference = Adapters(), Adapters()
    ours_opt, reference_opt = OPTIMIZERS[optimizer](), OPTIMIZERS[optimizer]()
    update = make_update(ours, ours_opt, grad_clip, compile)
    for step in range(3):  # Adam's moments and bias correction over several steps
        grads = {
            name: mx.random.normal(p.shape, key=mx.random.key(10 * step + i)) * grad_size * n_tokens
            for i, (name, p) in enumerate(tree_flatten(ours.trainable_parameters()))
        }
        norm = update(grads, mx.array(n_tokens))
        expected_norm = reference_update(reference, reference_opt, grads, n_tokens, grad_clip)
        mx.eval(norm, expected_norm, ours.parameters(), reference.parameters())
        np.testing.assert_allclose(float(norm), float(expected_norm), rtol=1e-5)
        for (name, ours_p), (_, reference_p) in zip(tree_flatten(ours.parameters()), tree_flatten(reference.parameters())):
            np.testing.assert_allclose(np.array(ours_p), np.array(reference_p), rtol=1e-5, atol=1e-6, err_msg=name)
    moved = tree_flatten(ours.parameters())[0][1]
    assert not np.allclose(np.array(moved), np.array(Adapters().lora_a))  # the update did something
    # the optimizer's state keeps its structure: one entry per parameter, as the reference's
    assert [k for k, _ in tree_flatten(ours_opt.state)] == [k for k, _ in tree_flatten(reference_opt.state)]
    for (name, ours_s), (_, reference_s) in zip(tree_flatten(ours_opt.state), tree_flatten(reference_opt.state)):
        np.testing.assert_allclose(np.array(ours_s), np.array(reference_s), rtol=1e-5, atol=1e-6, err_msg=name)
