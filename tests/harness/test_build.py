"""harness.build: what the config makes of the model before training starts."""

import mlx.core as mx
import pytest

from harness.build import build_model
from harness.process import set_up_process
from models.backend import backend_name
from models.memory import METAL_MEMORY_FRACTION, memory_policy
from models.lora import LoRALinear
from models.quant import QuantizedLinear
from models.tokenizer import TokenizerError

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


def test_the_tokenizer_comes_with_the_model(compose_train, tmp_path):
    from harness.build import tokenizer_path

    assert tokenizer_path(compose_train(*FAST)) is None  # random init: Mistral-7B-v0.1's tokenizer
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"")  # only located here, not read
    assert tokenizer_path(compose_train(*FAST, f"model.path={gguf}")) == str(gguf)
    for name in ("tokenizer.json", "tokenizer.model"):
        directory = tmp_path / name.replace(".", "-")
        directory.mkdir()
        (directory / name).write_text("")
        assert tokenizer_path(compose_train(*FAST, f"model.path={directory}")) == str(directory)
    only_gguf = tmp_path / "gguf-dir"
    only_gguf.mkdir()
    (only_gguf / "model.gguf").write_bytes(b"")
    assert tokenizer_path(compose_train(*FAST, f"model.path={only_gguf}")) == str(only_gguf / "model.gguf")
    # Mistral-7B-v0.1 not downloaded yet: mistral_common's copy of its tokenizer; any other model: an error.
    assert tokenizer_path(compose_train("model=mistral-7b")) is None
    with pytest.raises(TokenizerError, match="model.path=someone/other-model: no tokenizer there.*harness.download"):
        tokenizer_path(compose_train(*FAST, "model.path=someone/other-model"))
    override = tmp_path / "other" / "tokenizer.model"
    assert tokenizer_path(compose_train(*FAST, f"model.path={gguf}", f"data.tokenizer_path={override}")) == str(override)


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(compose_train):
    from harness.build import check_tokenizer_fits
    from models.tokenizer import default_tokenizer_path, load_tokenizer

    model = build_model(compose_train(*FAST), progress=False)  # Mistral's 32000 tokens
    check_tokenizer_fits(load_tokenizer(), model)
    v2 = load_tokenizer(default_tokenizer_path().with_name("mistral_instruct_tokenizer_240216.model.v2"))
    with pytest.raises(TokenizerError, match="32768 tokens but the model's vocabulary has 32000"):
        check_tokenizer_fits(v2, model)
