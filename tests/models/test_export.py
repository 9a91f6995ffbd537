"""Hugging Face export: the directory loads in transformers and gives our logits."""

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
import transformers
from mlx.utils import tree_flatten
from safetensors import safe_open

from models.export import export_merged, merged_state, save_pretrained
from models.lora import LoRASpec, apply_lora
from models.quant import QuantSpec, quantize_model
from tests.conftest import mistral_tokenizer_path
from tests.models.conftest import build_tiny_model, random_ids
from tests.models.test_lora import randomize_adapters


def transformers_logits(model_dir, ids: mx.array) -> np.ndarray:
    reference = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return reference(torch.from_numpy(np.array(ids)).long()).logits.numpy()


def test_sharded_export_loads_in_transformers_with_matching_logits(tmp_path):
    model = build_tiny_model()
    ids = random_ids(length=20)  # longer than the sliding window of 8
    out = save_pretrained(model, tmp_path / "hf", dtype="float32", max_shard_bytes=100_000, progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == shards
    assert index["weight_map"]["model.layers.1.mlp.down_proj.weight"] in shards
    for shard in shards:
        with safe_open(out / shard, framework="numpy") as handle:
            assert handle.metadata() == {"format": "pt"}
    assert not list(out.glob(".*"))  # no temporary files left behind
    ours = np.array(model(ids))
    assert np.abs(transformers_logits(out, ids) - ours).max() < 1e-4


def test_reexport_with_one_shard_removes_stale_shards(tmp_path):
    model = build_tiny_model()
    out = tmp_path / "hf"
    save_pretrained(model, out, max_shard_bytes=100_000, progress=False)
    save_pretrained(model, out, progress=False)
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    assert not (out / "model.safetensors.index.json").exists()


def test_save_pretrained_refuses_quantized_or_adapted_models(tmp_path):
    model = build_tiny_model()
    quantize_model(model, QuantSpec("rowwise"))
    with pytest.raises(ValueError, match="merge_lora"):
        save_pretrained(model, tmp_path / "hf", progress=False)


@pytest.mark.parametrize("quant", [QuantSpec("rowwise"), QuantSpec("nf4")])
def test_export_merged_qlora_model_matches_in_transformers(tmp_path, quant):
    model = build_tiny_model()
    quantize_model(model, quant)
    apply_lora(model, LoRASpec(rank=4, alpha=8, layers=(-1,)))
    randomize_adapters(model)
    ids = random_ids(length=12)
    adapted = np.array(model(ids))
    out = export_merged(model, tmp_path / "merged", tokenizer=mistral_tokenizer_path(), dtype="float32",
                        progress=False)
    assert (out / "tokenizer.model").read_bytes() == mistral_tokenizer_path().read_bytes()
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "mistral" and config["torch_dtype"] == "float32"
    assert np.abs(transformers_logits(out, ids) - adapted).max() < 1e-4


def test_export_merged_lora_llama_loads_as_llama_in_transformers(tmp_path):
    model = build_tiny_model(model_type="llama", tie_word_embeddings=True)
    quantize_model(model, QuantSpec("group", group_size=32))
    apply_lora(model, LoRASpec(rank=4, alpha=8))
    randomize_adapters(model)
    ids = random_ids(length=20)  # beyond the Mistral window of 8: a Llama has none
    adapted = np.array(model(ids))
    out = export_merged(model, tmp_path / "merged", dtype="float32", progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    reference = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(reference).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        theirs = reference(torch.from_numpy(np.array(ids)).long()).logits.numpy()
    assert np.abs(theirs - adapted).max() < 1e-4


def test_bfloat16_export_stores_bfloat16(tmp_path):
    model = build_tiny_model()
    out = save_pretrained(model, tmp_path / "hf", dtype="bfloat16", progress=False)
    reference = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert reference.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16


def test_export_reloads_with_our_loader(tmp_path):
    from models import load_pretrained

    model = build_tiny_model()
    out = save_pretrained(model, tmp_path / "hf", dtype="float32", max_shard_bytes=100_000, progress=False)
    reloaded = load_pretrained(out, dtype="float32", progress=False)
    ids = random_ids()
    assert mx.array_equal(reloaded(ids), model(ids))


def test_export_merged_leaves_the_model_quantized_and_unchanged(tmp_path):
    model = build_tiny_model()
    quantize_model(model, QuantSpec("rowwise"))
    apply_lora(model, LoRASpec(rank=4, alpha=8))
    randomize_adapters(model)
    before = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    export_merged(model, tmp_path / "merged", dtype="float32", progress=False)
    after = dict(tree_flatten(model.parameters()))
    assert before.keys() == after.keys()
    assert all(np.array_equal(before[k], np.array(after[k])) for k in before)


def test_merged_export_computes_one_shard_at_a_time(tmp_path):
    """MLX's peak above the quantized model is one shard plus one tensor's float32 temporaries: far below the
    dense model (held whole when every layer was merged before writing) and below a shard whose tensors are
    all computed at once (their temporaries side by side)."""
    model = build_tiny_model(num_hidden_layers=8, hidden_size=128, intermediate_size=512)
    quantize_model(model, QuantSpec("rowwise"))
    apply_lora(model, LoRASpec(rank=4, alpha=8))
    randomize_adapters(model)
    mx.eval(model.parameters())
    sizes = [v.size * 4 for v in merged_state(model, mx.float32).values()]
    dense_bytes, largest = sum(sizes), max(sizes)
    shard = dense_bytes // 16
    mx.clear_cache()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    out = export_merged(model, tmp_path / "merged", dtype="float32", max_shard_bytes=shard, progress=False)
    grown = mx.get_peak_memory() - before
    assert len(list(out.glob("model-*.safetensors"))) >= 8
    assert grown < shard + 2 * largest, f"export peaked {grown / shard:.2f} shards above the base"


def test_auto_dtype_is_bfloat16_for_large_models_float32_for_small(tmp_path, monkeypatch):
    import models.export as export

    model = build_tiny_model()
    assert export.export_dtype(model, "auto") == mx.float32
    assert export.export_dtype(model, "float32") == mx.float32
    parameters = sum(v.size for v in merged_state(model, mx.float32).values())
    monkeypatch.setattr(export, "BFLOAT16_FROM_PARAMETERS", parameters)
    assert export.export_dtype(model, "auto") == mx.bfloat16
    out = export_merged(model, tmp_path / "merged", progress=False)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
