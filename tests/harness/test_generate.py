"""Batched greedy generation gives what one-at-a-time generation gives."""

import mlx.core as mx
import pytest

from harness.generate import complete, complete_batch, generate_batch, generate_tokens
from models.mistral import MistralForCausalLM, ModelArgs
from models.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def model():
    mx.random.seed(3)
    args = ModelArgs(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, sliding_window=None, tie_word_embeddings=True)
    m = MistralForCausalLM(args)
    # A larger spread than the init so that greedy choices differ between prompts.
    m.update({"model": {"embed_tokens": {"weight": mx.random.normal((32000, 64)) * 0.5}}})
    mx.eval(m.parameters())
    return m.eval()


def test_batch_rows_equal_single_generation(model):
    prompts = [[5, 17, 300, 42], [9] * 11, [1, 2, 3, 4, 5, 6, 7], [88]]
    limits = [6, 3, 8, 5]
    batched = generate_batch(model, prompts, max_new_tokens=limits, eos_id=None, pad_id=0)
    single = [list(generate_tokens(model, p, max_new_tokens=n, eos_id=None)) for p, n in zip(prompts, limits)]
    assert batched == single
    assert [len(b) for b in batched] == limits


def test_rows_stop_at_eos_without_it(model):
    prompt = [5, 17, 300, 42]
    first = list(generate_tokens(model, prompt, max_new_tokens=4, eos_id=None))
    eos = first[2]  # the third token becomes the end of the sequence
    out = generate_batch(model, [prompt, [9] * 6], max_new_tokens=4, eos_id=eos, pad_id=0)
    assert out[0] == first[: first.index(eos)]
    assert eos not in out[1]


def test_complete_batch_matches_complete(model):
    tokenizer = load_tokenizer(None)
    records = [
        {"instruction": "What is 2 plus 3?", "context": ""},
        {"instruction": "Name a river.", "context": "A long passage about the rivers of an invented land."},
        {"instruction": "Sort these words: b, a", "context": ""},
    ]
    batched = complete_batch(model, tokenizer, records, max_new_tokens=5, batch_size=2)
    assert batched == [complete(model, tokenizer, r, max_new_tokens=5) for r in records]


def test_a_model_loaded_from_an_exported_directory_gets_the_cpu_paths(tiny_mistral_dir):
    """Generating from an exported model runs the same layers as generating from a training run."""
    from harness.generate import load_exported
    from models.cpu_paths import use_cpu_paths
    from models.loading import load_pretrained

    model, tokenizer = load_exported(tiny_mistral_dir)
    assert tokenizer.vocab_size > 0
    reference = load_pretrained(str(tiny_mistral_dir), progress=False)
    expected_kinds = {type(layer.mlp.act_fn) for layer in reference.model.layers}
    changed = use_cpu_paths(reference)
    assert {type(layer.mlp.act_fn) for layer in model.model.layers} == {
        type(layer.mlp.act_fn) for layer in reference.model.layers
    }
    assert [layer.self_attn.attention_fn for layer in model.model.layers] == [
        layer.self_attn.attention_fn for layer in reference.model.layers
    ]
    # On the CPU (this suite's backend) the swap is real: the loaded model's layers were changed.
    assert changed == 0 or {type(layer.mlp.act_fn) for layer in model.model.layers} != expected_kinds


def test_batched_answers_of_a_quantized_model_on_the_cpu_dequantize_each_weight_once(model, monkeypatch):
    import copy

    from models import quant
    from models.backend import is_cpu
    from models.quant import QuantSpec, quantize_model

    quantized = quantize_model(copy.deepcopy(model), QuantSpec("rowwise"))
    tokenizer = load_tokenizer(None)
    records = [{"instruction": f"Question {i}: what is {i} plus {i}?", "context": ""} for i in range(6)]
    expected = [complete(quantized, tokenizer, r, max_new_tokens=5) for r in records]  # one row: the fused kernel
    calls = []
    build = quant._dense_weight
    monkeypatch.setattr(quant, "_dense_weight", lambda *a, **k: calls.append(1) or build(*a, **k))
    for _ in range(2):  # six rows a batch: more tokens than the fused kernel takes, every step multiplies densely
        assert complete_batch(quantized, tokenizer, records, max_new_tokens=5) == expected
    weights = sum(isinstance(m, quant.QuantizedLinear) for _, m in quantized.named_modules())
    if is_cpu():  # the kept dense copies: each weight once, for both calls and all their decoding steps
        assert len(calls) == weights == 14


def test_batched_answers_on_the_cpu_use_every_core_for_the_blas_then_give_the_threads_back(model, monkeypatch):
    from harness import generate
    from harness.step.cpu_streams import cpu_cores
    from models import blas
    from models.backend import is_cpu

    if not is_cpu() or blas.blas_threads() is None or cpu_cores() < 2:
        pytest.skip("needs the CPU backend, a BLAS whose threads can be set and two cores")
    before = blas.blas_threads()
    blas.set_blas_threads(1)  # as the CPU streams' plan leaves it for training with one stream per core
    seen = []
    original = generate.generate_batch
    monkeypatch.setattr(generate, "generate_batch", lambda *a, **k: seen.append(blas.blas_threads()) or original(*a, **k))
    try:
        records = [{"instruction": "Name a river.", "context": ""}]
        complete_batch(model, load_tokenizer(None), records, max_new_tokens=2)
        assert seen == [cpu_cores()]
        assert blas.blas_threads() == 1
    finally:
        blas.set_blas_threads(before)
