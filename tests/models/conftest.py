"""Fixtures for the quantization, LoRA, adapter and export tests: tiny MLX Mistrals built directly."""

import mlx.core as mx
import numpy as np
import pytest

from models.mistral import MistralForCausalLM, ModelArgs

# GQA (4 query heads over 2 kv heads), hidden 64 so NF4's 64-weight blocks and MLX's groups tile every row.
TINY_ARGS = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    sliding_window=8,
    max_position_embeddings=128,
)


def build_tiny_model(seed: int = 0, **overrides) -> MistralForCausalLM:
    """A random tiny Mistral whose weights (std 0.1, norms around 1) make logits vary enough to compare."""
    mx.random.seed(seed)
    model = MistralForCausalLM(ModelArgs(**{**TINY_ARGS, **overrides}))
    params = {}
    from mlx.utils import tree_flatten, tree_unflatten

    for key, value in tree_flatten(model.parameters()):
        if key.endswith("norm.weight"):
            params[key] = mx.random.uniform(0.5, 1.5, value.shape)
        else:
            params[key] = 0.1 * mx.random.normal(value.shape)
    model.update(tree_unflatten(list(params.items())))
    mx.eval(model.parameters())
    return model


def random_ids(batch: int = 2, length: int = 12, vocab: int = 256, seed: int = 0) -> mx.array:
    return mx.array(np.random.default_rng(seed).integers(0, vocab, size=(batch, length), dtype=np.int32))


@pytest.fixture
def tiny_model():
    return build_tiny_model()
