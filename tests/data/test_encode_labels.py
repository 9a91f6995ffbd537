"""Examples: [BOS] + prompt + response + EOS, labels only on the response and EOS, truncation rules; for
Mistral's SentencePiece (BOS added) and SmolLM2's byte-level BPE (no BOS)."""


import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from harness.data import IGNORE_INDEX, encode_example, encode_records, format_prompt
from harness.data.encode import DROP_EMPTY_RESPONSE, DROP_PROMPT_TOO_LONG
from harness.data.records import embedded_sample_path, load_local_file

# Text with spaces, newlines, punctuation and non-ASCII characters; sometimes leading/trailing whitespace.
TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=0, max_size=80)
WORDY = st.lists(st.sampled_from(["the", "river", "Velmora", "42", "é", "漢字", ",", ".", "\n", " ", "  "]), max_size=40).map("".join)
FIELD = st.one_of(TEXT, WORDY)
RECORDS = st.fixed_dictionaries(
    {"instruction": FIELD.filter(str.strip), "context": FIELD, "response": FIELD.filter(str.strip)}
)
# database=None: no .hypothesis/ directory in the checkout (tests are hermetic); derandomized: the same examples
# on every run, so CI's outcome does not depend on the draw.
HYPOTHESIS = settings(
    max_examples=150, deadline=None, database=None, derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@pytest.fixture(params=["mistral", "smollm2"])
def tokenizer(request):
    return request.getfixturevalue("tokenizer" if request.param == "mistral" else "smollm2_tokenizer")


def start(tokenizer) -> list[int]:
    return [tokenizer.bos_id] if tokenizer.add_bos else []


def representable(tokenizer, record) -> bool:
    """Whether the tokenizer can spell every field (SmolLM2's vocabulary lacks a few byte tokens)."""
    return all(tokenizer.decode(tokenizer.encode(v, continuation=True), continuation=True) == v for v in record.values())


def labelled(example):
    return [t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX]


def check_invariants(example, record, tokenizer, max_seq_len):
    ids, labels, mask = example["input_ids"], example["labels"], example["attention_mask"]
    assert len(ids) == len(labels) == len(mask) <= max_seq_len
    assert mask == [1] * len(ids)
    assert ids[: len(start(tokenizer))] == start(tokenizer)
    if not tokenizer.add_bos:
        assert tokenizer.bos_id not in ids
    first = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    # The labelled part is one contiguous tail: no prompt token carries a label.
    assert all(label == IGNORE_INDEX for label in labels[:first])
    assert labels[first:] == ids[first:]
    prompt_text = tokenizer.decode(ids[len(start(tokenizer)) : first])
    assert prompt_text.startswith(format_prompt({"instruction": record["instruction"], "context": ""})[:20])
    response_ids = tokenizer.encode(record["response"], continuation=True)
    tail = labelled(example)
    if tail[-1] == tokenizer.eos_id:  # complete response
        assert tokenizer.decode(tail[:-1], continuation=True) == record["response"]
        assert tail[:-1] == response_ids
    else:  # response cut at max_seq_len: a prefix of it, without EOS, filling the sequence
        assert len(ids) == max_seq_len
        assert tail == response_ids[: len(tail)] and len(tail) < len(response_ids) + 1
    return first


@HYPOTHESIS
@given(record=RECORDS)
def test_labels_decode_to_exactly_the_response_and_eos(tokenizer, record):
    assume(representable(tokenizer, record))
    example = encode_example(record, tokenizer, max_seq_len=100_000)
    first = check_invariants(example, record, tokenizer, 100_000)
    assert example["labels"][-1] == tokenizer.eos_id
    # Untruncated: the prompt tokens are exactly the prompt as generation encodes it.
    assert example["input_ids"][len(start(tokenizer)) : first] == tokenizer.encode(format_prompt(record))


@HYPOTHESIS
@given(record=RECORDS, max_seq_len=st.integers(2, 96))
def test_truncation_keeps_the_invariants(tokenizer, record, max_seq_len):
    assume(representable(tokenizer, record))
    example = encode_example(record, tokenizer, max_seq_len)
    if example is None:
        # Dropped only when even the prompt without context leaves no room for one response token.
        bare = tokenizer.encode(format_prompt({"instruction": record["instruction"], "context": ""}))
        assert len(start(tokenizer)) + len(bare) + 1 > max_seq_len
        return
    check_invariants(example, record, tokenizer, max_seq_len)


def test_context_is_shortened_before_the_response(tokenizer):
    record = {"instruction": "Summarize.", "context": "word " * 300, "response": "A short summary of the words."}
    full = encode_example(record, tokenizer, 10_000)
    example = encode_example(record, tokenizer, 80)
    assert len(full["input_ids"]) > 80 >= len(example["input_ids"]) >= 70  # context cut to fill the room
    assert tokenizer.decode(labelled(example)[:-1], continuation=True) == record["response"]
    assert labelled(example)[-1] == tokenizer.eos_id
    assert "### Context:" in tokenizer.decode(example["input_ids"])


def test_response_tail_is_cut_without_eos_when_the_context_is_gone(tokenizer):
    record = {"instruction": "Write a lot.", "context": "Some context.", "response": "many words " * 100}
    example = encode_example(record, tokenizer, 48)
    assert len(example["input_ids"]) == 48
    assert "### Context:" not in tokenizer.decode(example["input_ids"])
    assert tokenizer.eos_id not in example["input_ids"]
    assert record["response"].startswith(tokenizer.decode(labelled(example), continuation=True))


def test_drops_are_counted_with_reasons(tokenizer):
    records = [
        {"instruction": "Fine.", "context": "", "response": "Yes."},
        {"instruction": "No answer.", "context": "", "response": "   "},
        {"instruction": "word " * 50, "context": "", "response": "Too long a prompt."},
    ]
    result = encode_records(records, tokenizer, 24)
    assert [s is None for s in result.sequences] == [False, True, True]
    assert result.dropped == {DROP_EMPTY_RESPONSE: 1, DROP_PROMPT_TOO_LONG: 1}
    assert encode_example(records[2], tokenizer, 24) is None
    with pytest.raises(ValueError, match="max_seq_len"):
        encode_example(records[0], tokenizer, 1)


def test_batched_encoding_equals_encode_example_on_the_sample(tokenizer):
    records = load_local_file(embedded_sample_path()).records[:400]
    records.append({"instruction": "Sum.", "context": "word " * 200, "response": "Short.", "category": "x"})
    for max_seq_len in (48, 256):
        result = encode_records(records, tokenizer, max_seq_len, num_threads=2)
        for record, sequence in zip(records, result.sequences):
            expected = encode_example(record, tokenizer, max_seq_len)
            assert (None if sequence is None else sequence.as_example()) == expected


def test_prompt_then_response_tokens_equal_tokenizing_the_whole_text(tokenizer):
    # With the default template the prompt ends in a newline (a token boundary), so encoding the parts
    # separately gives what encoding prompt + response at once gives: no train/generation mismatch.
    for record in load_local_file(embedded_sample_path()).records[:300]:
        example = encode_example(record, tokenizer, 10_000)
        whole = tokenizer.encode(format_prompt(record) + record["response"])
        assert example["input_ids"][len(start(tokenizer)) : -1] == whole
