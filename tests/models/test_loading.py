"""Loading Hugging Face checkpoints: local and Hub-cache directories, shards, dtypes, quantized loading and
its cache, and the errors bad checkpoints give."""

import json
import shutil
from pathlib import Path

import huggingface_hub.constants
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
import transformers
from mlx.utils import tree_flatten

from models import quant as quantization
from models.backend import compute_dtype
from models.loading import PretrainedWeightsError, download_model, load_pretrained, resolve_model_dir
from models.mistral import ModelConfigError
from models.quant import QuantizedLinear, QuantSpec

SMALL = dict(vocab_size=300, num_hidden_layers=2, sliding_window=8, tokenizer=False)


def ids(batch=2, length=20, seed=0):
    return np.random.default_rng(seed).integers(0, 300, size=(batch, length), dtype=np.int32)


def logits_of(model, tokens) -> np.ndarray:
    return np.array(model(mx.array(tokens)).astype(mx.float32))


def parameters(model) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


@pytest.fixture
def small(make_mistral_checkpoint):
    return make_mistral_checkpoint("small", **SMALL)


@pytest.fixture
def sharded(make_mistral_checkpoint):
    return make_mistral_checkpoint("sharded", max_shard_size="40KB", **SMALL)


def test_llama_directory_loads_and_quantizes_like_a_mistral(tmp_path):
    from tests.conftest import write_hf_llama

    checkpoint = write_hf_llama(tmp_path / "llama", vocab_size=300, tie_word_embeddings=True)
    model = load_pretrained(checkpoint, dtype="float32", progress=False)
    assert model.args.model_type == "llama" and "lm_head" not in model
    reference = transformers.LlamaForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    tokens = ids()
    with torch.no_grad():
        expected = reference(torch.from_numpy(tokens).long()).logits.numpy()
    assert np.abs(logits_of(model, tokens) - expected).max() < 1e-4
    spec = QuantSpec(method="group", group_size=32)
    quantized = load_pretrained(checkpoint, dtype="float32", quant=spec, cache_dir=tmp_path / "c", progress=False)
    cached = load_pretrained(checkpoint, dtype="float32", quant=spec, cache_dir=tmp_path / "c", progress=False)
    np.testing.assert_array_equal(logits_of(cached, tokens), logits_of(quantized, tokens))


@pytest.mark.parametrize("tied", [False, True], ids=["lm_head", "tied-embeddings"])
def test_load_pretrained_matches_transformers(make_mistral_checkpoint, tied):
    checkpoint = make_mistral_checkpoint("tied" if tied else "untied", tie_word_embeddings=tied, **SMALL)
    model = load_pretrained(checkpoint, dtype="float32", progress=False)  # the reference's dtype, on every backend
    assert ("lm_head" in model) != tied
    reference = transformers.MistralForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    tokens = ids()
    with torch.no_grad():
        expected = reference(torch.from_numpy(tokens).long()).logits.numpy()
    assert np.abs(logits_of(model, tokens) - expected).max() < 1e-4


def test_sharded_checkpoint_loads_like_a_single_file(small, sharded):
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3
    one, many = (
        parameters(load_pretrained(small, progress=False)),
        parameters(load_pretrained(sharded, progress=False)),
    )
    assert one.keys() == many.keys()
    for name in one:
        np.testing.assert_array_equal(one[name], many[name], err_msg=name)


def test_default_dtype_is_the_backend_compute_dtype_and_bfloat16_casts(small):
    full = load_pretrained(small, progress=False)
    assert {v.dtype for _, v in tree_flatten(full.parameters())} == {compute_dtype("auto")}
    half = load_pretrained(small, dtype="bfloat16", progress=False)
    assert {v.dtype for _, v in tree_flatten(half.parameters())} == {mx.bfloat16}
    tokens = ids()
    assert np.abs(logits_of(half, tokens) - logits_of(full, tokens)).max() < 0.1


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(method="rowwise"),
        QuantSpec(method="group", group_size=32),
        QuantSpec(method="nf4"),
        QuantSpec(method="group", quantize_embeddings=True, quantize_lm_head=True),
    ],
    ids=["rowwise", "group", "nf4", "group-embeddings-lm_head"],
)
def test_quantized_loading_equals_quantizing_the_loaded_model(small, spec):
    """Layer-by-layer quantization while loading gives exactly what quantizing the whole model gives."""
    loaded = load_pretrained(small, quant=spec, progress=False)
    projections = [m for _, m in loaded.named_modules() if isinstance(m, QuantizedLinear)]
    assert len(projections) == 7 * 2 + spec.quantize_lm_head + spec.quantize_embeddings
    assert isinstance(loaded.model.embed_tokens, nn.Embedding) != spec.quantize_embeddings
    assert isinstance(loaded.lm_head, QuantizedLinear) == spec.quantize_lm_head
    reference = quantization.quantize_model(load_pretrained(small, progress=False), spec)
    expected = parameters(reference)
    got = parameters(loaded)
    assert got.keys() == expected.keys()
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    tokens = ids()
    np.testing.assert_array_equal(logits_of(loaded, tokens), logits_of(reference, tokens))


def test_quantized_base_is_cached_and_reloaded_without_quantizing(small, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    spec = QuantSpec(method="rowwise")
    first = load_pretrained(small, quant=spec, cache_dir=cache, progress=False)
    entries = list(cache.iterdir())
    assert len(entries) == 1 and {p.name for p in entries[0].iterdir()} == {
        "model.safetensors",
        "quantized_base.json",
    }

    def fail(*args, **kwargs):
        raise AssertionError("re-quantized although a cached base exists")

    monkeypatch.setattr(quantization, "quantize_layer", fail)
    second = load_pretrained(small, quant=spec, cache_dir=cache, progress=False)
    expected, got = parameters(first), parameters(second)
    assert got.keys() == expected.keys()
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    tokens = ids()
    np.testing.assert_array_equal(logits_of(second, tokens), logits_of(first, tokens))


def test_cache_key_separates_specs_dtypes_and_checkpoints(small, make_mistral_checkpoint, tmp_path):
    cache = tmp_path / "cache"
    load_pretrained(small, quant=QuantSpec(method="rowwise"), cache_dir=cache, progress=False)
    load_pretrained(small, quant=QuantSpec(method="group", group_size=32), cache_dir=cache, progress=False)
    load_pretrained(
        small, quant=QuantSpec(method="rowwise"), dtype="bfloat16", cache_dir=cache, progress=False
    )
    assert len(list(cache.iterdir())) == 3
    # Same shapes and file sizes, different weights: must not reuse the cached base of `small`.
    other = make_mistral_checkpoint("small", seed=1, **SMALL)  # overwrites `small` in place
    reloaded = load_pretrained(other, quant=QuantSpec(method="rowwise"), cache_dir=cache, progress=False)
    assert len(list(cache.iterdir())) == 4
    fresh = load_pretrained(other, quant=QuantSpec(method="rowwise"), progress=False)
    tokens = ids()
    np.testing.assert_array_equal(logits_of(reloaded, tokens), logits_of(fresh, tokens))


def _cut_short(weights: Path) -> str:
    """A crash mid-write: the file ends early. Returns the warning expected."""
    weights.write_bytes(weights.read_bytes()[:1000])
    return "quantizing again"


def _non_finite_scales(weights: Path) -> str:
    """Bytes overwritten under an intact safetensors header (a bad disk sector): the file still loads, with NaN in
    a float32 tensor. Returns the warning expected."""
    raw = bytearray(weights.read_bytes())
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_len])
    name = next(k for k, v in header.items() if k.endswith("scales") and v["dtype"] == "F32")
    start, end = header[name]["data_offsets"]
    raw[8 + header_len + start : 8 + header_len + end] = np.full((end - start) // 4, np.nan, np.float32).tobytes()
    weights.write_bytes(bytes(raw))
    return rf"{name}.* NaN or inf.*quantizing again"


@pytest.mark.parametrize(
    "method, damage", [("nf4", _cut_short), ("rowwise", _non_finite_scales)], ids=["cut short", "non-finite values"]
)
def test_a_damaged_cache_entry_is_rebuilt_with_a_warning(small, tmp_path, method, damage):
    cache = tmp_path / "cache"
    spec = QuantSpec(method=method)
    first = load_pretrained(small, quant=spec, cache_dir=cache, progress=False)
    (entry,) = cache.iterdir()
    warning = damage(entry / "model.safetensors")
    with pytest.warns(UserWarning, match=warning):
        again = load_pretrained(small, quant=spec, cache_dir=cache, progress=False)
    tokens = ids()
    np.testing.assert_array_equal(logits_of(again, tokens), logits_of(first, tokens))
    assert [p.name for p in cache.iterdir()] == [entry.name]  # rewritten whole, no temporary left behind
    load_pretrained(small, quant=spec, cache_dir=cache, progress=False)  # and now reloads cleanly


def test_safetensors_open_lazily(tmp_path):
    """The loader relies on `mx.load` reading a tensor only when it is evaluated."""
    import gc

    path = str(tmp_path / "big.safetensors")
    mx.save_safetensors(path, {"a": mx.ones((1024, 1024)), "b": mx.ones((1024, 1024))})
    gc.collect()
    before = mx.get_active_memory()
    arrays = mx.load(path)
    assert mx.get_active_memory() - before < 1024**2
    mx.eval(arrays["a"])
    assert 4 * 1024**2 <= mx.get_active_memory() - before < 8 * 1024**2


@pytest.mark.parametrize("method", [None, "rowwise", "group"])
def test_loading_holds_one_dense_layer_at_a_time(tmp_path, method):
    """Peak memory while loading (and quantizing) stays within the final model plus about one decoder
    layer in float32, far below the whole model in float32."""
    import gc

    from benchmarks.make_checkpoint import make_checkpoint

    config = dict(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=64,
    )
    out = make_checkpoint(tmp_path / "eight-layers", config, progress=False)
    gc.collect()
    mx.clear_cache()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    model = load_pretrained(out, dtype="float32", quant=method and QuantSpec(method=method), progress=False)
    peak = mx.get_peak_memory() - before
    final = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    layer = sum(
        v.nbytes for _, v in tree_flatten(load_pretrained(out, progress=False).layers[0].parameters())
    )
    # Holding the whole model in float32 while loading would add about 8 layers (and 16 from bfloat16 files).
    assert peak - final < 2 * layer


# ---------------------------------------------------------------------------------------------------------
# Bad checkpoints: clear errors that name the file


def test_missing_shard_names_the_shard(sharded):
    shard = sorted(sharded.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(
        PretrainedWeightsError, match=f"shard {shard.name} listed in model.safetensors.index.json is missing"
    ):
        load_pretrained(sharded, progress=False)


def test_shape_mismatch_names_tensor_shapes_and_file(small):
    config_path = small / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "intermediate_size": 96}))
    with pytest.raises(PretrainedWeightsError) as raised:
        load_pretrained(small, progress=False)
    message = str(raised.value)
    assert str(small / "model.safetensors") in message
    assert (
        "model.layers.0.mlp.gate_proj.weight has shape (128, 64), but config.json implies (96, 64)" in message
    )


@pytest.mark.parametrize(
    "layers, message",
    [
        (3, r"tensors that config.json implies are missing from the weights: model\.layers\.2\."),
        (1, r"unexpected tensors in model\.safetensors, not part of .*: model\.layers\.1\."),
    ],
)
def test_missing_and_unexpected_tensors_are_named(small, layers, message):
    config_path = small / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "num_hidden_layers": layers}))
    with pytest.raises(PretrainedWeightsError, match=message):
        load_pretrained(small, progress=False)


def test_unsupported_model_type_names_the_file(small):
    config_path = small / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "model_type": "qwen2"}))
    with pytest.raises(ModelConfigError, match=f"{config_path}: model_type='qwen2' is not supported"):
        load_pretrained(small, progress=False)


def test_broken_config_json_names_file_and_line(small):
    (small / "config.json").write_text('{\n  "model_type": "mistral",\n  "vocab_size": 300,,\n}')
    with pytest.raises(PretrainedWeightsError, match=r"config.json: not a model config \(invalid JSON at line 3"):
        load_pretrained(small, progress=False)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors_names_the_file(sharded, damage):
    shard = sorted(sharded.glob("model-*.safetensors"))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x07" * 64)
    with pytest.raises(PretrainedWeightsError, match=f"{shard}: not a readable safetensors file"):
        load_pretrained(sharded, progress=False)


def test_pickled_weights_are_refused(small):
    (small / "model.safetensors").rename(small / "pytorch_model.bin")
    with pytest.raises(PretrainedWeightsError, match="pytorch_model.bin: pickled weights are not loaded"):
        load_pretrained(small, progress=False)


def test_missing_directory_that_is_no_repo_id(tmp_path):
    with pytest.raises(PretrainedWeightsError, match="no such directory, and not a Hugging Face repo id"):
        load_pretrained(tmp_path / "nowhere" / "at" / "all", progress=False)


# ---------------------------------------------------------------------------------------------------------
# Hub repo ids, resolved offline from a Hugging Face cache the test builds


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def test_repo_id_offline_and_not_cached_says_how_to_download(hub_cache):
    with pytest.raises(PretrainedWeightsError) as raised:
        load_pretrained("mistralai/Mistral-7B-v0.1", progress=False)
    message = str(raised.value)
    assert (
        "mistralai/Mistral-7B-v0.1 is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 is set"
        in message
    )
    assert "download_model('mistralai/Mistral-7B-v0.1', <dir>)" in message
    with pytest.raises(PretrainedWeightsError, match="HF_HUB_OFFLINE=1 is set"):
        download_model("mistralai/Mistral-7B-v0.1", hub_cache.parent / "download", progress=False)


def test_repo_id_resolves_to_the_cached_snapshot(hub_cache, small):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = hub_cache / "models--someone--tiny-mistral"
    shutil.copytree(small, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    assert resolve_model_dir("someone/tiny-mistral", progress=False) == repo / "snapshots" / commit
    tokens = ids()
    np.testing.assert_array_equal(
        logits_of(load_pretrained("someone/tiny-mistral", progress=False), tokens),
        logits_of(load_pretrained(small, progress=False), tokens),
    )


def test_benchmark_checkpoint_writer_output_loads_in_transformers_and_here(tmp_path):
    """benchmarks/make_checkpoint.py streams its own safetensors; both loaders must read the same weights."""
    from benchmarks.make_checkpoint import PRESETS, make_checkpoint

    out = make_checkpoint(
        tmp_path / "random", {**PRESETS["tiny"], "vocab_size": 300}, max_shard_bytes=40_000, progress=False
    )
    assert (
        len(set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].values())) >= 3
    )
    reference = transformers.MistralForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ours = parameters(load_pretrained(out, progress=False))
    theirs = {k: v.numpy() for k, v in reference.state_dict().items()}
    assert ours.keys() == theirs.keys()
    for name in ours:
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)
    assert reference.config.sliding_window == 16 and reference.config.num_key_value_heads == 2
