"""A small quantized Mistral with LoRA whose adapters all receive gradients, for comparing training steps."""

import mlx.core as mx

from models.recompute import enable_gradient_checkpointing
from models.lora import LoRASpec, apply_lora
from models.mistral import MistralForCausalLM, ModelArgs
from models.quant import QuantSpec, quantize_model


def tiny_lora_model(*, num_layers=3, lora_layers=None, dropout=0.0, checkpointing=False):
    """Seeded (the same weights every call), row-wise 4-bit, LoRA r=4, sliding window 12, in training mode."""
    mx.random.seed(0)
    args = ModelArgs(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
                     num_attention_heads=4, num_key_value_heads=2, sliding_window=12)
    model = MistralForCausalLM(args)
    quantize_model(model, QuantSpec("rowwise"))
    apply_lora(model, LoRASpec(rank=4, layers=lora_layers, dropout=dropout))
    for _, module in model.named_modules():  # non-zero B, so gradients reach A as well
        if "lora_B" in module:
            module.lora_B = 0.05 * mx.random.normal(module.lora_B.shape)
    if checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    return model
