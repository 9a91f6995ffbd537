"""Gradient checkpointing applied from outside the model.

Each decoder layer's forward runs inside `mx.checkpoint`: its activations are dropped after the forward
pass and recomputed during the backward pass, so activation memory grows with one layer, not the model.
Inside the checkpointed layer, quantized linears keep their rebuilt dense weights from the recomputation for
the backward pass (one layer's worth at a time) instead of rebuilding them once more.
Adapter dropout inside a checkpointed layer draws its masks from one key per layer call, an input of the
checkpointed function, so the recomputation draws the forward pass's masks.
Only the instances passed in are changed (their class is swapped for a checkpointing subclass), so other
models in the process and the model file are untouched; parameter names stay the same.
"""

from __future__ import annotations

import contextlib
import functools

import mlx.core as mx
from mlx import nn

from models.lora import dropout_keys, recomputation_dropout_key
from models.quant import dense_weights_kept_for_backward


@functools.cache
def _checkpointed_class(cls: type) -> type:
    """A subclass of `cls` whose `__call__` runs the original inside `mx.checkpoint`."""

    def __call__(self, x, *args, **kwargs):
        def forward(params, x, key=None):
            self.update(params)  # the checkpointed function must see parameters as inputs to recompute with them
            # Recomputation runs right before this layer's backward pass: quantized linears may keep their
            # dense weights for it rather than rebuild them again (models.quant, "dequantize_saved").
            with dense_weights_kept_for_backward(), contextlib.ExitStack() as scope:
                if key is not None:  # the recomputation must draw the forward pass's dropout masks
                    scope.enter_context(dropout_keys(key))
                return cls.__call__(self, x, *args, **kwargs)

        key = recomputation_dropout_key(self)
        inputs = (self.trainable_parameters(), x) if key is None else (self.trainable_parameters(), x, key)
        return mx.checkpoint(forward)(*inputs)

    return type(f"Checkpointed{cls.__name__}", (cls,), {"__call__": __call__, "_checkpointed_base": cls})


def enable_gradient_checkpointing(model: nn.Module) -> nn.Module:
    """Recompute each decoder layer's activations in the backward pass instead of storing them. In place."""
    for layer in model.model.layers:
        if not hasattr(type(layer), "_checkpointed_base"):
            layer.__class__ = _checkpointed_class(type(layer))
    return model


def disable_gradient_checkpointing(model: nn.Module) -> nn.Module:
    """Undo `enable_gradient_checkpointing`. In place."""
    for layer in model.model.layers:
        base = getattr(type(layer), "_checkpointed_base", None)
        if base is not None:
            layer.__class__ = base
    return model


def gradient_checkpointing_enabled(model: nn.Module) -> bool:
    return all(hasattr(type(layer), "_checkpointed_base") for layer in model.model.layers)


def uncheckpointed_call(layer: nn.Module):
    """The layer class's own `__call__` (`fn(layer, x, mask)`), without `mx.checkpoint` around it even when
    checkpointing is on: for callers that recompute layers themselves (harness/step/layerwise.py)."""
    return getattr(type(layer), "_checkpointed_base", type(layer)).__call__
