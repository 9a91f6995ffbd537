"""Where a large training step's time goes (issue 12's 8 x 512 target): one model build, then one decoder layer's
pieces at the step's token count, each timed alone and multiplied by the number of layers, beside the whole step.

    python benchmarks/gpu/large_step_profile.py [--rows 8] [--seq 512] [overrides ...]   # default: 7B shape

Prints one table (median milliseconds of 5 synchronized runs after 2 untimed ones) and writes it as JSON to
$OUT/large_step_profile<tag>.json when OUT is set. Rows:
- the whole compiled step (`TrainStep`, what `trainer.train_step: auto` takes at this size on CUDA) and the
  in-run rate of a square matmul in the compute dtype;
- one decoder layer's forward + backward (the input's and the adapters' gradients), compiled, x layers: as the
  step runs it (the quantized base dequantized, LoRA on);
- the same with the adapters taken out (the quantized base alone): the difference is what LoRA costs;
- the same on dense bfloat16 weights, no adapters: the difference is what dequantization costs;
- the seven projections' matmuls alone, forward and input gradient, on dense weights, x layers: the floor;
- attention alone (`mx.fast.scaled_dot_product_attention`, causal, forward + backward), x layers;
- the final norm, LM head and loss, forward + backward; the optimizer update.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

import models  # noqa: F401,E402  (fast BLAS before mlx)
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from mlx.utils import tree_flatten, tree_unflatten  # noqa: E402

from benchmarks.gpu.profile_table import ProfileTable, median_ms  # noqa: E402
from harness.bench import compose, matmul_tflops  # noqa: E402
from harness.bench_timing import synthetic_tokens  # noqa: E402
from harness.build import build_model, build_optimizer  # noqa: E402
from harness.step.loss import loss_from_hidden  # noqa: E402
from harness.step.standard import TrainStep  # noqa: E402
from models.lora import LoRALinear  # noqa: E402
from models.quant import QuantizedLinear  # noqa: E402


def layer_backward(layer: nn.Module, x: mx.array, cotangent: mx.array):
    """A synchronized call of the compiled forward + backward of `layer` at `x`: the gradients of its input and
    of its trainable arrays (none once the adapters are taken out)."""
    trainable = tree_flatten(layer.trainable_parameters())
    names, arrays = [name for name, _ in trainable], [array for _, array in trainable]

    def forward(x, *params):
        own = layer.trainable_parameters()
        layer.update(tree_unflatten(list(zip(names, params))))
        try:
            return layer(x, "causal")
        finally:
            layer.update(own)

    backward = mx.compile(lambda x, *params: mx.vjp(forward, [x, *params], [cotangent])[1])
    return lambda: mx.eval(backward(x, *arrays))


def without_adapters(layer: nn.Module) -> nn.Module:
    """A copy of `layer` whose LoRA projections are their frozen base layers again."""
    layer = copy.deepcopy(layer)
    for name, module in list(layer.named_modules()):
        for key, child in list(module.children().items()):
            if isinstance(child, LoRALinear):
                setattr(module, key, child.base_layer)
    return layer


def dense(layer: nn.Module, dtype: mx.Dtype) -> nn.Module:
    """A copy of `layer` whose quantized projections are `nn.Linear` on their dequantized weights."""
    layer = copy.deepcopy(layer)
    for name, module in list(layer.named_modules()):
        for key, child in list(module.children().items()):
            if isinstance(child, QuantizedLinear):
                out_features, in_features = child.dequantize(dtype).shape
                linear = nn.Linear(in_features, out_features, bias=False)
                linear.weight = child.dequantize(dtype)
                setattr(module, key, linear)
    layer.freeze()
    return layer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", default=["model=mistral-7b-shape"])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--tag", default="", help="appended to the JSON file's name")
    options = parser.parse_args()
    cfg = compose([*options.overrides, "trainer.cpu_streams=1"])
    rows, seq = options.rows, options.seq
    table = ProfileTable(width=62)
    record = table.record

    print(f"device {mx.default_device()}, overrides {options.overrides}, {rows}x{seq}", flush=True)
    model = build_model(cfg, progress=False)
    optimizer = build_optimizer(cfg.optim, model, total_steps=1000)
    args, layers = model.args, len(model.model.layers)
    dtype = model.dtype
    mx.eval(model.parameters())
    model.train()
    tokens = synthetic_tokens(rows, seq, args.vocab_size)
    batch = {"input_ids": tokens, "labels": tokens, "attention_mask": mx.ones_like(tokens)}
    step = TrainStep(model, optimizer, grad_clip=cfg.optim.grad_clip)
    record(f"whole step {rows}x{seq} (ms)", median_ms(
        lambda: mx.eval(step([batch]), model.trainable_parameters(), optimizer.state)))
    record(f"in-run matmul rate, {str(dtype).replace('mlx.core.', '')} (TFLOP/s)", matmul_tflops(dtype))

    layer = model.model.layers[0]
    x = mx.random.normal((rows, seq, args.hidden_size)).astype(dtype)
    cotangent = mx.random.normal(x.shape).astype(dtype)
    mx.eval(x, cotangent)
    record(f"layer forward + backward, as trained x{layers} (ms)",
           median_ms(layer_backward(layer, x, cotangent)) * layers)
    base = without_adapters(layer)
    record(f"  without adapters x{layers} (ms)", median_ms(layer_backward(base, x, cotangent)) * layers)
    dense_base = dense(base, dtype)
    mx.eval(dense_base.parameters())
    record(f"  without adapters, dense weights x{layers} (ms)",
           median_ms(layer_backward(dense_base, x, cotangent)) * layers)

    # The seven projections' matmuls alone: forward (x @ W^T) and input gradient (dy @ W) on dense weights.
    linears = [m for _, m in dense_base.named_modules() if isinstance(m, nn.Linear)]
    tokens_2d = rows * seq
    operands = []
    for linear in linears:
        out_features, in_features = linear.weight.shape
        operands.append((linear.weight, mx.random.normal((tokens_2d, in_features)).astype(dtype),
                         mx.random.normal((tokens_2d, out_features)).astype(dtype)))
    mx.eval(operands)
    matmuls = mx.compile(lambda: [o for w, a, g in operands for o in (a @ w.T, g @ w)])
    record(f"projection matmuls alone, forward + input gradient x{layers} (ms)",
           median_ms(lambda: mx.eval(matmuls())) * layers)

    heads, kv_heads, head_dim = args.num_attention_heads, args.num_key_value_heads, args.head_dim
    q = mx.random.normal((rows, heads, seq, head_dim)).astype(dtype)
    k, v = (mx.random.normal((rows, kv_heads, seq, head_dim)).astype(dtype) for _ in range(2))
    attention_cotangent = mx.random.normal(q.shape).astype(dtype)
    mx.eval(q, k, v, attention_cotangent)

    def attention(q, k, v):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=head_dim**-0.5, mask="causal")

    attention_backward = mx.compile(lambda q, k, v: mx.vjp(attention, [q, k, v], [attention_cotangent])[1])
    record(f"attention alone, forward + backward x{layers} (ms)",
           median_ms(lambda: mx.eval(attention_backward(q, k, v))) * layers)

    labels = batch["labels"]
    head = mx.compile(lambda h: mx.vjp(lambda h: loss_from_hidden(model, model.final_norm(h), labels)[0], [h],
                                       [mx.array(1.0)])[1])
    record("final norm, head and loss, forward + backward (ms)", median_ms(lambda: mx.eval(head(x))))
    _, n_tokens, grads = step._gradients(batch)
    mx.eval(n_tokens, grads)
    record("optimizer update (ms)", median_ms(
        lambda: mx.eval(step._update(grads, n_tokens), model.trainable_parameters(), optimizer.state)))
    table.write(f"large_step_profile{options.tag}", overrides=options.overrides, rows=rows, seq=seq)


if __name__ == "__main__":
    main()
