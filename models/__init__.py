"""The MLX QLoRA stack: Mistral model, 4-bit quantization, LoRA, checkpoint I/O and export.

`models` never imports `harness`: it knows nothing of Hydra, W&B or Dolly, so it can be used alone.
"""

from models import blas, malloc

blas.load_fast_blas()  # must run before the first `import mlx` (see models/blas.py)
malloc.tune_malloc()  # reuse freed CPU buffers instead of fresh pages (see models/malloc.py)

from models.mistral import KVCache, MistralForCausalLM, ModelArgs, ModelConfigError  # noqa: E402

# Public names, imported on first use so `import models` stays cheap.
_LAZY = {
    "load_pretrained": "models.loading",
    "save_pretrained": "models.export",
    "load_tokenizer": "models.tokenizer",
    "Tokenizer": "models.tokenizer",
    "TokenizerError": "models.tokenizer",
    "PretrainedWeightsError": "models.loading",
    "QuantSpec": "models.quant",
    "QuantizedLinear": "models.quant",
    "quantize_model": "models.quant",
    "quantize_layer": "models.quant",
    "quantized_shell": "models.quant",
    "model_bits_per_weight": "models.quant",
    "LoRASpec": "models.lora",
    "LoRALinear": "models.lora",
    "apply_lora": "models.lora",
    "merge_lora": "models.lora",
    "trainable_parameter_count": "models.lora",
    "AdapterError": "models.adapters",
    "save_adapters": "models.adapters",
    "load_adapters": "models.adapters",
    "save_peft_adapters": "models.adapters",
    "export_merged": "models.export",
    "enable_gradient_checkpointing": "models.recompute",
    "linear_cross_entropy": "models.cross_entropy",
}

__all__ = ["KVCache", "MistralForCausalLM", "ModelArgs", "ModelConfigError", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'models' has no attribute {name!r}")
