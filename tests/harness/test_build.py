"""harness.build: what the config makes of the model before training starts."""

import mlx.core as mx

from harness.build import build_model
from harness.process import set_up_process
from models.backend import backend_name
from models.memory import METAL_MEMORY_FRACTION, memory_policy
from models.lora import LoRALinear
from models.quant import QuantizedLinear

from .conftest import FAST


def test_memory_limit_from_the_config_reaches_mlx(compose_train):
    cfg = compose_train(*FAST, "trainer.memory_limit_gb=1.5")
    previous = mx.set_memory_limit(1 << 40)  # the limit in force, restored below
    try:
        set_up_process(cfg.trainer)
        assert mx.set_memory_limit(previous) == int(1.5e9)
    finally:
        mx.set_memory_limit(previous)


def test_default_memory_policy_follows_the_backend():
    """Metal: wired and memory limits at the recommended working set; elsewhere MLX's defaults stay."""
    policy = memory_policy(None)
    if backend_name() == "metal":
        working_set = mx.device_info()["max_recommended_working_set_size"]
        assert policy.wired_limit_bytes == working_set
        assert policy.memory_limit_bytes == int(METAL_MEMORY_FRACTION * working_set)
    else:
        assert policy.working_set_bytes is policy.wired_limit_bytes is policy.memory_limit_bytes is None
    assert memory_policy(2.0).memory_limit_bytes == int(2e9)


def test_random_base_is_quantized_and_wrapped_in_lora_on_every_target(compose_train):
    cfg = compose_train(*FAST)
    model = build_model(cfg, progress=False)
    targets = [m for _, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert len(targets) == 7 * cfg.model.arch.num_hidden_layers
    assert all(isinstance(m.base_layer, QuantizedLinear) for m in targets)
