"""Save and load LoRA adapters alone: our format, and PEFT's.

Our format: `adapters.safetensors` (keys as in the model, `model.layers.0.self_attn.q_proj.lora_A`) plus
`adapter_config.json` holding everything needed to rebuild the adapters (rank, alpha, dropout, targets,
layers, base model id, quantization spec, format version). PEFT's format: `adapter_model.safetensors` with
keys `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` plus PEFT's `adapter_config.json`,
loadable with `peft.PeftModel.from_pretrained` on the full-precision base.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from models.atomic_files import atomic_save_safetensors, atomic_write_text
from models.json_files import read_json_object
from models.lora import LoRALinear, LoRASpec, apply_lora
from models.quant import QuantizedLinear, QuantSpec

ADAPTER_WEIGHTS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
FORMAT_VERSION = 1


class AdapterError(ValueError):
    """An adapter directory that cannot be loaded onto this model; the message names the file."""


def lora_weights(model: nn.Module) -> dict[str, mx.array]:
    """The adapter arrays of `model`, keyed by their path (`model.layers.0.self_attn.q_proj.lora_A`)."""
    weights = {}
    for path, module in model.named_modules():
        if isinstance(module, LoRALinear):
            weights[f"{path}.lora_A"] = module.lora_A
            weights[f"{path}.lora_B"] = module.lora_B
    return weights


def _model_quant_spec(model: nn.Module) -> dict[str, Any] | None:
    """The quantization of the model's base, as recorded by its quantized layers (None if dense)."""
    for _, module in model.named_modules():
        if isinstance(module, QuantizedLinear):
            return {"method": module.method, "bits": module.bits, "group_size": module.group_size,
                    "double_quant": "absmax_q" in module}
    return None


def save_adapters(
    model: nn.Module,
    out_dir: str | os.PathLike,
    spec: LoRASpec,
    *,
    base_model: str,
    quant: QuantSpec | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write `adapters.safetensors` and `adapter_config.json` to `out_dir` (created), atomically.

    `base_model` is the id or path the base was loaded from; `quant` the spec it was quantized with (read
    from the model's layers when omitted); `extra` is stored as-is (e.g. the training step). Returns out_dir.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = lora_weights(model)
    if not weights:
        raise ValueError("the model has no LoRA adapters to save (call apply_lora first)")
    config = {
        "format_version": FORMAT_VERSION,
        "lora": spec.to_dict(),
        "base_model": str(base_model),
        "quant": quant.to_dict() if quant is not None else _model_quant_spec(model),
        "num_hidden_layers": len(model.model.layers),
        "extra": extra or {},
    }
    atomic_save_safetensors(out / ADAPTER_WEIGHTS, {k: v.astype(mx.float32) for k, v in weights.items()})
    atomic_write_text(out / ADAPTER_CONFIG, json.dumps(config, indent=2) + "\n")
    return out


def read_adapter_config(adapter_dir: str | os.PathLike) -> dict[str, Any]:
    """The parsed `adapter_config.json` of `adapter_dir`, checked for the keys `load_adapters` needs."""
    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not path.is_file():
        raise AdapterError(f"{path}: no adapter config here (expected {ADAPTER_CONFIG} from save_adapters)")
    config = read_json_object(path, AdapterError, "an adapter config")
    if "peft_type" in config:
        raise AdapterError(f"{path}: this is a PEFT adapter config; load it with peft.PeftModel.from_pretrained")
    for key in ("format_version", "lora", "base_model"):
        if key not in config:
            raise AdapterError(f"{path}: missing key {key!r}")
    if not isinstance(config["format_version"], int) or not isinstance(config["lora"], dict):
        raise AdapterError(f"{path}: 'format_version' must be an integer and 'lora' an object")
    if config["format_version"] > FORMAT_VERSION:
        raise AdapterError(f"{path}: format_version {config['format_version']} is newer than this code ({FORMAT_VERSION})")
    try:
        config["lora_spec"] = LoRASpec(**config["lora"])
    except (TypeError, ValueError) as err:
        raise AdapterError(f"{path}: bad 'lora' section: {err}") from err
    return config


def load_adapters(model: nn.Module, adapter_dir: str | os.PathLike) -> nn.Module:
    """Apply LoRA to `model` as `adapter_dir/adapter_config.json` describes, then load the saved weights.

    `model` is the base (quantized or not); if it already has adapters (resuming training), they must be
    the ones the config describes and only their values are replaced. Raises `AdapterError` naming the file for an
    unreadable file, missing or unexpected keys, or shapes that do not fit this base. Returns `model`.
    """
    config = read_adapter_config(adapter_dir)
    spec: LoRASpec = config["lora_spec"]
    path = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise AdapterError(f"{path}: adapter weights missing")
    try:
        saved = mx.load(str(path))
    except Exception as err:  # MLX raises RuntimeError/ValueError variants for truncated or foreign files
        raise AdapterError(f"{path}: cannot read safetensors ({err})") from err
    num_layers = config.get("num_hidden_layers")
    if num_layers is not None and num_layers != len(model.model.layers):
        raise AdapterError(
            f"{path}: adapters were trained on a base with {num_layers} layers; this model has "
            f"{len(model.model.layers)}"
        )
    if not lora_weights(model):  # a model that already carries adapters (resuming) only gets new values
        try:
            apply_lora(model, spec)
        except ValueError as err:
            raise AdapterError(f"{Path(adapter_dir) / ADAPTER_CONFIG}: {err}") from err
    expected = lora_weights(model)
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    if missing:
        raise AdapterError(f"{path}: missing key {missing[0]!r} ({len(missing)} missing in all)")
    if unexpected:
        raise AdapterError(f"{path}: unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected in all)")
    for key, value in expected.items():
        if saved[key].shape != value.shape:
            raise AdapterError(
                f"{path}: {key} has shape {tuple(saved[key].shape)}, but this base needs {tuple(value.shape)}"
            )
    check_finite(saved, path)
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear) and module.alpha != spec.alpha:
            raise AdapterError(
                f"{Path(adapter_dir) / ADAPTER_CONFIG}: lora alpha {spec.alpha} differs from this model's "
                f"adapters ({name}: alpha {module.alpha})"
            )
    model.load_weights(list(saved.items()), strict=False)
    mx.eval(model.trainable_parameters())
    return model


def check_finite(arrays: dict[str, mx.array], path: str | os.PathLike) -> None:
    """Raise `AdapterError` naming `path` and the first tensor holding NaN or inf (a damaged file)."""
    for key, value in arrays.items():
        if mx.issubdtype(value.dtype, mx.inexact) and not mx.all(mx.isfinite(value)).item():
            raise AdapterError(f"{path}: tensor {key!r} holds NaN or inf values; the file is damaged")


def peft_key(path: str, matrix: str) -> str:
    """PEFT's name for an adapter matrix: `base_model.model.<path>.lora_A.weight`."""
    return f"base_model.model.{path}.{matrix}.weight"


def save_peft_adapters(
    model: nn.Module, out_dir: str | os.PathLike, spec: LoRASpec, base_model: str
) -> Path:
    """Write the adapters in PEFT's format (`adapter_model.safetensors`, `adapter_config.json`), atomically.

    Loadable with `peft.PeftModel.from_pretrained(<full-precision HF base>, out_dir)`. Returns out_dir.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = {}
    for key, value in lora_weights(model).items():
        path, matrix = key.rsplit(".", 1)
        weights[peft_key(path, matrix)] = value.astype(mx.float32)
    if not weights:
        raise ValueError("the model has no LoRA adapters to save (call apply_lora first)")
    layers = spec.layer_indices(len(model.model.layers))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base_model),
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "target_modules": list(spec.target_modules),
        "layers_to_transform": None if spec.layers is None else layers,
        "layers_pattern": None if spec.layers is None else "layers",
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
        "revision": None,
    }
    atomic_save_safetensors(out / PEFT_WEIGHTS, weights, metadata={"format": "pt"})
    atomic_write_text(out / ADAPTER_CONFIG, json.dumps(config, indent=2) + "\n")
    return out
