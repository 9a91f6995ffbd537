"""mlx-lm's QLoRA trainer on the shape `harness.bench` times ours on: the comparison anchor.

Built the way mlx-lm users get it: the Mistral architecture from `mlx_lm.models` (its "llama" module), weights
in bfloat16 quantized by `mlx.nn.quantize` to 4 bits in groups of 64 (as mlx-community's 4-bit checkpoints
are: every linear and the embedding), LoRA from `mlx_lm.tuner.utils.linear_to_lora_layers`, the loss
`mlx_lm.tuner.trainer.default_loss`, gradient checkpointing with `mlx_lm.tuner.trainer.grad_checkpoint`, and a
step compiled with the model and optimizer state as mlx-lm's trainer compiles its own.
Only `harness.bench` imports this module (mlx-lm is an optional dependency: `pip install -e '.[bench]'`).
"""

from __future__ import annotations

import dataclasses
import time
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten

from harness.bench_timing import StackTimes, build_peak_then_reset, synthetic_tokens, timed_runs
from harness.build import plain
from models.mistral import ATTENTION_PROJECTIONS, ModelArgs


def build_mlx_lm_model(arch: dict, quant_bits: int, group_size: int, lora: dict):
    from mlx_lm.models import llama
    from mlx_lm.tuner.utils import linear_to_lora_layers

    args = llama.ModelArgs.from_dict({"model_type": "mistral", **arch})
    model = llama.Model(args)
    model.set_dtype(mx.bfloat16)
    # Quantize one block at a time so a 7B model never exists in full precision.
    for layer in model.model.layers:
        nn.quantize(layer, group_size=group_size, bits=quant_bits)
        mx.eval(layer.parameters())
    nn.quantize(model, group_size=group_size, bits=quant_bits)
    mx.eval(model.parameters())
    model.freeze()
    keys = [f"{'self_attn' if m in ATTENTION_PROJECTIONS else 'mlp'}.{m}"
            for m in lora["target_modules"]]
    linear_to_lora_layers(model, args.num_hidden_layers,
                          {"rank": lora["rank"], "scale": lora["alpha"] / lora["rank"], "dropout": lora["dropout"],
                           "keys": keys})
    return model


def model_arch(cfg) -> dict:
    """The model's shape as Hugging Face config keys: `model.arch` for a random shape, else read from the
    checkpoint at `model.path` (its `config.json` or GGUF metadata), whose weights mlx-lm's stack does not load:
    it trains random weights of the same shape, as for a shape."""
    if cfg.model.arch is not None:
        return plain(cfg.model.arch)
    from models.loading import checkpoint_args

    return dataclasses.asdict(checkpoint_args(cfg.model.path))


def dolly_batches_mlx_lm(cfg, batch: int, count: int, vocab_size: int) -> list[tuple[mx.array, mx.array]]:
    """The records `harness.bench.dolly_batches` trains ours on, batched by mlx-lm's own `iterate_batches`
    (sorted by length, padded to a multiple of 32 plus one): `(tokens, (offset, length) rows)` per batch, the
    offset masking the prompt as our labels do."""
    from mlx_lm.tuner.trainer import iterate_batches

    from harness.bench_lengths import dolly_profile_examples

    examples = dolly_profile_examples(cfg, batch * count, vocab_size)
    dataset = [(e["input_ids"], sum(label == -100 for label in e["labels"])) for e in examples]
    return list(iterate_batches(dataset, batch, cfg.data.max_seq_len, seed=0))


def bench_mlx_lm(cfg, batch: int, seq: int, steps: int, warmup: int, *, process_start: float,
                 dolly_lengths: bool = False):
    """Time mlx-lm's compiled LoRA step on `cfg`'s model shape; `process_start` is when the process began.
    `dolly_lengths`: `steps` batches of Dolly-profile records instead (`harness.bench`'s module docstring)."""
    from mlx_lm.tuner.trainer import default_loss, grad_checkpoint

    arch = model_arch(cfg)
    model = build_mlx_lm_model(arch, cfg.quant.bits, 64, plain(cfg.lora))
    if cfg.trainer.gradient_checkpointing:
        grad_checkpoint(model.layers[0])
    optimizer = optim.AdamW(learning_rate=cfg.optim.lr)
    loss_value_and_grad = nn.value_and_grad(model, default_loss)
    state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(tokens, lengths):
        (loss, n_tokens), grads = loss_value_and_grad(model, tokens, lengths)
        optimizer.update(model, grads)
        return loss, n_tokens

    if dolly_lengths:
        batches = dolly_batches_mlx_lm(cfg, batch, steps, arch["vocab_size"])
    else:
        tokens = synthetic_tokens(batch, seq, arch["vocab_size"])
        batches = [(tokens, mx.array([[0, seq]] * batch))]
    model.train()
    build_peak = build_peak_then_reset(model.parameters(), optimizer.state, batches)
    steps_run = 0

    def run():
        nonlocal steps_run
        tokens, lengths = batches[steps_run % len(batches)]
        steps_run += 1
        mx.eval(step(tokens, lengths), model.trainable_parameters(), optimizer.state)

    run()
    first_step = time.perf_counter() - process_start
    real_tokens = padding = None
    if dolly_lengths:  # as ours: the rest of an untimed pass, then one timed pass
        times = timed_runs(run, warmup=len(batches) - 1, repeat=len(batches))
        real_tokens = sum(int(lengths[:, 1].sum()) for _, lengths in batches)
        total = sum(tokens.size for tokens, _ in batches)
        seq, padding = round(total / batch / len(batches)), 1 - real_tokens / total
    else:
        times = timed_runs(run, warmup=max(warmup - 1, 0), repeat=steps)
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    args = ModelArgs(**arch)
    return StackTimes(args, cfg.trainer.gradient_checkpointing, trainable, times, first_step, mx.bfloat16,
                      f"mlx group{cfg.quant.bits} g64", build_peak, seq=seq, real_tokens=real_tokens,
                      padding=padding or 0.0)
