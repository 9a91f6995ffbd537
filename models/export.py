"""Write a model as a Hugging Face directory: `config.json`, sharded safetensors, the shard index, tokenizer.

The directory loads with `transformers.AutoModelForCausalLM.from_pretrained` and with `models.load_pretrained`.
`export_merged` folds LoRA adapters into dequantized weights as it writes: each tensor is a lazy expression of the
quantized base and the adapters (`merged_state`), and only one shard's tensors are computed at a time, so the peak
is the quantized model plus one output shard, never the whole dense model. The model itself is left unchanged.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from models.adapters import atomic_save_safetensors, atomic_write_text
from models.backend import compute_dtype, dtype_name
from models.lora import LoRALinear
from models.memory import release_cache
from models.quant import QuantizedEmbedding, QuantizedLinear
from models.tokenizer import Tokenizer, load_tokenizer

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3  # Hugging Face's default shard size
# dtype="auto" writes bfloat16 from this many parameters on (a 7B model in float32 is about 29 GB), float32 below.
BFLOAT16_FROM_PARAMETERS = 1_000_000_000


def export_dtype(model: nn.Module, dtype: str | mx.Dtype) -> mx.Dtype:
    """The dtype to write: `dtype` itself, or for "auto" bfloat16 for models of `BFLOAT16_FROM_PARAMETERS` or
    more parameters (counted dense: a quantized weight counts its full shape) and float32 for smaller ones."""
    if not isinstance(dtype, str):
        return dtype
    if dtype != "auto":
        return compute_dtype(dtype)
    parameters = sum(value.size for value in merged_state(model, mx.float32).values())  # shapes only, lazy
    return mx.bfloat16 if parameters >= BFLOAT16_FROM_PARAMETERS else mx.float32


def merged_state(model: nn.Module, dtype: mx.Dtype) -> dict[str, mx.array]:
    """HF-named tensors of `model` as a dense model would hold them, in `dtype`, none of them computed yet:
    adapters merged into their base (`dequantize(base) + (alpha/r) B A`, float32 math), quantized linears and
    embeddings dequantized, every other array cast. Evaluating a few at a time bounds the memory they need."""
    state: dict[str, mx.array] = {}

    def visit(prefix: str, node) -> None:
        if isinstance(node, LoRALinear):
            base = node.base_layer
            dense = base.dequantize(mx.float32) if isinstance(base, QuantizedLinear) else base.weight.astype(mx.float32)
            state[f"{prefix}weight"] = (dense + node.delta_weight(mx.float32)).astype(dtype)
            if "bias" in base:
                state[f"{prefix}bias"] = base.bias.astype(dtype)
        elif isinstance(node, (QuantizedLinear, QuantizedEmbedding)):
            state[f"{prefix}weight"] = node.dequantize(dtype)
            if isinstance(node, QuantizedLinear) and "bias" in node:
                state[f"{prefix}bias"] = node.bias.astype(dtype)
        elif isinstance(node, mx.array):
            state[prefix[:-1]] = node.astype(dtype)
        elif isinstance(node, dict):  # modules too; "_"-prefixed entries are not parameters (MLX's rule)
            for key, child in node.items():
                if not str(key).startswith("_"):
                    visit(f"{prefix}{key}.", child)
        elif isinstance(node, (list, tuple)):
            for index, child in enumerate(node):
                visit(f"{prefix}{index}.", child)

    visit("", model)
    return state


def _dense_state(model: nn.Module) -> dict[str, mx.array]:
    """HF-named parameters of a model of plain modules; refuses quantized or adapter layers."""
    state = dict(tree_flatten(model.parameters()))
    odd = [k for k in state if ".lora_" in k or ".base_layer." in k or k.endswith((".scales", ".absmax_q", ".absmax"))]
    if odd or any(v.dtype in (mx.uint32, mx.uint8) for v in state.values()):
        example = odd[0] if odd else next(k for k, v in state.items() if v.dtype in (mx.uint32, mx.uint8))
        raise ValueError(
            f"parameter {example!r} is quantized or a LoRA adapter; call merge_lora (or export_merged) first"
        )
    return state


def _shards(state: dict[str, mx.array], max_shard_bytes: int, nbytes_per_element: int) -> list[list[str]]:
    """Split keys, in order, into shards of at most `max_shard_bytes` (a single larger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for key, value in state.items():
        nbytes = value.size * nbytes_per_element
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards


def save_pretrained(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    dtype: str | mx.Dtype = "float32",
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: bool = True,
) -> Path:
    """Write `model` (plain modules, HF names) to `out_dir` in Hugging Face's format.

    Weights are cast to `dtype` ("float32", "bfloat16", "float16") and split into safetensors shards of at
    most `max_shard_bytes` bytes (`model-00001-of-0000N.safetensors` plus `model.safetensors.index.json`;
    a single `model.safetensors` when one shard suffices), with metadata `{"format": "pt"}`. Each file is
    written to a temporary name and renamed into place; shards of an earlier export are removed.
    """
    mx_dtype = export_dtype(model, dtype)
    state = {k: v.astype(mx_dtype) for k, v in _dense_state(model).items()}
    return _write_hf_directory(model, state, out_dir, mx_dtype, max_shard_bytes, progress)


def _write_hf_directory(
    model: nn.Module, state: dict[str, mx.array], out_dir, mx_dtype: mx.Dtype, max_shard_bytes: int, progress: bool
) -> Path:
    """Write `state` (lazy arrays in `mx_dtype`, consumed) as shards + index + `config.json`; one shard's
    arrays are computed at a time and released once written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    total = sum(v.size for v in state.values()) * mx_dtype.size
    shards = _shards(state, max_shard_bytes, mx_dtype.size)
    names = (
        [SINGLE_FILE]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    keys_iter = zip(names, shards)
    if progress:
        from tqdm import tqdm

        keys_iter = tqdm(list(keys_iter), desc=f"write {out.name}", unit="shard")
    weight_map = {}
    for name, keys in keys_iter:
        arrays = {}
        for key in keys:  # one tensor at a time: only its own float32 temporaries exist beside the shard
            arrays[key] = state.pop(key)
            mx.eval(arrays[key])
        atomic_save_safetensors(out / name, arrays, metadata={"format": "pt"})
        weight_map.update({k: name for k in keys})
        del arrays
        release_cache()  # the shard's buffers go back to the system before the next shard is computed
    for stale in out.glob("model*.safetensors"):
        if stale.name not in names:
            stale.unlink()
    index = out / INDEX_FILE
    if len(shards) > 1:
        atomic_write_text(index, json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    else:
        index.unlink(missing_ok=True)
    config = model.args.to_hf_config()
    config["torch_dtype"] = config["dtype"] = dtype_name(mx_dtype)
    atomic_write_text(out / "config.json", json.dumps(config, indent=2) + "\n")
    return out


def export_merged(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    tokenizer: Tokenizer | str | os.PathLike | None = None,
    dtype: str | mx.Dtype = "auto",
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: bool = True,
) -> Path:
    """Save `model` (quantized or not, with or without LoRA adapters) as a dense HF directory, adapters merged.

    Tensors are merged and dequantized shard by shard as they are written (`merged_state`): the peak is the
    model plus one shard of `max_shard_bytes`. `model` is not changed. `dtype`: "float32", "bfloat16",
    "float16", or "auto" (`export_dtype`: bfloat16 for 7B-sized models, float32 for small ones). Writes what
    `save_pretrained` writes plus `tokenizer` (a `Tokenizer`, or a source `load_tokenizer` reads: a `.gguf`,
    `tokenizer.json` or `tokenizer.model` file or a directory), saved so that `transformers` loads the directory
    alone (`Tokenizer.save`). Returns out_dir.
    """
    mx_dtype = export_dtype(model, dtype)
    state = merged_state(model, mx_dtype)
    out = _write_hf_directory(model, state, out_dir, mx_dtype, max_shard_bytes, progress)
    if tokenizer is not None:
        (tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)).save(out)
    return out
