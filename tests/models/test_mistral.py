"""The MLX Mistral against `transformers.MistralForCausalLM` (PyTorch, CPU, float32) on the same random weights."""

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
import transformers

from models.mistral import ModelConfigError, MistralForCausalLM, ModelArgs, attention_mask

# GQA (4 query heads over 2 key/value heads), 3 layers, and a window of 8 that the 24-token test
# sequences exceed three times over.
SMALL = dict(vocab_size=300, num_hidden_layers=3, sliding_window=8, tokenizer=False)
SEQ_LEN = 24


def load_mlx(checkpoint_dir, **config_overrides) -> MistralForCausalLM:
    """Our model on the checkpoint's weights, built straight from the files (independent of models.loading)."""
    config = json.loads((checkpoint_dir / "config.json").read_text())
    model = MistralForCausalLM(ModelArgs.from_hf_config({**config, **config_overrides}))
    model.load_weights(str(checkpoint_dir / "model.safetensors"))
    mx.eval(model.parameters())
    return model


def load_reference(checkpoint_dir, attn_implementation="eager", **config_overrides):
    return transformers.MistralForCausalLM.from_pretrained(
        checkpoint_dir, dtype=torch.float32, attn_implementation=attn_implementation, **config_overrides
    ).eval()


def reference_logits(reference, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return reference(torch.from_numpy(ids).long()).logits.numpy()


def token_ids(batch: int, length: int, vocab: int = 300, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(batch, length), dtype=np.int32)


@pytest.fixture
def small_checkpoint(make_mistral_checkpoint):
    return make_mistral_checkpoint("small", **SMALL)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_logits_match_transformers_beyond_sliding_window(small_checkpoint, attn_implementation):
    ids = token_ids(2, SEQ_LEN)
    ours = np.array(load_mlx(small_checkpoint)(mx.array(ids)))
    theirs = reference_logits(load_reference(small_checkpoint, attn_implementation), ids)
    assert ours.shape == (2, SEQ_LEN, 300)
    assert np.abs(ours - theirs).max() < 1e-4


def test_reference_applies_the_sliding_window(small_checkpoint):
    """Without this, the match above could hide a model and a reference that both ignore the window."""
    ids = token_ids(1, SEQ_LEN)
    windowed = reference_logits(load_reference(small_checkpoint), ids)
    full = reference_logits(load_reference(small_checkpoint, sliding_window=None), ids)
    window = SMALL["sliding_window"]
    # Positions inside the first window see the same keys either way; later ones lose the oldest keys.
    np.testing.assert_allclose(windowed[:, :window], full[:, :window], atol=1e-5)
    assert np.abs(windowed[:, window:] - full[:, window:]).max() > 1e-2
    ours_full = np.array(load_mlx(small_checkpoint, sliding_window=None)(mx.array(ids)))
    assert np.abs(ours_full - full).max() < 1e-4


def test_rope_theta_reaches_the_model(make_mistral_checkpoint):
    checkpoint = make_mistral_checkpoint(
        "theta", **SMALL, rope_parameters={"rope_type": "default", "rope_theta": 1e6}
    )
    assert load_mlx(checkpoint).args.rope_theta == 1e6
    ids = token_ids(1, SEQ_LEN)
    ours = np.array(load_mlx(checkpoint)(mx.array(ids)))
    assert np.abs(ours - reference_logits(load_reference(checkpoint), ids)).max() < 1e-4


@pytest.mark.parametrize("tied", [False, True], ids=["lm_head", "tied-embeddings"])
def test_llama_checkpoint_matches_transformers(tmp_path, tied):
    """A Llama directory: no sliding window (24 tokens, beyond the Mistral's 16), head_dim and RoPE base from
    config.json (head_dim 32 is not hidden_size / heads = 16)."""
    from tests.conftest import write_hf_llama

    checkpoint = write_hf_llama(
        tmp_path / "llama", vocab_size=300, head_dim=32, rope_theta=5e5, tie_word_embeddings=tied
    )
    model = load_mlx(checkpoint)
    assert (model.args.model_type, model.args.sliding_window, model.args.head_dim) == ("llama", None, 32)
    assert model.args.rope_theta == 5e5 and model.args.tie_word_embeddings == tied
    ids = token_ids(2, SEQ_LEN)
    reference = transformers.LlamaForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    assert np.abs(np.array(model(mx.array(ids))) - reference_logits(reference, ids)).max() < 1e-4


@pytest.mark.parametrize("chunk", [1, 5])
def test_kv_cache_generation_matches_full_forward(small_checkpoint, chunk):
    """Feeding tokens through the cache (one or several at a time, past the window) gives the full-forward logits."""
    model = load_mlx(small_checkpoint)
    ids = mx.array(token_ids(2, SEQ_LEN, seed=1))
    full = np.array(model(ids))
    cache = model.make_cache()
    prompt = 3
    steps = [np.array(model(ids[:, :prompt], cache=cache))]
    for start in range(prompt, SEQ_LEN, chunk):
        steps.append(np.array(model(ids[:, start : start + chunk], cache=cache)))
    assert cache[0].offset == SEQ_LEN
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-4)


def test_packed_segments_match_separate_sequences(small_checkpoint):
    """Two examples packed into one row (plus padding) give the logits each gets alone."""
    model = load_mlx(small_checkpoint)
    first, second = token_ids(1, 10, seed=2)[0], token_ids(1, 11, seed=3)[0]
    packed = np.concatenate([first, second, np.zeros(3, np.int32)])[None]
    segment_ids = np.array([[1] * 10 + [2] * 11 + [0] * 3], np.int32)
    logits = np.array(model(mx.array(packed), segment_ids=mx.array(segment_ids)))
    alone_first = np.array(model(mx.array(first[None])))
    alone_second = np.array(model(mx.array(second[None])))
    np.testing.assert_allclose(logits[:, :10], alone_first, atol=1e-4)
    # RoPE depends only on relative positions, so the offset of the second example does not matter.
    np.testing.assert_allclose(logits[:, 10:21], alone_second, atol=1e-4)
    assert np.isfinite(logits).all()
    # Without segment_ids the second example sees the first one.
    unpacked = np.array(model(mx.array(packed)))
    assert np.abs(unpacked[:, 10:21] - alone_second).max() > 1e-2


def test_left_padding_masked_gives_each_row_its_own_logits_through_the_cache(small_checkpoint):
    """Rows of different lengths left-padded into one batch (Hugging Face's `attention_mask`), then decoded
    through the KV cache, give the logits each row gets alone: padding is invisible and RoPE is relative."""
    model = load_mlx(small_checkpoint)
    rows = [token_ids(1, n, seed=10 + n)[0] for n in (4, 9, SEQ_LEN - 3)]
    width = max(len(r) for r in rows)
    ids = np.stack([np.concatenate([np.full(width - len(r), 7, np.int32), r]) for r in rows])
    keep = np.stack([np.arange(width) >= width - len(r) for r in rows])
    cache = model.make_cache()
    logits = np.array(model(mx.array(ids), cache=cache, attention_mask=mx.array(keep)))
    step_ids = token_ids(3, 1, seed=99)
    keep = np.concatenate([keep, np.ones((3, 1), bool)], axis=1)
    step = np.array(model(mx.array(step_ids), cache=cache, attention_mask=mx.array(keep)))
    for i, row in enumerate(rows):
        alone = np.array(model(mx.array(np.concatenate([row, step_ids[i]])[None])))
        np.testing.assert_allclose(logits[i, width - len(row) :], alone[0, : len(row)], atol=1e-4)
        np.testing.assert_allclose(step[i, 0], alone[0, -1], atol=1e-4)
    assert np.isfinite(logits).all()
    # Without the mask the short rows see the padding.
    unmasked = np.array(model(mx.array(ids)))
    assert np.abs(unmasked[0, -1] - logits[0, -1]).max() > 1e-3


def test_attention_mask_window_and_segments():
    mask = np.array(attention_mask(5, 5, sliding_window=2, segment_ids=mx.array([[1, 1, 1, 2, 2]])))[0, 0]
    expected = np.array(
        [
            [1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [0, 1, 1, 0, 0],
            [0, 0, 0, 1, 0],
            [0, 0, 0, 1, 1],
        ],
        bool,
    )
    np.testing.assert_array_equal(mask, expected)
    # Two new queries after three cached keys, window 2: each sees itself and the key before it.
    cached = np.array(attention_mask(2, 5, sliding_window=2))
    np.testing.assert_array_equal(cached, [[0, 0, 1, 1, 0], [0, 0, 0, 1, 1]])
    with pytest.raises(ValueError, match="KV cache"):
        attention_mask(1, 5, sliding_window=None, segment_ids=mx.array([[1]]))


# Mistral-7B-v0.1's config.json as published (written by transformers 4: `rope_theta` at the top level).
MISTRAL_7B_V01_CONFIG = {
    "architectures": ["MistralForCausalLM"],
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 32768,
    "model_type": "mistral",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0,
    "sliding_window": 4096,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.34.0.dev0",
    "use_cache": True,
    "vocab_size": 32000,
}


def test_from_hf_config_reads_transformers_4_top_level_rope_theta():
    args = ModelArgs.from_hf_config({**MISTRAL_7B_V01_CONFIG, "rope_theta": 1e6})
    assert args.rope_theta == 1e6
    assert (args.head_dim, args.num_key_value_heads, args.sliding_window) == (128, 8, 4096)
    # transformers 5 reads the same legacy file to the same theta.
    assert transformers.MistralConfig(**{**MISTRAL_7B_V01_CONFIG, "rope_theta": 1e6}).rope_parameters[
        "rope_theta"
    ] == pytest.approx(1e6)


def test_from_hf_config_reads_transformers_5_rope_parameters():
    written = transformers.MistralConfig(
        **{k: v for k, v in MISTRAL_7B_V01_CONFIG.items() if k != "rope_theta"},
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
    ).to_dict()
    assert "rope_theta" not in written
    assert ModelArgs.from_hf_config(written).rope_theta == 1e6


def test_to_hf_config_round_trips_through_transformers():
    args = ModelArgs.from_hf_config({**MISTRAL_7B_V01_CONFIG, "rope_theta": 1e6, "sliding_window": None})
    config = transformers.MistralConfig(**args.to_hf_config())
    assert ModelArgs.from_hf_config(config.to_dict()) == args


LLAMA_CONFIG = {**MISTRAL_7B_V01_CONFIG, "model_type": "llama", "architectures": ["LlamaForCausalLM"]}


def test_llama_config_has_no_sliding_window_and_defaults_kv_heads_to_heads():
    config = {k: v for k, v in LLAMA_CONFIG.items() if k != "num_key_value_heads"}
    args = ModelArgs.from_hf_config(config)
    assert (args.model_type, args.sliding_window, args.num_key_value_heads) == ("llama", None, 32)
    assert ModelArgs(model_type="llama").sliding_window is None


def test_llama_to_hf_config_round_trips_through_transformers():
    args = ModelArgs.from_hf_config({**LLAMA_CONFIG, "rope_theta": 1e5, "tie_word_embeddings": True})
    written = args.to_hf_config()
    assert written["architectures"] == ["LlamaForCausalLM"] and "sliding_window" not in written
    config = transformers.AutoConfig.for_model(**written)
    assert type(config).__name__ == "LlamaConfig"
    assert ModelArgs.from_hf_config(config.to_dict()) == args


@pytest.mark.parametrize(
    "change, message",
    [
        ({"attention_bias": True}, "attention_bias=True is not supported"),
        ({"mlp_bias": True}, "mlp_bias=True is not supported"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling has rope_type='llama3'"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "rope_parameters has rope_type='yarn'"),
    ],
)
def test_llama_features_this_model_lacks_are_refused_naming_the_key(change, message):
    with pytest.raises(ModelConfigError, match=message) as raised:
        ModelArgs.from_hf_config({**LLAMA_CONFIG, **change}, source="/ckpt/config.json")
    assert str(raised.value).startswith("/ckpt/config.json: ")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "qwen2"}, "model_type='qwen2'"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope scaling"),
        ({"num_key_value_heads": 5}, "multiple"),
        ({"hidden_act": "gelu"}, "gelu"),
        ({"hidden_size": "4096"}, "hidden_size='4096' should be int"),
        ({"tie_word_embeddings": "no"}, "tie_word_embeddings='no' should be bool"),
        ({"rms_norm_eps": None}, "rms_norm_eps=None should be float"),
    ],
)
def test_from_hf_config_rejects_what_it_cannot_build_naming_the_file(change, message):
    with pytest.raises(ModelConfigError, match=message) as raised:
        ModelArgs.from_hf_config({**MISTRAL_7B_V01_CONFIG, **change}, source="/ckpt/config.json")
    assert str(raised.value).startswith("/ckpt/config.json: ")
