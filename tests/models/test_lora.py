"""LoRA: identity at init, only adapters train, merged weights give the adapted model's logits."""

import math

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten

from models.lora import LoRALinear, LoRASpec, apply_lora, merge_lora, trainable_parameter_count
from models.quant import QuantizedLinear, QuantSpec, quantize_model
from tests.models.conftest import build_tiny_model, random_ids


def randomize_adapters(model, seed=0, std=0.05):
    """Give every lora_B non-zero values, as training would, so the adapters change the output."""
    mx.random.seed(seed)
    for _, module in model.named_modules():
        if isinstance(module, LoRALinear):
            module.lora_B = std * mx.random.normal(module.lora_B.shape)
    mx.eval(model.parameters())


@pytest.mark.parametrize("quant", [None, QuantSpec("rowwise"), QuantSpec("nf4")])
def test_lora_init_is_identity(quant):
    model = build_tiny_model()
    if quant is not None:
        quantize_model(model, quant)
    ids = random_ids()
    before = model(ids)
    apply_lora(model, LoRASpec(rank=4))
    assert mx.array_equal(model(ids), before)


def test_lora_init_follows_peft():
    layer = LoRALinear(nn.Linear(128, 32, bias=False), rank=8, alpha=16)
    assert layer.lora_A.shape == (8, 128) and layer.lora_B.shape == (32, 8)
    bound = 1 / math.sqrt(128)  # kaiming_uniform_(a=sqrt(5)) on a fan-in of 128
    a = np.array(layer.lora_A)
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.8 * bound and a.std() > 0.4 * bound
    assert not np.array(layer.lora_B).any()
    assert layer.scale == 2.0


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_lora_forward_is_base_plus_scaled_low_rank_update(dtype):
    base = nn.Linear(64, 48, bias=True)
    base.set_dtype(dtype)  # a dense base stored in the compute dtype
    layer = LoRALinear(base, rank=4, alpha=8)
    layer.lora_B = mx.random.normal((48, 4))
    x = mx.random.normal((3, 5, 64))
    base_out = x @ base.weight.astype(mx.float32).T + base.bias.astype(mx.float32)
    expected = base_out + 2.0 * (x @ layer.lora_A.T) @ layer.lora_B.T
    y = layer(x.astype(dtype))
    assert y.dtype == dtype
    tol = 1e-5 if dtype == mx.float32 else 0.02 * mx.abs(expected).max().item()
    assert mx.abs(y.astype(mx.float32) - expected).max().item() < tol


def test_lora_gradients_match_float32_reference():
    base = nn.Linear(64, 48, bias=False)
    layer = LoRALinear(base, rank=4, alpha=8)
    layer.lora_B = mx.random.normal((48, 4))
    x = mx.random.normal((3, 5, 64))
    cotangent = mx.random.normal((3, 5, 48))

    def reference(a, b):
        return ((x @ base.weight.T + 2.0 * (x @ a.T) @ b.T) * cotangent).sum()

    def ours(a, b):
        layer.lora_A, layer.lora_B = a, b
        return (layer(x) * cotangent).sum()

    a, b = layer.lora_A, layer.lora_B
    ref_grads = mx.grad(reference, argnums=(0, 1))(a, b)
    grads = mx.grad(ours, argnums=(0, 1))(a, b)
    for got, want in zip(grads, ref_grads):
        np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("alpha", [8.0, 6.0])  # scales 2 and 1.5 (not a power of two: rounded once in bfloat16)
def test_lora_gradients_in_bfloat16_match_float32_reference(alpha):
    # Float32 adapters in a bfloat16 computation: the scale rides on B's cast to bfloat16, not on the GEMM's alpha;
    # it must still scale the output, and the gradients of A and B, exactly once.
    base = nn.Linear(64, 48, bias=False)
    base.set_dtype(mx.bfloat16)
    layer = LoRALinear(base, rank=4, alpha=alpha)
    layer.lora_B = mx.random.normal((48, 4))
    x = mx.random.normal((3, 5, 64)).astype(mx.bfloat16)
    cotangent = mx.random.normal((3, 5, 48))
    x32, w32 = x.astype(mx.float32), base.weight.astype(mx.float32)

    def reference(a, b):
        return ((x32 @ w32.T + (alpha / 4) * (x32 @ a.T) @ b.T) * cotangent).sum()

    def ours(a, b):
        layer.lora_A, layer.lora_B = a, b
        return (layer(x).astype(mx.float32) * cotangent).sum()

    a, b = layer.lora_A, layer.lora_B
    assert abs(ours(a, b).item() - reference(a, b).item()) < 0.02 * abs(reference(a, b).item()) + 0.5
    for got, want in zip(mx.grad(ours, argnums=(0, 1))(a, b), mx.grad(reference, argnums=(0, 1))(a, b)):
        assert got.dtype == mx.float32
        scale = np.abs(np.array(want)).max()
        np.testing.assert_allclose(np.array(got), np.array(want), atol=0.03 * scale)


def test_dropout_only_acts_on_the_adapter_branch_in_training():
    layer = LoRALinear(nn.Linear(64, 16, bias=False), rank=4, alpha=4, dropout=0.5)
    layer.lora_B = mx.random.normal((16, 4))
    x = mx.random.normal((8, 64))
    layer.eval()
    assert mx.array_equal(layer(x), layer(x))
    expected = layer.base_layer(x) + (x @ layer.lora_A.T) @ layer.lora_B.T
    assert mx.allclose(layer(x), expected, atol=1e-5)
    layer.train()
    assert not mx.allclose(layer(x), expected, atol=1e-3)


def test_apply_lora_targets_configured_layers_and_modules_only():
    model = build_tiny_model(num_hidden_layers=3)
    spec = LoRASpec(rank=2, target_modules=("q_proj", "v_proj", "down_proj"), layers=(0, -1))
    apply_lora(model, spec)
    wrapped = sorted(name for name, m in model.named_modules() if isinstance(m, LoRALinear))
    assert wrapped == [f"model.layers.{i}.{m}" for i in (0, 2) for m in
                       ("mlp.down_proj", "self_attn.q_proj", "self_attn.v_proj")]
    trainable = dict(tree_flatten(model.trainable_parameters()))
    assert all(k.endswith((".lora_A", ".lora_B")) for k in trainable) and len(trainable) == 12
    # q: 64 -> 64, v: 64 -> 32 (2 kv heads of 16), down: 128 -> 64; r * (in + out) each, in 2 layers
    assert trainable_parameter_count(model) == 2 * 2 * ((64 + 64) + (64 + 32) + (128 + 64))


def test_lora_spec_rejects_bad_values():
    with pytest.raises(ValueError, match="rank"):
        LoRASpec(rank=0)
    with pytest.raises(ValueError, match="target_modules"):
        LoRASpec(target_modules=("q_proj", "query"))
    with pytest.raises(ValueError, match="layers has index 5"):
        apply_lora(build_tiny_model(), LoRASpec(layers=(5,)))


def test_only_adapters_change_after_an_optimizer_step():
    model = build_tiny_model()
    quantize_model(model, QuantSpec("rowwise"))
    apply_lora(model, LoRASpec(rank=4))
    before = {k: mx.array(v) for k, v in tree_flatten(model.parameters())}
    ids = random_ids()

    def loss_fn(model):
        logits = model(ids[:, :-1])
        return nn.losses.cross_entropy(logits, ids[:, 1:]).mean()

    optimizer = optim.AdamW(learning_rate=1e-2, weight_decay=0.1)
    loss, grads = nn.value_and_grad(model, loss_fn)(model)
    assert {k for k, _ in tree_flatten(grads)} == {k for k in before if ".lora_" in k}
    optimizer.update(model, grads)
    mx.eval(model.parameters(), optimizer.state)
    after = dict(tree_flatten(model.parameters()))
    changed = {k for k in before if not mx.array_equal(before[k], after[k])}
    # B starts at zero so it moves first; A's gradient is zero until B is non-zero, but weight decay moves it
    assert changed == {k for k in before if ".lora_" in k}
    assert loss_fn(model).item() < loss.item()


@pytest.mark.parametrize(
    "quant, dtype, atol",
    [
        (None, mx.float32, 1e-5),
        (QuantSpec("rowwise"), mx.float32, 1e-5),
        (QuantSpec("group", group_size=32), mx.float32, 1e-5),
        (QuantSpec("nf4"), mx.float32, 1e-5),
        (QuantSpec("rowwise"), mx.bfloat16, 0.1),
    ],
)
def test_merged_logits_match_base_plus_adapters(quant, dtype, atol):
    model = build_tiny_model()
    if quant is not None:
        quantize_model(model, quant)
    apply_lora(model, LoRASpec(rank=4, alpha=8))
    randomize_adapters(model)
    ids = random_ids()
    adapted = model(ids)
    merge_lora(model, dtype)
    assert not any(isinstance(m, (LoRALinear, QuantizedLinear)) for _, m in model.named_modules())
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == dtype
    merged = model(ids)
    assert mx.abs(merged.astype(mx.float32) - adapted).max().item() < atol
