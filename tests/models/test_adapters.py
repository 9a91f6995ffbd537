"""Adapters: our format round-trips onto a quantized base; PEFT's format loads with peft; bad files fail clearly."""

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
import transformers
from mlx.utils import tree_flatten

from models.adapters import AdapterError, load_adapters, save_adapters, save_peft_adapters
from models.lora import LoRASpec, apply_lora
from models.mistral import MistralForCausalLM, ModelArgs
from models.quant import QuantSpec, quantize_model
from tests.models.conftest import build_tiny_model, random_ids
from tests.models.test_lora import randomize_adapters

SPEC = LoRASpec(rank=4, alpha=8.0, dropout=0.05, target_modules=("q_proj", "v_proj", "up_proj"), layers=(1,))
QUANT = QuantSpec("nf4")


def quantized_base(**overrides):
    model = build_tiny_model(**overrides)  # same seed: the same base every time
    quantize_model(model, QUANT)
    return model


@pytest.fixture
def saved_adapters(tmp_path):
    model = quantized_base()
    apply_lora(model, SPEC)
    randomize_adapters(model)
    model.eval()
    out = save_adapters(model, tmp_path / "adapters", SPEC, base_model="tiny/base", extra={"step": 7})
    return model, out


def test_adapters_round_trip_onto_a_fresh_quantized_base(saved_adapters):
    model, out = saved_adapters
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapters.safetensors"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["lora"] == {"rank": 4, "alpha": 8.0, "dropout": 0.05,
                              "target_modules": ["q_proj", "v_proj", "up_proj"], "layers": [1]}
    assert config["base_model"] == "tiny/base" and config["quant"]["method"] == "nf4"
    assert config["format_version"] == 1 and config["extra"] == {"step": 7}

    restored = load_adapters(quantized_base(), out)
    restored.eval()
    saved = dict(tree_flatten(model.trainable_parameters()))
    loaded = dict(tree_flatten(restored.trainable_parameters()))
    assert saved.keys() == loaded.keys() and len(saved) == 6
    assert all(mx.array_equal(saved[k], loaded[k]) for k in saved)
    ids = random_ids()
    assert mx.array_equal(restored(ids), model(ids))


def test_loading_into_an_adapted_model_replaces_the_values(saved_adapters):
    model, out = saved_adapters
    resumed = quantized_base()
    apply_lora(resumed, SPEC)  # as a trainer does before resuming
    load_adapters(resumed, out)
    resumed.eval()
    ids = random_ids()
    assert mx.array_equal(resumed(ids), model(ids))
    other = quantized_base()
    apply_lora(other, LoRASpec(rank=4, target_modules=("q_proj",)))
    with pytest.raises(AdapterError, match="missing key"):
        load_adapters(other, out)


def test_corrupt_weights_file_names_the_file(saved_adapters):
    _, out = saved_adapters
    weights = out / "adapters.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(AdapterError, match="adapters.safetensors"):
        load_adapters(quantized_base(), out)


def test_missing_key_is_named(saved_adapters):
    _, out = saved_adapters
    arrays = mx.load(str(out / "adapters.safetensors"))
    del arrays["model.layers.1.self_attn.v_proj.lora_B"]
    mx.save_safetensors(str(out / "adapters.safetensors"), arrays)
    with pytest.raises(AdapterError, match=r"adapters.safetensors: missing key 'model.layers.1.self_attn.v_proj.lora_B'"):
        load_adapters(quantized_base(), out)


def test_shape_mismatch_with_the_base_is_named(saved_adapters):
    _, out = saved_adapters
    wider_base = build_tiny_model(intermediate_size=192)  # up_proj has 192 outputs instead of 128
    with pytest.raises(AdapterError, match=r"up_proj.lora_B has shape \(128, 4\), but this base needs \(192, 4\)"):
        load_adapters(wider_base, out)


@pytest.mark.parametrize(
    "content, message",
    [("{not json", r"not an adapter config \(invalid JSON at line 1"),
     ('{"format_version": 1, "base_model": "x"}', "missing key 'lora'"),
     ('{"format_version": 1, "base_model": "x", "lora": {"rank": -1}}', "bad 'lora' section")],
)
def test_bad_config_names_the_file(saved_adapters, content, message):
    _, out = saved_adapters
    (out / "adapter_config.json").write_text(content)
    with pytest.raises(AdapterError, match=f"adapter_config.json: {message}"):
        load_adapters(quantized_base(), out)


def test_missing_directory_names_the_expected_file(tmp_path):
    with pytest.raises(AdapterError, match="adapter_config.json"):
        load_adapters(quantized_base(), tmp_path / "nowhere")


@pytest.mark.parametrize("spec", [SPEC, LoRASpec(rank=2, alpha=16.0)])
def test_peft_adapters_load_with_peft_and_match_our_logits(make_mistral_checkpoint, spec):
    import peft

    base_dir = make_mistral_checkpoint("base", vocab_size=300, tokenizer=False)
    config = json.loads((base_dir / "config.json").read_text())
    model = MistralForCausalLM(ModelArgs.from_hf_config(config))
    model.load_weights(str(base_dir / "model.safetensors"))
    apply_lora(model, spec)
    randomize_adapters(model, std=0.2)
    model.eval()
    out = save_peft_adapters(model, base_dir.parent / "peft", spec, base_model=str(base_dir))
    assert {p.name for p in out.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}

    hf_base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(hf_base, out).eval()
    peft_lora = {n.replace("base_model.model.", "").replace(".default", "")
                 for n, _ in peft_model.named_parameters() if "lora_" in n}
    ours_lora = {f"{k}.weight" for k, _ in tree_flatten(model.trainable_parameters())}
    assert peft_lora == ours_lora  # the same modules of the same layers, nothing more
    ids = random_ids(length=12, vocab=300)
    with torch.no_grad():
        theirs = peft_model(torch.from_numpy(np.array(ids)).long()).logits.numpy()
        base_only = hf_base(torch.from_numpy(np.array(ids)).long()).logits.numpy()  # hf_base holds the adapters
        with peft_model.disable_adapter():
            plain = peft_model(torch.from_numpy(np.array(ids)).long()).logits.numpy()
    ours = np.array(model(ids))
    assert np.abs(theirs - ours).max() < 1e-4
    assert np.abs(base_only - ours).max() < 1e-4
    assert np.abs(plain - ours).max() > 1e-2  # the adapters really change the output


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_adapters_with_non_finite_values_are_refused_naming_file_and_tensor(saved_adapters, bad):
    _, out = saved_adapters
    path = out / "adapters.safetensors"
    arrays = mx.load(str(path))
    key = sorted(arrays)[1]
    arrays[key] = mx.where(mx.arange(arrays[key].size).reshape(arrays[key].shape) == 3, bad, arrays[key])
    mx.save_safetensors(str(path), arrays)
    with pytest.raises(AdapterError, match=rf"{path}: tensor '{key}' holds NaN or inf"):
        load_adapters(quantized_base(), out)


def test_a_binary_adapter_config_is_named(saved_adapters):
    _, out = saved_adapters
    (out / "adapter_config.json").write_bytes(b"\x00\x81\xfe binary")
    with pytest.raises(AdapterError, match=rf"{out / 'adapter_config.json'}: not UTF-8 text"):
        load_adapters(quantized_base(), out)


def test_a_different_alpha_on_an_adapted_model_is_refused(saved_adapters):
    _, out = saved_adapters
    resumed = quantized_base()
    apply_lora(resumed, LoRASpec(**{**SPEC.to_dict(), "alpha": 32.0}))
    with pytest.raises(AdapterError, match="alpha 8.0 differs"):
        load_adapters(resumed, out)
