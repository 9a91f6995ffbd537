"""GGUF files (llama.cpp's format): small files written here against `transformers.LlamaForCausalLM` holding
the same weights, and the real SmolLM2-135M-Instruct file against transformers' own GGUF loader."""

import copy

import gguf as gguf_py
import mlx.core as mx
import numpy as np
import pytest
import torch
import transformers
from mlx.utils import tree_flatten

from models.adapters import save_peft_adapters
from models.loading import PretrainedWeightsError, load_pretrained
from models.export import export_merged
from models.lora import LoRASpec, apply_lora
from models.quant import QuantSpec
from tests.conftest import random_hf_model, smollm2_gguf
from tests.models.test_lora import randomize_adapters

TINY = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    rope_theta=50000.0,
)
SEQ_LEN = 20
# llama.cpp's names for the Hugging Face ones, as its converter writes them.
LAYER_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}
GLOBAL_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
# Every GGUF type the reader supports, spread over the projections of a quantized test file.
MIXED_TYPES = {
    "attn_q": "Q4_0", "attn_k": "Q4_1", "attn_v": "Q8_0", "attn_output": "Q4_1", "ffn_gate": "Q4_0",
    "ffn_up": "Q8_0", "ffn_down": "Q4_1", "token_embd": "Q8_0", "output": "BF16",
}


def gguf_name(hf_name: str) -> str:
    stem = hf_name.removesuffix(".weight")
    if stem in GLOBAL_NAMES:
        return GLOBAL_NAMES[stem] + ".weight"
    _, _, index, *rest = stem.split(".")
    return f"blk.{index}.{LAYER_NAMES['.'.join(rest)]}.weight"


def llama_cpp_permute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """The row order llama.cpp's converter writes q/k projections in: within each head, row i of the first
    rotated half and row i of the second half become neighbours."""
    rows, cols = weight.shape
    return weight.reshape(n_heads, 2, rows // n_heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def metadata(config: dict, **changes) -> dict:
    """GGUF metadata of a llama model: key -> (value, GGUF value type); a change of None drops the key."""
    values = {
        "general.architecture": ("llama", "string"),
        "llama.block_count": (config["num_hidden_layers"], "uint32"),
        "llama.embedding_length": (config["hidden_size"], "uint32"),
        "llama.feed_forward_length": (config["intermediate_size"], "uint32"),
        "llama.attention.head_count": (config["num_attention_heads"], "uint32"),
        "llama.attention.head_count_kv": (config["num_key_value_heads"], "uint32"),
        "llama.context_length": (config["max_position_embeddings"], "uint32"),
        "llama.rope.freq_base": (config["rope_theta"], "float32"),
        "llama.rope.dimension_count": (config["head_dim"], "uint32"),
        "llama.attention.layer_norm_rms_epsilon": (config["rms_norm_eps"], "float32"),
    }
    values.update(changes)
    return {k: v for k, v in values.items() if v is not None}


def write_gguf(path, tensors: dict[str, np.ndarray], meta: dict, types: dict[str, str] | None = None):
    """Write GGUF-named float32 tensors: with `mx.save_gguf` when every type is F32/F16, else with llama.cpp's
    own Python writer (`gguf.GGUFWriter`, quantizing with `gguf.quants`). `types`: llama.cpp name stem
    (e.g. "attn_q") -> GGUF type name; F32 for the rest."""
    types = types or {}
    kind = {n: types.get(n.split(".")[-2], "F32") for n in tensors}
    if set(kind.values()) <= {"F32", "F16"}:
        dtypes = {"F16": mx.float16, "F32": mx.float32, "uint32": mx.uint32, "float32": mx.float32}
        arrays = {n: mx.array(v, dtypes[kind[n]]) for n, v in tensors.items()}
        values = {k: v if t == "string" else mx.array(v, dtypes[t]) for k, (v, t) in meta.items()}
        mx.save_gguf(str(path), arrays, values)
        return path
    meta = dict(meta)
    writer = gguf_py.GGUFWriter(str(path), arch=meta.pop("general.architecture")[0])  # the writer adds the key
    for key, (value, value_type) in meta.items():
        getattr(writer, f"add_{value_type}")(key, value)
    for name, value in tensors.items():
        qtype = gguf_py.GGMLQuantizationType[kind[name]]
        writer.add_tensor(name, gguf_py.quants.quantize(value, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def round_trip(value: np.ndarray, type_name: str) -> np.ndarray:
    """What a tensor of `type_name` holds after writing `value`, by llama.cpp's reference dequantizer."""
    qtype = gguf_py.GGMLQuantizationType[type_name]
    return gguf_py.quants.dequantize(gguf_py.quants.quantize(value, qtype), qtype).astype(np.float32)


def make_gguf(path, *, tied=False, types=None, seed=0, meta_changes=None, extra_tensors=None, **shape):
    """A random llama (TINY, with `shape` overrides) as a GGUF file at `path`, and the `LlamaForCausalLM`
    holding exactly the weights the file stores (after its quantization). Returns (path, reference)."""
    config = {**TINY, **shape, "tie_word_embeddings": tied}
    reference = random_hf_model(transformers.LlamaConfig(**config), seed)
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    tensors = {}
    state = {}
    for hf, param in reference.state_dict().items():
        if tied and hf == "lm_head.weight":
            continue
        name = gguf_name(hf)
        stem = name.split(".")[-2]
        stored = round_trip(param.numpy(), (types or {}).get(stem, "F32"))
        state[hf] = torch.from_numpy(stored)
        # Quantization blocks run along rows, so permuting rows commutes with the round trip above.
        tensors[name] = llama_cpp_permute(param.numpy(), heads[stem]) if stem in heads else param.numpy()
    tensors.update(extra_tensors or {})
    reference.load_state_dict(state, strict=not tied)
    if tied:
        reference.tie_weights()
    write_gguf(path, tensors, metadata(config, **(meta_changes or {})), types)
    return path, reference


def token_ids(length=SEQ_LEN, vocab=TINY["vocab_size"], seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(2, length), dtype=np.int32)


def torch_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(ids).long()).logits.float().numpy()


def mlx_logits(model, ids: np.ndarray) -> np.ndarray:
    return np.array(model(mx.array(ids)).astype(mx.float32))


# ---------------------------------------------------------------------------------------------------------
# Small files written by the test


@pytest.mark.parametrize("dtype, tied", [("F32", False), ("F16", True)])
def test_float_gguf_matches_transformers(tmp_path, dtype, tied):
    types = dict.fromkeys([*LAYER_NAMES.values(), "token_embd", "output", "output_norm"], dtype)
    path, reference = make_gguf(tmp_path / "tiny.gguf", tied=tied, types=types)
    model = load_pretrained(path, dtype="float32", progress=False)
    assert model.args.model_type == "llama" and model.args.sliding_window is None
    assert model.args.tie_word_embeddings == tied and ("lm_head" in model) == (not tied)
    assert model.args.rope_theta == TINY["rope_theta"]
    ids = token_ids()
    assert np.abs(mlx_logits(model, ids) - torch_logits(reference, ids)).max() < 1e-4


def test_quantized_gguf_dequantizes_exactly_and_matches_transformers(tmp_path):
    """Q4_0, Q4_1, Q8_0 and BF16 tensors come out equal to llama.cpp's reference dequantizer (which a float16
    rounding of MLX's scales would break), with q/k rows back in Hugging Face's order."""
    path, reference = make_gguf(tmp_path / "mixed.gguf", types=MIXED_TYPES)
    model = load_pretrained(path, dtype="float32", progress=False)
    expected = {k: v.numpy() for k, v in reference.state_dict().items()}
    for name, value in tree_flatten(model.parameters()):
        np.testing.assert_array_equal(np.array(value), expected[name], err_msg=name)
    ids = token_ids()
    assert np.abs(mlx_logits(model, ids) - torch_logits(reference, ids)).max() < 1e-4


@pytest.mark.parametrize("spec", [QuantSpec("rowwise"), QuantSpec("group", group_size=32), QuantSpec("nf4")],
                         ids=["rowwise4", "group4", "nf4"])
def test_quantized_load_of_a_gguf_equals_quantizing_the_float_load_and_is_cached(tmp_path, spec):
    from models.quant import quantize_model

    path, _ = make_gguf(tmp_path / "tiny.gguf", types=MIXED_TYPES)
    cache = tmp_path / "cache"
    first = load_pretrained(path, dtype="float32", quant=spec, cache_dir=cache, progress=False)
    expected = load_pretrained(path, dtype="float32", progress=False)
    quantize_model(expected, spec)
    ids = token_ids()
    np.testing.assert_array_equal(mlx_logits(first, ids), mlx_logits(expected, ids))
    (entry,) = cache.iterdir()
    assert entry.name.startswith(f"tiny-{spec.method}4-float32-")
    second = load_pretrained(path, dtype="float32", quant=spec, cache_dir=cache, progress=False)
    got, want = dict(tree_flatten(second.parameters())), dict(tree_flatten(first.parameters()))
    assert got.keys() == want.keys()
    for name in want:
        assert mx.array_equal(got[name], want[name]), name
    # Another file at the same path (same size, other weights) must not reuse the entry.
    make_gguf(path, types=MIXED_TYPES, seed=1)
    load_pretrained(path, dtype="float32", quant=spec, cache_dir=cache, progress=False)
    assert len(list(cache.iterdir())) == 2


def test_gguf_loading_dequantizes_one_layer_at_a_time(tmp_path):
    """Beyond the file's own (compact) tensors, loading holds about one decoder layer in float32, not the
    whole dequantized model."""
    import gc

    path, _ = make_gguf(tmp_path / "eight.gguf", types=MIXED_TYPES, num_hidden_layers=8, hidden_size=128,
                        intermediate_size=256, head_dim=32)
    gc.collect()
    mx.clear_cache()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    model = load_pretrained(path, dtype="float32", quant=QuantSpec("rowwise"), progress=False)
    peak = mx.get_peak_memory() - before
    final = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    layer = sum(v.nbytes for _, v in tree_flatten(load_pretrained(path, dtype="float32", progress=False)
                                                      .layers[0].parameters()))
    # Dequantizing every layer up front would add about 8 layers.
    assert peak - final < path.stat().st_size + 2 * layer


def test_unsupported_tensor_type_names_tensor_type_and_file(tmp_path):
    path, _ = make_gguf(tmp_path / "q5.gguf", types={**MIXED_TYPES, "attn_v": "Q5_0"})
    with pytest.raises(PretrainedWeightsError, match=rf"{path}: tensor blk\.0\.attn_v\.weight has GGUF type Q5_0"):
        load_pretrained(path, progress=False)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"llama.block_count": None}, "metadata llama.block_count is missing"),
        ({"llama.embedding_length": ("64", "string")}, "llama.embedding_length='64' should be a positive int"),
        ({"general.architecture": ("gpt2", "string")}, "general.architecture='gpt2' is not supported"),
        ({"llama.rope.scaling.type": ("linear", "string")}, "llama.rope.scaling.type='linear' is not supported"),
        ({"llama.rope.dimension_count": (8, "uint32")}, "llama.rope.dimension_count=8 .* partial rotary"),
    ],
)
def test_bad_metadata_names_key_and_file(tmp_path, change, message):
    path, _ = make_gguf(tmp_path / "bad.gguf", meta_changes=change)
    with pytest.raises(PretrainedWeightsError, match=message) as raised:
        load_pretrained(path, progress=False)
    assert str(raised.value).startswith(f"{path}: ")


def test_metadata_that_disagrees_with_the_tensors_names_tensor_and_file(tmp_path):
    path, _ = make_gguf(tmp_path / "heads.gguf", meta_changes={"llama.attention.head_count_kv": (4, "uint32")})
    with pytest.raises(PretrainedWeightsError, match=r"tensor model\.layers\.0\.self_attn\.k_proj\.weight has shape "
                                              r"\(32, 64\), but its GGUF metadata implies \(64, 64\)") as raised:
        load_pretrained(path, progress=False)
    assert str(path) in str(raised.value)


def test_tensor_outside_a_llama_is_named(tmp_path):
    path, _ = make_gguf(tmp_path / "rope.gguf", extra_tensors={"rope_freqs.weight": np.ones(8, np.float32)})
    with pytest.raises(PretrainedWeightsError, match=rf"{path}: tensor rope_freqs\.weight \(F32\) is not part of"):
        load_pretrained(path, progress=False)


@pytest.mark.parametrize("damage, message", [
    ("truncate", r"tensor .* past the end of the \d+-byte file \(truncated"),
    ("garbage", "not a GGUF file"),
    ("header", "header ends early"),
])
def test_corrupt_gguf_names_the_file(tmp_path, damage, message):
    path, _ = make_gguf(tmp_path / "broken.gguf")
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) - 100], "garbage": b"\x07" * 64, "header": data[:200]}[damage])
    with pytest.raises(PretrainedWeightsError, match=message) as raised:
        load_pretrained(path, progress=False)
    assert str(raised.value).startswith(f"{path}: ")


# ---------------------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct file, against transformers' own GGUF loader (float32)

# Over 30 float32 layers, our logits and transformers' differ from a float64 evaluation of the same weights by
# about 1e-4 each (logits up to ~35; see BENCHMARKS.md): 5e-4 leaves room for BLAS and thread order, and
# stays far below what a mapping error gives (a wrong head order or RoPE base moves logits by whole units).
REAL_TOLERANCE = 5e-4
# The first 48 tokens of a chat in SmolLM2's template, as the GGUF's own tokenizer encodes it:
# "<|im_start|>user\nWhat is the capital of France? Answer in one sentence.<|im_end|>\n<|im_start|>assistant\n
# The capital of France is Paris. It is known for the Eiffel Tower, the Louvre museum and its cafes along ..."
# Natural text, so that next-token predictions mean something when comparing quantized models.
REAL_IDS = np.array([[
    1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 19842, 281, 582, 6330, 30, 2, 198, 1, 520, 9531, 198,
    504, 3575, 282, 4649, 314, 7042, 30, 657, 314, 1343, 327, 260, 414, 46682, 18669, 28, 260, 5991, 36462,
    6508, 284, 624, 20879, 266, 1683, 260, 4626,
]], dtype=np.int32)


@pytest.fixture(scope="module")
def real_path():
    return smollm2_gguf()


@pytest.fixture(scope="module")
def real_reference(real_path):
    """transformers' LlamaForCausalLM built from the GGUF by its own reader (slow: about 25 s on 2 cores)."""
    return transformers.AutoModelForCausalLM.from_pretrained(
        real_path.parent, gguf_file=real_path.name, dtype=torch.float32
    ).eval()


@pytest.fixture(scope="module")
def real_model(real_path):
    return load_pretrained(real_path, dtype="float32", progress=False)


def test_real_gguf_weights_equal_transformers_and_logits_match(real_model, real_reference):
    """Every parameter is bit-identical to what transformers' GGUF reader builds (names, dequantization and
    the q/k un-permutation all agree), and the forward passes agree to float32 rounding."""
    args = real_model.args
    assert (args.num_hidden_layers, args.hidden_size, args.num_attention_heads, args.num_key_value_heads) == (
        30, 576, 9, 3)
    assert (args.vocab_size, args.rope_theta, args.tie_word_embeddings) == (49152, 100000.0, True)
    theirs = {k: v.numpy() for k, v in real_reference.state_dict().items()}
    ours = dict(tree_flatten(real_model.parameters()))
    assert set(ours) == set(theirs) - {"lm_head.weight"}  # tied: transformers lists the shared tensor twice
    for name, value in ours.items():
        np.testing.assert_array_equal(np.array(value), theirs[name], err_msg=name)
    reference_logits = torch_logits(real_reference, REAL_IDS)
    assert np.abs(reference_logits).max() > 10  # logits of a real model, not a degenerate one
    assert np.abs(mlx_logits(real_model, REAL_IDS) - reference_logits).max() < REAL_TOLERANCE


def text_loss(logits: np.ndarray) -> float:
    """Mean next-token negative log-likelihood (nats) of REAL_IDS under `logits` (1, L, vocab)."""
    shifted = logits[0, :-1] - logits[0, :-1].max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return float(-log_probs[np.arange(REAL_IDS.shape[1] - 1), REAL_IDS[0, 1:]].mean())


# (largest increase of the text's loss in nats, smallest share of next-token choices kept) per scheme. Row-wise
# 4-bit shares one scale among 576 or 1536 weights, far coarser than groups of 64: it costs the small model more.
# A broken quantizer moves the loss towards a uniform guess's ln(49152) = 10.8 nats and keeps few choices.
QUANT_BOUNDS = {"rowwise": (1.5, 0.4), "group": (0.5, 0.6), "nf4": (0.5, 0.6)}


@pytest.mark.slow
@pytest.mark.parametrize("spec", [QuantSpec("rowwise"), QuantSpec("group", group_size=64), QuantSpec("nf4")],
                         ids=["rowwise4", "group4", "nf4"])
def test_real_gguf_quantized_loads_stay_close_and_reload_from_cache(real_path, real_model, spec, tmp_path):
    float_logits = mlx_logits(real_model, REAL_IDS)
    model = load_pretrained(real_path, dtype="float32", quant=spec, cache_dir=tmp_path, progress=False)
    logits = mlx_logits(model, REAL_IDS)
    assert 0 < np.abs(logits - float_logits).max()  # really quantized
    max_increase, min_agreement = QUANT_BOUNDS[spec.method]
    agreement = np.mean(logits[0].argmax(-1) == float_logits[0].argmax(-1))
    increase = text_loss(logits) - text_loss(float_logits)
    assert text_loss(float_logits) < 3.0  # the float model reads the text as a language model would
    assert increase < max_increase and agreement >= min_agreement, (increase, agreement)
    cached = load_pretrained(real_path, dtype="float32", quant=spec, cache_dir=tmp_path, progress=False)
    want = dict(tree_flatten(model.parameters()))
    for name, value in tree_flatten(cached.parameters()):
        assert mx.array_equal(value, want[name]), name


def lora_smollm2(real_path, spec: LoRASpec):
    model = load_pretrained(real_path, dtype="float32", progress=False)
    apply_lora(model, spec)
    randomize_adapters(model, std=0.02)
    return model.eval()


@pytest.mark.slow
def test_real_gguf_peft_adapters_load_onto_transformers_gguf_model(real_path, real_reference, tmp_path):
    import peft

    spec = LoRASpec(rank=4, alpha=8.0, layers=(0, 29))  # all seven projections, named as in HF's Llama
    model = lora_smollm2(real_path, spec)
    out = save_peft_adapters(model, tmp_path / "peft", spec, base_model=str(real_path))
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(real_reference), out).eval()
    peft_lora = {n.replace("base_model.model.", "").replace(".default", "")
                 for n, _ in peft_model.named_parameters() if "lora_" in n}
    assert peft_lora == {f"{k}.weight" for k, _ in tree_flatten(model.trainable_parameters())}
    ours = mlx_logits(model, REAL_IDS)
    assert np.abs(torch_logits(peft_model, REAL_IDS) - ours).max() < REAL_TOLERANCE
    assert np.abs(torch_logits(real_reference, REAL_IDS) - ours).max() > 1e-2  # the adapters matter


@pytest.mark.slow
def test_real_gguf_merged_export_loads_as_llama_in_transformers(real_path, tmp_path):
    model = lora_smollm2(real_path, LoRASpec(rank=4, alpha=8.0, layers=(0, 29)))
    adapted = mlx_logits(model, REAL_IDS)
    out = export_merged(model, tmp_path / "merged", dtype="float32", progress=False)
    exported = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(exported).__name__ == "LlamaForCausalLM"
    assert np.abs(torch_logits(exported, REAL_IDS) - adapted).max() < REAL_TOLERANCE


@pytest.mark.slow
def test_real_gguf_export_round_trip_generates_the_same_text_in_transformers(real_path, tmp_path):
    """The merged export of an adapted SmolLM2 with its tokenizer is a directory `transformers` loads alone, and
    its greedy continuation of a prompt in the project's template is the one `harness.generate` gives."""
    from harness.generate import complete, encode_prompt
    from models.tokenizer import load_tokenizer

    model = lora_smollm2(real_path, LoRASpec(rank=4, alpha=8.0))
    tokenizer = load_tokenizer(real_path)
    out = export_merged(model, tmp_path / "merged", tokenizer=tokenizer, dtype="float32", progress=False)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    record = {"instruction": "What is the capital of France?", "context": ""}
    ours = complete(model, tokenizer, record, max_new_tokens=12)
    prompt = encode_prompt(tokenizer, record)
    assert hf_tokenizer(hf_tokenizer.decode(prompt), add_special_tokens=False)["input_ids"] == prompt
    with torch.no_grad():
        generated = hf_model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                      eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    theirs = hf_tokenizer.decode(generated[0, len(prompt):], skip_special_tokens=True)
    assert ours.strip() and ours == theirs
