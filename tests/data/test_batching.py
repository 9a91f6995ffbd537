"""Batches: the shape contract, length sorting that really cuts padding, seeded order, resume, packing."""

import mlx.core as mx
import numpy as np
import pytest

from harness.data import (
    IGNORE_INDEX, EncodedSplit, batch_iterator, num_batches, padding_fraction, plan_batches, validation_batches,
)
from harness.data.batching import example_lengths
from harness.data.encode import EncodedSequence

PAD = 0


@pytest.fixture(scope="module")
def split():
    """300 synthetic examples of lengths 5..180 (long tail), prompt = first third."""
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(3.6, 0.6, 300).astype(int), 5, 180)
    sequences, records = [], []
    for i, n in enumerate(lengths):
        ids = [1] + rng.integers(3, 32000, n - 2).tolist() + [2]
        sequences.append(EncodedSequence(ids, max(1, n // 3)))
        records.append({"instruction": f"q{i}", "context": "", "response": "r", "category": "c"})
    return EncodedSplit.from_sequences(sequences, records)


def rows_of(batch):
    """Unpadded (input_ids, labels) of every non-empty row."""
    ids, labels, mask = (np.array(batch[k]) for k in ("input_ids", "labels", "attention_mask"))
    return [(ids[r, : mask[r].sum()].tolist(), labels[r, : mask[r].sum()].tolist()) for r in range(len(ids)) if mask[r].any()]


@pytest.mark.parametrize("pad_id", [0, 2])  # Mistral pads with <unk> (0), SmolLM2 with its EOS (2)
def test_batches_follow_the_contract(split, pad_id):
    batches = list(batch_iterator(split, 8, pad_id=pad_id, seed=0, max_seq_len=192))
    assert len(batches) == num_batches(split, 8) == 38
    widths = set()
    for batch in batches:
        assert set(batch) == {"input_ids", "labels", "attention_mask"}
        for value in batch.values():
            assert value.dtype == mx.int32 and value.shape[0] == 8  # a short last batch gets empty rows
        ids, labels, mask = (np.array(batch[k]) for k in ("input_ids", "labels", "attention_mask"))
        assert np.all(ids[mask == 0] == pad_id) and np.all(labels[mask == 0] == IGNORE_INDEX)
        assert np.all(np.diff(mask, axis=1) <= 0)  # right padding
        widths.add(ids.shape[1])
    assert widths <= {32, 64, 96, 128, 160, 192}
    # Every example exactly once per epoch, its tokens and labels unchanged.
    seen = sorted(row for batch in batches for row in rows_of(batch))
    assert seen == sorted((x["input_ids"], x["labels"]) for x in split)


def test_length_sorting_really_reduces_padding(split):
    lengths = example_lengths(split)
    sorted_plan = plan_batches(lengths, 8, seed=0, sort_by_length=True)
    random_plan = plan_batches(lengths, 8, seed=0, sort_by_length=False)
    sorted_padding = padding_fraction(lengths, sorted_plan, 8)
    random_padding = padding_fraction(lengths, random_plan, 8)
    print(f"padding fraction: sorted {sorted_padding:.3f}, unsorted {random_padding:.3f}")
    assert sorted_padding < 0.5 * random_padding
    # Within a sorted batch lengths are close: spread far below that of random batches.
    spread = lambda plan: np.mean([np.ptp([lengths[r[0]] for r in b]) for b in plan])  # noqa: E731
    assert spread(sorted_plan) < 0.25 * spread(random_plan)


def test_order_depends_on_seed_and_epoch_only(split):
    def order(**kwargs):
        return [tuple(r[0] for r in batch) for batch in plan_batches(example_lengths(split), 8, **kwargs)]

    assert order(seed=1, epoch=0) == order(seed=1, epoch=0)
    assert order(seed=1, epoch=0) != order(seed=1, epoch=1)
    assert order(seed=1, epoch=0) != order(seed=2, epoch=0)
    assert sorted(order(seed=1, epoch=0)) != sorted(order(seed=1, epoch=1))  # new batch contents, not just order


def test_resume_from_a_batch_index_gives_the_remaining_batches(split):
    full = list(batch_iterator(split, 8, pad_id=PAD, seed=5, epoch=2))
    resumed = list(batch_iterator(split, 8, pad_id=PAD, seed=5, epoch=2, start_batch=17))
    assert len(resumed) == len(full) - 17
    for a, b in zip(full[17:], resumed):
        assert all(np.array_equal(np.array(a[k]), np.array(b[k])) for k in a)


def test_validation_batches_are_fixed_and_complete(split):
    first = list(validation_batches(split, 16, pad_id=PAD))
    second = list(validation_batches(split, 16, pad_id=PAD))
    assert len(first) == 19
    assert all(np.array_equal(np.array(a["input_ids"]), np.array(b["input_ids"])) for a, b in zip(first, second))
    seen = sorted(row for batch in first for row in rows_of(batch))
    assert seen == sorted((x["input_ids"], x["labels"]) for x in split)


def test_plain_lists_of_examples_are_accepted(split):
    as_list = [split[i] for i in range(40)]
    a = list(batch_iterator(as_list, 4, pad_id=PAD, seed=0))
    b = list(batch_iterator(split[:40], 4, pad_id=PAD, seed=0))
    assert all(np.array_equal(np.array(x[k]), np.array(y[k])) for x, y in zip(a, b) for k in x)


def test_packing_keeps_examples_apart(split):
    batches = list(batch_iterator(split, 4, pad_id=PAD, seed=0, pack=True, max_seq_len=256))
    assert len(batches) == num_batches(split, 4, seed=0, pack=True, max_seq_len=256)
    found = []
    for batch in batches:
        ids, labels, mask, segments = (np.array(batch[k]) for k in ("input_ids", "labels", "attention_mask", "segment_ids"))
        assert ids.shape[1] <= 256
        assert np.array_equal(mask, (segments > 0).astype(np.int32))
        for r in range(len(ids)):
            for s in range(1, segments[r].max() + 1):
                where = np.flatnonzero(segments[r] == s)
                assert np.array_equal(where, np.arange(where[0], where[-1] + 1))  # contiguous
                assert ids[r, where[0]] == 1 and labels[r, where[0]] == IGNORE_INDEX  # no loss across examples
                found.append((ids[r, where].tolist(), labels[r, where].tolist()))
    assert sorted(found) == sorted((x["input_ids"], x["labels"]) for x in split)
    lengths = example_lengths(split)
    packed = padding_fraction(lengths, plan_batches(lengths, 4, seed=0, pack=True, pack_capacity=256), 4, 32, 256)
    unpacked = padding_fraction(lengths, plan_batches(lengths, 4, seed=0), 4, 32, 256)
    assert packed < unpacked


def test_batching_options_come_from_the_data_config(split):
    from harness.data import DataConfig, batching_options

    cfg = DataConfig(max_seq_len=96, pad_to_multiple=16, pack=True)
    short = [x for x in split if len(x["input_ids"]) <= 96]
    batches = list(batch_iterator(short, 4, pad_id=PAD, seed=0, **batching_options(cfg)))
    assert all("segment_ids" in b and b["input_ids"].shape[1] % 16 == 0 and b["input_ids"].shape[1] <= 96 for b in batches)


def test_packed_rows_give_the_same_logits_as_separate_examples():
    import models

    args = models.ModelArgs(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=None,
    )
    mx.random.seed(0)
    model = models.MistralForCausalLM(args)
    examples = [{"input_ids": [1, *range(3, 3 + n)], "labels": [IGNORE_INDEX, *range(3, 3 + n)]} for n in (9, 5, 12)]
    batch = next(batch_iterator(examples, 1, pad_id=PAD, shuffle=False, pack=True, max_seq_len=32, pad_to_multiple=8))
    logits = model(batch["input_ids"], segment_ids=batch["segment_ids"])
    segments = np.array(batch["segment_ids"])[0]
    for s in range(1, 4):
        where = np.flatnonzero(segments == s)
        alone = model(mx.array(np.array(batch["input_ids"])[:, where]))
        assert np.allclose(np.array(logits[0, where[0] : where[-1] + 1]), np.array(alone[0]), atol=1e-4)
