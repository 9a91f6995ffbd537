"""Gradient checkpointing by hand: the training step runs forward, then backward, one decoder layer at a time.

`mx.checkpoint` inside one compiled step keeps only each layer's input, in theory. On a GPU MLX queues the whole
step at once and every queued kernel keeps its inputs alive until it has run, so a checkpointed step's peak
grew to several times its live data, and a memory limit (`mx.set_memory_limit`) bounded it only by making MLX
wait for the queue, at a large cost in speed (BENCHMARKS.md, "Training step, 7B shape"). Here each layer's
forward pass, and each layer's recomputation with its backward pass, is its own compiled graph, and at most two
layers' graphs are queued at once (one running, the next queued behind it, so the GPU does not wait for the
CPU): memory stays at the frozen base, the layer inputs and about two layers' temporaries.

Forward: embed, then each layer (its input kept); the head computes the loss and its gradient in one pass
(`models.cross_entropy`). Backward: from the last layer to the first, recompute the layer and pull the
cotangent through it (`mx.vjp`), which gives the layer's adapter gradients and the next cotangent. The model's
own parts serve for this (`embed`, `mask`, the layers, `final_norm`; `models.mistral`), not a copy of its forward.

Adapter dropout: each layer's masks come from a key derived from the step's key, the micro-batch and the layer
(`models.lora.dropout_keys`), passed into the compiled layer functions, so the recomputation draws exactly the
masks of the forward pass. The step's key is drawn from MLX's global random state, which the trainer seeds by
(seed, step), so a resumed run draws the same masks.

Gradient accumulation: micro-batches run one after another, each evaluated before the next starts, and their
gradients are summed as they come: the peak does not grow with the number of micro-batches.

Adapters: with an element-wise optimizer (AdamW) they and its moments are kept stacked by shape, and each step
casts the stacks to the compute dtype once and runs the layers on views of them (`harness.step.stacked`), rather
than casting every adapter in every pass. The optimizer update is `harness.step.accumulate.make_update`, as in
`TrainStep`; without dropout the numbers are `TrainStep`'s, with dropout those of plain autograd under the same
masks (tests/harness/test_layerwise_step.py).
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import mlx.optimizers as optim
from mlx import nn
from mlx.utils import tree_flatten, tree_unflatten

from harness.distributed import world
from harness.step.loss import loss_from_hidden
from harness.step.accumulate import make_update, sum_outputs
from harness.step.stacked import AdapterStacks, parameter_place
from models.recompute import uncheckpointed_call
from models.lora import dropout_keys
from models.quant import dense_weights_kept_for_backward

Batch = dict[str, mx.array]
# Layers queued on the device beyond the one being waited for: more buys little speed for a layer's temporaries
# each (BENCHMARKS.md, "Why the code is as it is"; benchmarks/gpu/memory_probe.py --in-flight).
IN_FLIGHT = 1


class LayerwiseTrainStep:
    """`step(batches) -> (loss_sum, n_tokens, grad_norm)`, like `harness.step.standard.TrainStep`."""

    @staticmethod
    def supports(model: nn.Module) -> bool:
        """Models whose trainable parameters all sit in decoder layers (adapter dropout included). Checkpointing
        need not be on: this step recomputes each layer's forward pass itself."""
        trainable = [name for name, _ in tree_flatten(model.trainable_parameters())]
        return bool(trainable) and all(n.startswith("model.layers.") for n in trainable)

    def __init__(
        self,
        model: nn.Module,
        optimizer: optim.Optimizer,
        *,
        grad_clip: float,
        compile: bool = True,
        in_flight: int = IN_FLIGHT,
        keep_dense: bool = True,
    ):
        """`in_flight`: layers queued on the device at once (more: fewer idle gaps, more memory).
        `keep_dense`: the recomputation keeps dense weights for the backward pass ("dequantize_saved")."""
        if not self.supports(model):
            raise ValueError("LayerwiseTrainStep needs every trainable parameter inside a decoder layer")
        self.model = model
        self.layers = model.layers
        self._in_flight, self._keep_dense = in_flight, keep_dense
        self._compile = compile
        self.optimizer = optimizer
        # Adapters kept stacked, computed on as views cast once a step (`harness.step.stacked`); None for
        # optimizers that are not element-wise: then each layer computes on the model's own arrays.
        self.stacks = AdapterStacks.build(model, optimizer)
        self._update = make_update(model, optimizer, grad_clip, compile, stacks=self.stacks)
        # Layers of one structure (the same parameter names: adapters or none) share one compiled forward and
        # backward: the first such layer is the template whose arrays are swapped for the given layer's.
        self._templates: dict[tuple[str, ...], nn.Module] = {}
        # Where each layer's frozen and trainable arrays live, found once: a step reads the arrays held there now
        # (flattening 32 layers' parameter trees took milliseconds a step, while the GPU waited).
        self._places: list[tuple[list, list]] = []
        self._structures: list[tuple[str, ...]] = []
        for layer in self.layers:
            frozen, trainable = self._split(layer)
            self._structures.append(self._structure(frozen, trainable))
            self._templates.setdefault(self._structures[-1], layer)
            self._places.append(
                tuple([(name, *parameter_place(layer, name)) for name in arrays] for arrays in (frozen, trainable))
            )
        self._layer_call = uncheckpointed_call(self.layers[0])
        self._functions: dict[tuple, tuple[Callable, Callable, Callable]] = {}
        self._head = self._maybe_compile(self._head_loss_and_cotangent)

    def _maybe_compile(self, fn):
        return mx.compile(fn) if self._compile else fn

    @staticmethod
    def _structure(frozen: dict, trainable: dict) -> tuple[str, ...]:
        """The sorted names of a layer's arrays: layers with equal structures share compiled functions."""
        return tuple(sorted([*frozen, *trainable]))

    def _split(self, layer: nn.Module) -> tuple[dict[str, mx.array], dict[str, mx.array]]:
        trainable = dict(tree_flatten(layer.trainable_parameters()))
        frozen = {k: v for k, v in tree_flatten(layer.parameters()) if k not in trainable}
        return frozen, trainable

    def _parameters(self) -> list[tuple[dict[str, mx.array], dict[str, mx.array]]]:
        """Each layer's `(frozen, trainable)` arrays for this step; with stacks the trainable ones are views of
        the stacks cast to the compute dtype (their gradients come back in it)."""
        parameters = [
            tuple({name: container[key] for name, container, key in places} for places in layer_places)
            for layer_places in self._places
        ]
        if self.stacks is None:
            return parameters
        views = self.stacks.compute_views(self.model.dtype)
        return [
            (frozen, {name: views[f"model.layers.{i}.{name}"] for name in trainable})
            for i, (frozen, trainable) in enumerate(parameters)
        ]

    def _run_template(self, frozen: dict, trainable: dict, x: mx.array, mask, key: mx.array) -> mx.array:
        template = self._templates[self._structure(frozen, trainable)]
        original = template.parameters()
        try:
            template.update(tree_unflatten([*frozen.items(), *trainable.items()]))
            with dropout_keys(key):  # the layer's adapter dropout masks: the same in forward and recomputation
                return self._layer_call(template, x, mask)
        finally:
            template.update(original)

    def _layer_functions(self, mask, structure: tuple[str, ...]) -> tuple[Callable, Callable, Callable]:
        """Compiled (forward, backward, backward without the input's gradient) for one mask kind.

        Each takes `(frozen, trainable, x[, cotangent], key, mask_array)`, `key` being the layer's dropout key;
        an array mask (packed sequences) is a compiled input, while None and "causal" are closed over. The first
        layer's input is the frozen embedding, which needs no gradient: its backward pass skips that matmul chain.
        """
        kind = ("array" if isinstance(mask, mx.array) else mask, structure)
        if kind not in self._functions:
            static = None if isinstance(mask, mx.array) else mask

            def forward(frozen, trainable, x, key, mask_array):
                return self._run_template(frozen, trainable, x, static if mask_array is None else mask_array, key)

            def backward(frozen, trainable, x, cotangent, key, mask_array, input_grad: bool):
                names, layer_mask = list(trainable), static if mask_array is None else mask_array

                def layer_fn(*arrays):
                    params, layer_input = dict(zip(names, arrays[: len(names)])), arrays[-1] if input_grad else x
                    if not self._keep_dense:
                        return self._run_template(frozen, params, layer_input, layer_mask, key)
                    with dense_weights_kept_for_backward():  # recomputed right before its backward pass
                        return self._run_template(frozen, params, layer_input, layer_mask, key)

                primals = [*trainable.values(), x] if input_grad else list(trainable.values())
                _, vjps = mx.vjp(layer_fn, primals, [cotangent])
                return dict(zip(names, vjps[: len(names)])), (vjps[-1] if input_grad else None)

            if isinstance(mask, mx.array):
                functions = (
                    self._maybe_compile(forward),
                    self._maybe_compile(lambda f, t, x, c, k, m: backward(f, t, x, c, k, m, True)),
                    self._maybe_compile(lambda f, t, x, c, k, m: backward(f, t, x, c, k, m, False)[0]),
                )
            else:  # None cannot be a compiled input
                fwd = self._maybe_compile(lambda f, t, x, k: forward(f, t, x, k, None))
                bwd = self._maybe_compile(lambda f, t, x, c, k: backward(f, t, x, c, k, None, True))
                first = self._maybe_compile(lambda f, t, x, c, k: backward(f, t, x, c, k, None, False)[0])
                functions = (
                    lambda f, t, x, k, _m: fwd(f, t, x, k),
                    lambda f, t, x, c, k, _m: bwd(f, t, x, c, k),
                    lambda f, t, x, c, k, _m: first(f, t, x, c, k),
                )
            self._functions[kind] = functions
        return self._functions[kind]

    def _head_loss_and_cotangent(self, last: mx.array, labels: mx.array):
        """Loss sum, loss tokens and the cotangent for the last layer's output (final norm + fused head)."""

        def head(last):
            return loss_from_hidden(self.model, self.model.final_norm(last), labels)

        (loss_sum, n_tokens), (cotangent,) = mx.vjp(head, [last], [mx.array(1.0), mx.array(0.0)])
        return loss_sum, n_tokens, cotangent

    def _gradients(self, batch: Batch, key: mx.array, parameters: list) -> tuple[mx.array, mx.array, dict]:
        """`(loss_sum, n_tokens, grads)` of one micro-batch, its layers queued on the device (the caller waits
        for them); `key`: its dropout key; `parameters`: `_parameters()`. The gradients are stacked when the
        adapters are."""
        ids = batch["input_ids"]
        mask = self.model.mask(ids.shape[1], 0, batch.get("segment_ids"))
        mask_array = mask if isinstance(mask, mx.array) else None
        layer_keys = layer_dropout_keys(key, len(self.layers))
        queue = _Queue(self._in_flight)
        inputs = [self.model.embed(ids)]
        for (frozen, trainable), structure, layer_key in zip(parameters, self._structures, layer_keys):
            forward = self._layer_functions(mask, structure)[0]
            inputs.append(forward(frozen, trainable, inputs[-1], layer_key, mask_array))
            queue.push(inputs[-1])
        loss_sum, n_tokens, cotangent = self._head(inputs.pop(), batch["labels"])
        queue.push(loss_sum, n_tokens, cotangent)
        flat_grads = {}
        for i in reversed(range(len(self.layers))):
            frozen, trainable = parameters[i]
            _, backward, backward_first = self._layer_functions(mask, self._structures[i])
            if i > 0:
                grads, cotangent = backward(frozen, trainable, inputs.pop(), cotangent, layer_keys[i], mask_array)
                queue.push(cotangent, *grads.values())
            elif trainable:
                grads = backward_first(frozen, trainable, inputs.pop(), cotangent, layer_keys[i], mask_array)
                queue.push(*grads.values())
            else:
                grads = {}
            flat_grads.update({f"model.layers.{i}.{name}": g for name, g in grads.items()})
        if self.stacks is not None:
            return loss_sum, n_tokens, self.stacks.stack(flat_grads)
        return loss_sum, n_tokens, tree_unflatten(list(flat_grads.items()))

    def __call__(self, batches: list[Batch], key: mx.array | None = None) -> tuple[mx.array, mx.array, mx.array]:
        """One optimizer step over `batches` (the micro-batches). `key`: the step's dropout key
        (`mx.random.key`); by default drawn from MLX's global random state."""
        keys = micro_batch_dropout_keys(step_dropout_key() if key is None else key, len(batches))
        ranks = world()  # under a distributed launcher: this rank's rows of each batch, sums over ranks
        if self.stacks is not None:
            self.stacks.ensure_current(self.optimizer)  # adapters or state loaded since the last step

        def local_sums():
            parameters, total = self._parameters(), None
            for index, (batch, batch_key) in enumerate(zip(batches, keys)):
                output = self._gradients(ranks.rows(batch), batch_key, parameters)
                total = output if total is None else sum_outputs([total, output])
                if index < len(batches) - 1:
                    # evaluated before the next micro-batch is built: only the running sum and one micro-batch's
                    # gradients are alive at a time
                    mx.eval(total)
                else:  # the update is built while the device finishes the last layers
                    mx.async_eval(total)
            return total

        loss_sum, n_tokens, grads = ranks.sum_outputs(local_sums)
        return loss_sum, n_tokens, self._update(grads, n_tokens)


def step_dropout_key() -> mx.array:
    """A dropout key `(2,)` uint32 drawn from MLX's global random state (seeded per step by the trainer)."""
    return mx.random.randint(0, 2**31 - 1, (2,), dtype=mx.int32).astype(mx.uint32)


def micro_batch_dropout_keys(step_key: mx.array, micro_batches: int) -> mx.array:
    """`(micro_batches, 2)` keys: row m is the key of the step's m-th micro-batch."""
    return mx.random.split(step_key, micro_batches)


def layer_dropout_keys(micro_batch_key: mx.array, num_layers: int) -> mx.array:
    """`(num_layers, 2)` keys: row i holds layer i's dropout key (`models.lora.dropout_keys`) in a micro-batch."""
    return mx.random.split(micro_batch_key, num_layers)


class _Queue:
    """Queue work on the device (`mx.async_eval`); once more than `limit` items are queued, wait for the oldest."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._pending: list[list[mx.array]] = []

    def push(self, *arrays: mx.array) -> None:
        mx.async_eval(*arrays)
        self._pending.append(list(arrays))
        if len(self._pending) > self._limit:
            mx.eval(self._pending.pop(0))
