"""Write a model as a Hugging Face directory: `config.json`, sharded safetensors, the shard index, tokenizer.

The directory loads with `transformers.AutoModelForCausalLM.from_pretrained` and with `models.load_pretrained`.
`export_merged` folds LoRA adapters into dequantized weights first.
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
from models.lora import merge_lora
from models.tokenizer import Tokenizer, load_tokenizer

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3  # Hugging Face's default shard size


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
    mx_dtype = compute_dtype(dtype) if isinstance(dtype, str) else dtype
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = _dense_state(model)
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
        arrays = {k: state[k].astype(mx_dtype) for k in keys}
        atomic_save_safetensors(out / name, arrays, metadata={"format": "pt"})
        weight_map.update({k: name for k in keys})
    for stale in out.glob("model*.safetensors"):
        if stale.name not in names:
            stale.unlink()
    index = out / INDEX_FILE
    if len(shards) > 1:
        total = sum(v.size for v in state.values()) * mx_dtype.size
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
    dtype: str | mx.Dtype = "float32",
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: bool = True,
) -> Path:
    """Merge adapters into dequantized weights (in place: `model` becomes dense) and save a HF directory.

    Writes what `save_pretrained` writes plus `tokenizer` (a `Tokenizer`, or a source `load_tokenizer` reads:
    a `.gguf`, `tokenizer.json` or `tokenizer.model` file or a directory), saved so that `transformers` loads
    the directory alone (`Tokenizer.save`). Returns out_dir.
    """
    mx_dtype = compute_dtype(dtype) if isinstance(dtype, str) else dtype
    merge_lora(model, mx_dtype)
    out = save_pretrained(model, out_dir, dtype=mx_dtype, max_shard_bytes=max_shard_bytes, progress=progress)
    if tokenizer is not None:
        (tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)).save(out)
    return out
