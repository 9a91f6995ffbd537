"""The trainable arrays kept stacked by shape across steps, so the optimizer update runs a few large kernels.

A 7B model with LoRA on seven projections has 448 adapter arrays but only five shapes. Updated one by one, each
array costs a kernel for its norm and one for the optimizer's arithmetic, and a small step is bound by the number
of kernels, not by arithmetic (BENCHMARKS.md, "Where a small step's time goes"). `AdapterStacks` keeps one
stacked array per shape (and dtype) between steps, the arrays concatenated along their first axis, and gives the
model views of it (slices of rows: no copy; `a[i]` on a stacked axis would gather a copy); the optimizer's
per-parameter state (Adam's moments) is stacked the same way, under `optimizer.state[STACKED]`. An update then
copies the gradients into their stacks once (one copy per array) and runs the norm and the optimizer once per
stack.

The forward and backward passes compute in the activations' dtype (bfloat16 on a GPU), and the adapters are kept
in float32. Cast where they are used, each adapter costs a cast per pass and its gradient another back: about 40
small kernels a decoder layer. `compute_views` casts each stack once a step instead and gives the step views of
the cast stacks to run the layers on (`harness.step.layerwise`); their gradients come back in the compute dtype,
and `stack` casts them to the stacks' dtype as it joins them. The numbers are the same: a cast of the same values,
in another place.

Only element-wise optimizers (`ELEMENT_WISE`: each element's update depends on that element alone) give the same
numbers on a stack as on its pieces; others (Adafactor's factored moments, Muon's orthogonalization) keep the
per-array update. Checkpoints keep the per-parameter layout: `per_parameter_state` unstacks the state for
saving, and state loaded per parameter is stacked again before the next update (`AdapterStacks.ensure_current`).
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.optimizers as optim
from mlx import nn
from mlx.utils import tree_flatten

STACKED = "stacked"  # key of `optimizer.state` that holds the stacked per-parameter state, one entry per stack
ELEMENT_WISE = (optim.SGD, optim.Adam, optim.Lion, optim.RMSprop, optim.Adagrad, optim.AdaDelta)  # Adam: + AdamW


def stack_layout(model: nn.Module) -> list[tuple[str, list[str]]]:
    """`[(stack name, parameter names)]`: the model's trainable arrays grouped by shape and dtype, in the order
    `tree_flatten` gives them (stacks named "0", "1", ... by first appearance)."""
    groups: dict[tuple, list[str]] = {}
    for name, array in tree_flatten(model.trainable_parameters()):
        groups.setdefault((tuple(array.shape), array.dtype), []).append(name)
    return [(str(i), names) for i, names in enumerate(groups.values())]


def joined(arrays: list[mx.array]) -> mx.array:
    """Equally shaped arrays concatenated along their first axis: `piece(result, i)` is the i-th again."""
    return mx.concatenate(arrays, axis=0)


def piece(stack: mx.array, i: int, count: int) -> mx.array:
    """The i-th of the `count` arrays `joined` made `stack` of, as a view (a slice of rows, no copy)."""
    rows = stack.shape[0] // count
    return stack[i * rows : (i + 1) * rows]


def per_parameter_state(state: dict, model: nn.Module) -> dict[str, mx.array]:
    """`optimizer.state` flattened with one entry per parameter and field (`"<parameter>.m"`, `"step"`, ...), as an
    unstacked optimizer keeps it: stacked state is cut back into its parameters' pieces (views)."""
    flat = dict(tree_flatten({key: value for key, value in state.items() if key != STACKED}))
    if STACKED in state:
        for stack, names in stack_layout(model):
            for field, whole in state[STACKED][stack].items():
                flat.update((f"{name}.{field}", piece(whole, i, len(names))) for i, name in enumerate(names))
    return flat


class AdapterStacks:
    """The model's trainable arrays as stacks (`arrays`, one per shape and dtype) with the model holding views
    of them, and the optimizer's per-parameter state stacked alike. `apply(optimizer, stacked_grads)` is the
    update; `arrays` must be an input and output of any compiled function that calls it."""

    def __init__(self, model: nn.Module, optimizer: optim.Optimizer):
        self.model = model
        self.layout = stack_layout(model)
        self.arrays: dict[str, mx.array] = {}
        self._places = [parameter_place(model, name) for _, names in self.layout for name in names]
        self._views: list[mx.array] = []
        self.restack(optimizer)

    @staticmethod
    def supports(optimizer: optim.Optimizer, model: nn.Module) -> bool:
        """An element-wise optimizer, and trainable arrays that all have a first axis to join on."""
        arrays = tree_flatten(model.trainable_parameters())
        return isinstance(optimizer, ELEMENT_WISE) and all(array.ndim >= 1 for _, array in arrays)

    @classmethod
    def build(cls, model: nn.Module, optimizer: optim.Optimizer) -> AdapterStacks | None:
        """The stacks for `model` and `optimizer`, or None where they do not apply (`supports`)."""
        return cls(model, optimizer) if cls.supports(optimizer, model) else None

    def stack(self, tree: dict) -> dict[str, dict[str, mx.array]]:
        """A tree keyed like the model's trainable parameters (e.g. gradients) as `{STACKED: {stack: array}}`, in
        the stacks' dtype; a tree stacked already is returned as it is."""
        if STACKED in tree:
            return tree
        flat = dict(tree_flatten(tree))
        stacked = {}
        for stack, names in self.layout:
            whole = joined([flat[name] for name in names])
            stacked[stack] = whole.astype(self.arrays[stack].dtype)  # no cast when the dtypes agree
        return {STACKED: stacked}

    def compute_views(self, dtype: mx.Dtype) -> dict[str, mx.array]:
        """`{parameter name: array}`: views of the stacks cast to `dtype`, one cast per stack (none where the
        stack has that dtype), for a step to compute on in place of the model's arrays."""
        cast = {stack: array if array.dtype == dtype else array.astype(dtype) for stack, array in self.arrays.items()}
        return {name: piece(cast[stack], i, len(names)) for stack, names in self.layout for i, name in enumerate(names)}

    def apply(self, optimizer: optim.Optimizer, stacked_grads: dict) -> None:
        """One optimizer step on the stacks (`stacked_grads` from `stack`); the model gets views of the result."""
        updated = optimizer.apply_gradients(stacked_grads, {STACKED: self.arrays})[STACKED]
        self.arrays.update(updated)
        self._give_model_views()

    def ensure_current(self, optimizer: optim.Optimizer) -> None:
        """Stack again when something replaced the model's arrays (adapters loaded) or the optimizer's state
        (loaded per parameter) since the last update; checks identities only, no arithmetic."""
        current = STACKED in optimizer.state and all(
            container[key] is view for (container, key), view in zip(self._places, self._views)
        )
        if not current:
            self.restack(optimizer)

    def remember_views(self) -> None:
        """Note the arrays the model holds now (after a compiled update wrote its outputs back)."""
        self._views = [container[key] for container, key in self._places]

    def restack(self, optimizer: optim.Optimizer) -> None:
        """Stacks built from the model's arrays and the optimizer's per-parameter state (zeros where it has
        none yet), which is removed from `optimizer.state` so that one copy of it exists."""
        state = optimizer.state
        flat_state = per_parameter_state(state, self.model)
        parameters = dict(tree_flatten(self.model.trainable_parameters()))
        self.arrays.clear()
        self.arrays.update((stack, joined([parameters[n] for n in names])) for stack, names in self.layout)
        stacked_state: dict[str, dict[str, mx.array]] = {}
        for stack, names in self.layout:
            fields = sorted(key[len(names[0]) + 1:] for key in flat_state if key.startswith(names[0] + "."))
            if all(f"{name}.{field}" in flat_state for name in names for field in fields) and fields:
                stacked_state[stack] = {f: joined([flat_state[f"{n}.{f}"] for n in names]) for f in fields}
        for key in {name.split(".", 1)[0] for _, names in self.layout for name in names}:
            state.pop(key, None)  # the per-parameter entries: their values are in the stacks now
        state[STACKED] = stacked_state
        for stack, array in self.arrays.items():
            if stack not in stacked_state:  # a fresh optimizer: its own initial state
                stacked_state[stack] = {}
                optimizer.init_single(array, stacked_state[stack])
        mx.eval(self.arrays, state[STACKED])
        self._give_model_views()
        self.remember_views()

    def _give_model_views(self) -> None:
        places = iter(self._places)  # in layout order
        for stack, names in self.layout:
            for i in range(len(names)):
                container, key = next(places)
                container[key] = piece(self.arrays[stack], i, len(names))


def parameter_place(tree: nn.Module | dict, name: str) -> tuple[Any, str]:
    """`(container, key)` holding parameter `name` ("model.layers.3.mlp.down_proj.lora_A") inside `tree` (a model,
    or a tree that mirrors one, such as `optimizer.state`): `container[key]` is what `tree` holds there now."""
    *path, key = name.split(".")
    container: Any = tree
    for part in path:
        container = container[int(part)] if isinstance(container, list) else container[part]
    return container, key
