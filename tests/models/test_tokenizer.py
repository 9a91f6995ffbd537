"""The tokenizer loader: Mistral-7B-v0.1's SentencePiece model by default, a model directory's own otherwise."""

import shutil

import pytest
from hypothesis import given, settings, strategies as st

from harness.data import DataError, load_tokenizer
from harness.data.tokenizer import MISTRAL_7B_V01_TOKENIZER_SHA256, default_tokenizer_path


def test_default_is_mistral_7b_v01_tokenizer(tokenizer):
    # The sha256 is the Hub's LFS object id of mistralai/Mistral-7B-v0.1/tokenizer.model.
    assert tokenizer.fingerprint == MISTRAL_7B_V01_TOKENIZER_SHA256
    assert tokenizer.vocab_size == 32000
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (1, 2, 0)
    assert tokenizer.id_to_piece(1) == "<s>" and tokenizer.id_to_piece(2) == "</s>"


def test_model_directory_tokenizer_is_used(tmp_path):
    other = default_tokenizer_path().with_name("mistral_instruct_tokenizer_240216.model.v2")
    shutil.copyfile(other, tmp_path / "tokenizer.model")
    loaded = load_tokenizer(tmp_path)
    assert loaded.path == str(tmp_path / "tokenizer.model")
    assert loaded.fingerprint != MISTRAL_7B_V01_TOKENIZER_SHA256
    assert loaded.vocab_size == 32768  # v2 adds control tokens: really a different model


def test_missing_or_corrupt_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(DataError, match="not a SentencePiece model"):
        load_tokenizer(tmp_path)


def test_batched_encoding_matches_one_by_one(tokenizer):
    texts = ["Hello world", " leading space", "", "tabs\tand\nnewlines", "unicode: é漢字🙂"] * 7
    assert tokenizer.encode(texts, num_threads=2) == [tokenizer.encode(t) for t in texts]
    assert tokenizer.encode(texts, continuation=True) == [tokenizer.encode(t, continuation=True) for t in texts]


def test_decode_drops_special_and_padding_tokens(tokenizer):
    ids = tokenizer.encode("Hello there")
    assert tokenizer.decode([tokenizer.bos_id, *ids, tokenizer.eos_id, tokenizer.pad_id, tokenizer.pad_id]) == "Hello there"


@settings(max_examples=200, deadline=None, database=None)  # no .hypothesis/ in the checkout
@given(st.text(max_size=60))
def test_continuation_round_trips_exactly(tokenizer, text):
    ids = tokenizer.encode(text, continuation=True)
    assert tokenizer.decode(ids, continuation=True) == text
