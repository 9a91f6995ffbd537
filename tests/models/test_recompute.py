"""Gradient checkpointing changes memory, never results."""

import mlx.core as mx
from mlx import nn
from mlx.utils import tree_flatten

from models.recompute import (
    disable_gradient_checkpointing,
    enable_gradient_checkpointing,
    gradient_checkpointing_enabled,
)
from models.lora import LoRASpec, apply_lora
from models.mistral import MistralDecoderLayer
from models.quant import QuantizedLinear, QuantSpec, quantize_model
from tests.models.conftest import build_tiny_model, random_ids


def adapted_model():
    model = build_tiny_model()
    quantize_model(model, QuantSpec("rowwise"))
    apply_lora(model, LoRASpec(rank=4))
    for _, module in model.named_modules():  # non-zero B, so gradients reach A as well
        if "lora_B" in module:
            module.lora_B = 0.05 * mx.random.normal(module.lora_B.shape)
    return model


def loss_and_grads(model, ids):
    def loss_fn(model):
        return nn.losses.cross_entropy(model(ids[:, :-1]), ids[:, 1:]).mean()

    loss, grads = nn.value_and_grad(model, loss_fn)(model)
    mx.eval(loss, grads)
    return loss, dict(tree_flatten(grads))


def test_gradients_identical_with_and_without_checkpointing(monkeypatch):
    paths = []
    choose_path = QuantizedLinear.choose_path
    monkeypatch.setattr(QuantizedLinear, "choose_path", lambda self, x: paths.append(choose_path(self, x)) or paths[-1])
    model = adapted_model()
    ids = random_ids(length=16)
    loss_plain, grads_plain = loss_and_grads(model, ids)
    assert set(paths) == {"dequantize"}  # the backward pass rebuilds each dense weight
    enable_gradient_checkpointing(model)
    assert gradient_checkpointing_enabled(model)
    paths.clear()
    loss_ckpt, grads_ckpt = loss_and_grads(model, ids)
    assert set(paths) == {"dequantize_saved"}  # recomputation keeps them for the backward pass instead
    assert loss_ckpt.item() == loss_plain.item()
    assert grads_ckpt.keys() == grads_plain.keys() and len(grads_plain) == 2 * 2 * 7
    for key in grads_plain:
        assert mx.allclose(grads_ckpt[key], grads_plain[key], rtol=1e-5, atol=1e-7), key


def test_checkpointing_touches_only_the_given_model_and_keeps_names():
    model, other = adapted_model(), build_tiny_model()
    names = [k for k, _ in tree_flatten(model.parameters())]
    enable_gradient_checkpointing(model)
    assert [k for k, _ in tree_flatten(model.parameters())] == names
    assert isinstance(model.model.layers[0], MistralDecoderLayer)
    assert type(other.model.layers[0]) is MistralDecoderLayer
    disable_gradient_checkpointing(model)
    assert type(model.model.layers[0]) is MistralDecoderLayer


def peak_training_memory(checkpointing: bool) -> int:
    """Peak bytes of one loss-and-gradient evaluation of an 8-layer QLoRA model on 4 x 255 tokens."""
    model = build_tiny_model(num_hidden_layers=8, hidden_size=128, intermediate_size=512, sliding_window=None)
    quantize_model(model, QuantSpec("rowwise"))
    apply_lora(model, LoRASpec(rank=4))
    if checkpointing:
        enable_gradient_checkpointing(model)
    ids = random_ids(batch=4, length=256)
    mx.clear_cache()
    mx.reset_peak_memory()
    resting = mx.get_active_memory()
    loss_and_grads(model, ids)
    return mx.get_peak_memory() - resting


def test_checkpointing_cuts_activation_memory():
    # measured: about 155 MiB without, 57 MiB with (8 layers' activations vs one layer's plus the inputs)
    assert peak_training_memory(True) < 0.6 * peak_training_memory(False)


def test_checkpointed_dropout_gradients_are_those_of_the_loss():
    """With adapter dropout the recomputation must draw the forward pass's masks: the gradient then predicts how
    the loss (under the same random state, hence the same masks) changes along a direction."""
    model = build_tiny_model()
    quantize_model(model, QuantSpec("rowwise"))
    apply_lora(model, LoRASpec(rank=4, dropout=0.3))
    for _, module in model.named_modules():  # non-zero B, so gradients reach A
        if "lora_B" in module:
            module.lora_B = 0.05 * mx.random.normal(module.lora_B.shape)
    enable_gradient_checkpointing(model)
    model.train()
    ids = random_ids(2, 12, model.args.vocab_size, seed=3)
    layer = model.model.layers[0].self_attn.q_proj
    direction = mx.random.normal(layer.lora_A.shape, key=mx.random.key(9))
    start = layer.lora_A

    def loss_at(a):
        layer.lora_A = a
        mx.random.seed(5)  # the same dropout masks at every evaluation
        return nn.losses.cross_entropy(model(ids[:, :-1]), ids[:, 1:]).sum()

    mx.random.seed(5)
    grad = mx.grad(loss_at)(start)
    eps = 1e-2
    change = (loss_at(start + eps * direction) - loss_at(start - eps * direction)) / (2 * eps)
    predicted = (grad * direction).sum()
    assert abs(predicted.item() - change.item()) < 2e-2 * abs(change.item()), (predicted.item(), change.item())
