"""Write a random-weight Mistral checkpoint in Hugging Face format, for load and memory benchmarks.

    python -m benchmarks.make_checkpoint --preset 7b            # -> artifacts/checkpoints/mistral-7b-random
    python -m benchmarks.make_checkpoint --preset tiny --out /tmp/tiny

Output: `config.json`, bfloat16 weights in `model-0000i-of-0000n.safetensors` shards with
`model.safetensors.index.json`, and the real Mistral-7B `tokenizer.model` shipped with mistral_common.
Tensors are generated and written one at a time (safetensors written by streaming: header first, then each
tensor's bytes), so memory stays at one tensor (~0.5 GB for the 7B embedding) however large the model is.
The output lives under `artifacts/` (git-ignored); a 7B checkpoint takes 14.5 GB of disk.
"""

from __future__ import annotations

import models  # noqa: F401  (loads the fast BLAS before MLX)

import argparse
import json
import math
import os
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
from tqdm.auto import tqdm

from models.mistral import ModelArgs

PRESETS = {
    # Same vocabulary as the real tokenizer, so text can be encoded for it.
    "tiny": dict(
        vocab_size=32000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=16,
        max_position_embeddings=512,
    ),
    # Mistral-7B-v0.1's shape.
    "7b": dict(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        sliding_window=4096,
        max_position_embeddings=32768,
    ),
}
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3  # transformers' default shard size
INIT_STD = 0.02  # transformers' `initializer_range` for Mistral


def tensor_shapes(args: ModelArgs) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of a Hugging Face `MistralForCausalLM` checkpoint, in file order, with its shape."""
    hidden, heads, kv = args.hidden_size, args.num_attention_heads, args.num_key_value_heads
    q_size, kv_size = heads * args.head_dim, kv * args.head_dim
    shapes = [("model.embed_tokens.weight", (args.vocab_size, hidden))]
    for i in range(args.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes += [
            (p + "input_layernorm.weight", (hidden,)),
            (p + "self_attn.q_proj.weight", (q_size, hidden)),
            (p + "self_attn.k_proj.weight", (kv_size, hidden)),
            (p + "self_attn.v_proj.weight", (kv_size, hidden)),
            (p + "self_attn.o_proj.weight", (hidden, q_size)),
            (p + "post_attention_layernorm.weight", (hidden,)),
            (p + "mlp.gate_proj.weight", (args.intermediate_size, hidden)),
            (p + "mlp.up_proj.weight", (args.intermediate_size, hidden)),
            (p + "mlp.down_proj.weight", (hidden, args.intermediate_size)),
        ]
    shapes.append(("model.norm.weight", (hidden,)))
    if not args.tie_word_embeddings:
        shapes.append(("lm_head.weight", (args.vocab_size, hidden)))
    return shapes


def random_bf16(name: str, shape: tuple[int, ...], key: mx.array) -> np.ndarray:
    """A bfloat16 tensor as its uint16 bit pattern: ones for norms, N(0, INIT_STD) for the rest."""
    if name.endswith("norm.weight"):
        values = mx.ones(shape, mx.bfloat16)
    else:
        values = (mx.random.normal(shape, key=key) * INIT_STD).astype(mx.bfloat16)
    return np.array(values.view(mx.uint16))


def plan_shards(shapes, max_shard_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Split tensors, in order, into shards of at most `max_shard_bytes` (a larger tensor gets its own)."""
    shards, current, size = [], [], 0
    for name, shape in shapes:
        nbytes = 2 * math.prod(shape)
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += nbytes
    shards.append(current)
    return shards


def write_safetensors_streaming(path: Path, tensors, make, bar=None) -> None:
    """Write a bfloat16 safetensors file tensor by tensor; `make(name, shape)` returns the uint16 bits.

    The header (names, shapes, byte offsets) is known before any data, so each tensor is written as soon
    as it is made and dropped. Written to a temporary name and renamed, so a partial file is never left.
    """
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in tensors:
        nbytes = 2 * math.prod(shape)
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format pads the header to an 8-byte boundary
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for name, shape in tensors:
            data = make(name, shape)
            assert data.dtype == np.uint16 and data.shape == tuple(shape), name
            f.write(np.ascontiguousarray(data).tobytes())
            if bar is not None:
                bar.update(data.nbytes)
    os.replace(tmp, path)


def make_checkpoint(
    out_dir: Path,
    config: dict,
    *,
    seed: int = 0,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: bool = True,
) -> Path:
    """Write a random-weight HF Mistral checkpoint with hyperparameters `config` (MistralConfig keys)."""
    from models.tokenizer import default_tokenizer_path

    args = ModelArgs.from_hf_config({"model_type": "mistral", **config})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shapes = tensor_shapes(args)
    shards = plan_shards(shapes, max_shard_bytes)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    total = sum(2 * math.prod(shape) for _, shape in shapes)
    keys = iter(mx.random.split(mx.random.key(seed), len(shapes)))
    with tqdm(
        total=total, unit="B", unit_scale=True, desc=f"write {out_dir.name}", disable=not progress
    ) as bar:
        for name, tensors in zip(names, shards):
            write_safetensors_streaming(
                out_dir / name, tensors, lambda n, s: random_bf16(n, s, next(keys)), bar
            )
    index = {
        "metadata": {"total_size": total},
        "weight_map": {tensor: name for name, tensors in zip(names, shards) for tensor, _ in tensors},
    }
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    hf_config = {**args.to_hf_config(), "torch_dtype": "bfloat16", "dtype": "bfloat16"}
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    try:
        shutil.copyfile(default_tokenizer_path(), out_dir / "tokenizer.model")
    except ModuleNotFoundError:  # e.g. a GPU machine for load/step benchmarks only: the weights need no tokenizer
        print("mistral_common is not installed: no tokenizer.model written")
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument(
        "--out", type=Path, help="output directory (default artifacts/checkpoints/mistral-<preset>-random)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-shard-gb", type=float, default=DEFAULT_MAX_SHARD_BYTES / 1024**3)
    parser.add_argument("--no-progress", action="store_true")
    opts = parser.parse_args(argv)
    out = opts.out or Path("artifacts") / "checkpoints" / f"mistral-{opts.preset}-random"
    make_checkpoint(
        out,
        PRESETS[opts.preset],
        seed=opts.seed,
        max_shard_bytes=int(opts.max_shard_gb * 1024**3),
        progress=not opts.no_progress,
    )
    print(out)


if __name__ == "__main__":
    main()
