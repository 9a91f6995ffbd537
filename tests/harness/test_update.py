"""The optimizer update every training step shares (`harness.step.accumulate.make_update`) against MLX's own
pieces: the mean over loss tokens, `optim.clip_grad_norm`, then AdamW; with element-wise optimizers on arrays
kept stacked by shape (`harness.step.stacked`), whose state is saved and loaded per parameter."""

import gc

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from harness.step.accumulate import make_update
from harness.step.stacked import STACKED, AdapterStacks, per_parameter_state


def update_for(model, optimizer, grad_clip, compile=True, stacked=False):
    """`make_update` with or without stacks (`AdapterStacks.build` leaves them out where they do not apply)."""
    stacks = AdapterStacks.build(model, optimizer) if stacked else None
    return make_update(model, optimizer, grad_clip, compile, stacks=stacks)


class Adapter(nn.Module):
    def __init__(self, seed: int, out_features: int = 64):
        super().__init__()
        self.lora_a = mx.random.normal((8, 64), key=mx.random.key(seed))
        self.lora_b = mx.random.normal((out_features, 8), key=mx.random.key(seed + 1)) * 0.1


class Adapters(nn.Module):
    """Three adapters, two of one shape and one whose B differs, and a vector: four stacks of 1-3 arrays."""

    def __init__(self):
        super().__init__()
        self.layers = [Adapter(1), Adapter(3), Adapter(5, out_features=32)]
        self.scale = mx.random.normal((3,), key=mx.random.key(7))


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
@pytest.mark.parametrize("compile, stacked", [(True, True), (False, True), (True, False)])
@pytest.mark.parametrize("grad_clip, grad_size", [(1.0, 50.0), (1.0, 0.01), (0.0, 50.0)])  # clipped, not, off
def test_update_is_the_token_mean_clipped_then_the_optimizer(optimizer, compile, stacked, grad_clip, grad_size):
    n_tokens = 37
    ours, reference = Adapters(), Adapters()
    ours_opt, reference_opt = OPTIMIZERS[optimizer](), OPTIMIZERS[optimizer]()
    update = update_for(ours, ours_opt, grad_clip, compile, stacked=stacked)
    for step in range(3):  # Adam's moments and bias correction over several steps
        grads = tree_unflatten([
            (name, mx.random.normal(p.shape, key=mx.random.key(10 * step + i)) * grad_size * n_tokens)
            for i, (name, p) in enumerate(tree_flatten(ours.trainable_parameters()))
        ])
        norm = update(grads, mx.array(n_tokens))
        expected_norm = reference_update(reference, reference_opt, grads, n_tokens, grad_clip)
        mx.eval(norm, expected_norm, ours.parameters(), reference.parameters())
        np.testing.assert_allclose(float(norm), float(expected_norm), rtol=1e-5)
        for (name, ours_p), (_, reference_p) in zip(tree_flatten(ours.parameters()), tree_flatten(reference.parameters())):
            np.testing.assert_allclose(np.array(ours_p), np.array(reference_p), rtol=1e-5, atol=1e-6, err_msg=name)
    moved = tree_flatten(ours.parameters())[0][1]
    assert not np.allclose(np.array(moved), np.array(Adapters().layers[0].lora_a))  # the update did something
    assert (STACKED in ours_opt.state) == (stacked and optimizer != "adafactor")  # Adafactor's are not element-wise
    # saved per parameter, the optimizer's state is the reference's, entry for entry
    assert_same_state(per_parameter_state(ours_opt.state, ours), dict(tree_flatten(reference_opt.state)))


def assert_same_state(ours: dict, reference: dict) -> None:
    assert sorted(ours) == sorted(reference)
    for name in reference:
        expected = np.array(reference[name])
        # float32 rounding of the array's largest entries (the scale folds into the arithmetic in another order)
        atol = 1e-6 * max(1.0, float(np.abs(expected).max(initial=0.0)))
        np.testing.assert_allclose(np.array(ours[name]), expected, rtol=1e-5, atol=atol, err_msg=name)


def test_same_shaped_arrays_share_one_stack():
    model, optimizer = Adapters(), optim.AdamW(learning_rate=1e-2)
    optimizer.init(model.trainable_parameters())
    update_for(model, optimizer, grad_clip=1.0, stacked=True)
    shapes = {stack: tuple(state["m"].shape) for stack, state in optimizer.state[STACKED].items()}
    assert sorted(shapes.values()) == sorted([(3 * 8, 64), (2 * 64, 8), (32, 8), (3,)])  # joined on axis 0
    assert "layers" not in optimizer.state  # one copy of the moments: the per-parameter entries went into the stacks


@pytest.mark.parametrize("compile", [True, False])
def test_adapters_and_state_loaded_after_the_update_was_built_are_used(compile):
    """Loading a checkpoint into the model and the optimizer (per parameter, as saved) after the step exists: the
    next update starts from what was loaded, not from the stacks it held."""
    n_tokens = 5
    ours, reference = Adapters(), Adapters()
    ours_opt, reference_opt = OPTIMIZERS["adamw"](), OPTIMIZERS["adamw"]()
    ours_opt.init(ours.trainable_parameters())
    update = update_for(ours, ours_opt, 1.0, compile, stacked=True)

    def grads(step):
        return tree_unflatten([(name, mx.random.normal(p.shape, key=mx.random.key(100 + 10 * step + i)) * n_tokens)
                               for i, (name, p) in enumerate(tree_flatten(ours.trainable_parameters()))])

    for step in range(2):
        reference_update(reference, reference_opt, grads(step), n_tokens, 1.0)
    update(grads(5), mx.array(n_tokens))  # our own path away from the reference
    # the checkpoint: the reference's adapters and its per-parameter optimizer state, loaded in place
    ours.update(tree_map(lambda a: mx.array(np.array(a)), reference.trainable_parameters()))
    ours_opt.state.clear()
    ours_opt.state.update(tree_map(lambda a: mx.array(np.array(a)), reference_opt.state))
    for step in range(2, 4):
        update(grads(step), mx.array(n_tokens))
        reference_update(reference, reference_opt, grads(step), n_tokens, 1.0)
    mx.eval(ours.parameters(), reference.parameters())
    for (name, ours_p), (_, reference_p) in zip(tree_flatten(ours.parameters()), tree_flatten(reference.parameters())):
        np.testing.assert_allclose(np.array(ours_p), np.array(reference_p), rtol=1e-5, atol=1e-6, err_msg=name)
    assert_same_state(per_parameter_state(ours_opt.state, ours), dict(tree_flatten(reference_opt.state)))


class WideAdapters(nn.Module):
    """Eight adapter pairs of 0.5 MB a matrix: memory differences of a copy of them stand out."""

    def __init__(self):
        super().__init__()
        self.layers = [Adapter(10 + 2 * i, out_features=16384) for i in range(8)]


def test_stacked_update_keeps_one_copy_of_the_adapters():
    """The model holds views of the stacks, not copies: after a few updates the process holds as much as after
    the per-array update (indexing a stack as `stack[i]` gathered a copy of every adapter)."""

    def resident_growth(stacked: bool) -> int:
        model, optimizer = WideAdapters(), optim.AdamW(learning_rate=1e-2)
        optimizer.init(model.trainable_parameters())
        mx.eval(model.parameters(), optimizer.state)
        gc.collect()
        before = mx.get_active_memory()
        update = update_for(model, optimizer, 1.0, stacked=stacked)
        for step in range(3):
            grads = tree_map(lambda p: mx.ones_like(p) * (step + 1), model.trainable_parameters())
            mx.eval(update(grads, mx.array(4)), model.parameters(), optimizer.state)
            del grads
        gc.collect()
        growth = mx.get_active_memory() - before
        del model, optimizer, update
        gc.collect()
        return growth

    adapters = sum(p.nbytes for _, p in tree_flatten(WideAdapters().trainable_parameters()))
    per_array, stacked = resident_growth(False), resident_growth(True)
    assert stacked < per_array + adapters / 4, (stacked, per_array, adapters)


def test_a_scalar_parameter_keeps_the_per_array_update():
    """Stacks join arrays along their first axis; a 0-d trainable array has none, so the update stays per array."""
    model = Adapters()
    model.temperature = mx.array(1.0)
    optimizer = optim.AdamW(learning_rate=1e-2)
    optimizer.init(model.trainable_parameters())
    update = update_for(model, optimizer, grad_clip=1.0, stacked=True)
    grads = tree_map(mx.ones_like, model.trainable_parameters())
    mx.eval(update(grads, mx.array(2)), model.parameters())
    assert STACKED not in optimizer.state and "temperature" in optimizer.state
