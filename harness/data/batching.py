"""Batches for MLX: length-sorted buckets, a few padded shapes, seeded shuffling, resumable; optional packing.

A batch is a dict of `mx.array`: `input_ids (B, L) int32`, `labels (B, L) int32` (-100 where no loss, not
shifted), `attention_mask (B, L) int32` (1 on real tokens; right padding with the tokenizer's `pad_id`, never
labelled) and, when packing,
`segment_ids (B, L) int32` (1.. per example in a row, 0 on padding). `B` is always `batch_size` (a short last
batch is filled with empty rows, all padding) and `L` is a multiple of `pad_to_multiple` capped at
`max_seq_len`, so a compiled step sees few distinct shapes.

`examples` is any sequence of example dicts (`input_ids`, `labels`), e.g. an `EncodedSplit` (read directly
from its flat arrays).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence

import mlx.core as mx
import numpy as np

from harness.data.encode import IGNORE_INDEX
from harness.data.examples import EncodedSplit

Plan = list[list[list[int]]]  # batches -> rows -> example indices (one per row unless packed)


def example_lengths(examples: Sequence) -> np.ndarray:
    """Tokens per example, `(n,)` int64."""
    if isinstance(examples, EncodedSplit):
        return examples.lengths
    return np.array([len(example["input_ids"]) for example in examples], dtype=np.int64)


def _ids_and_labels(examples: Sequence, index: int) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(examples, EncodedSplit):
        return examples.input_ids(index), examples.labels(index)
    example = examples[index]
    return np.asarray(example["input_ids"], np.int32), np.asarray(example["labels"], np.int32)


def padded_length(length: int, pad_to_multiple: int, max_seq_len: int | None = None) -> int:
    """`length` rounded up to a multiple of `pad_to_multiple`, capped at `max_seq_len` (when that is larger
    than `length`)."""
    padded = -(-length // pad_to_multiple) * pad_to_multiple
    if max_seq_len is not None and length <= max_seq_len:
        padded = min(padded, max_seq_len)
    return padded


def _epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch])


def _pack_rows(indices: np.ndarray, lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Best-fit-decreasing bin packing of `indices` into rows of at most `capacity` tokens (order: longest
    first, each into the fullest row that still has room)."""
    order = sorted(indices.tolist(), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free tokens, row index), sorted
    for i in order:
        need = int(lengths[i])
        if need > capacity:
            raise ValueError(f"example {i} has {need} tokens, more than the packing capacity {capacity}")
        slot = bisect.bisect_left(free, (need, -1))
        if slot == len(free):
            rows.append([i])
            bisect.insort(free, (capacity - need, len(rows) - 1))
        else:
            room, row = free.pop(slot)
            rows[row].append(i)
            bisect.insort(free, (room - need, row))
    return rows


def plan_batches(
    lengths: np.ndarray,
    batch_size: int,
    *,
    seed: int = 0,
    epoch: int = 0,
    shuffle: bool = True,
    sort_by_length: bool = True,
    sort_chunk_batches: int = 64,
    pack: bool = False,
    pack_capacity: int | None = None,
) -> Plan:
    """Which examples go in which batch (and row), for one epoch; the same arguments give the same plan.

    Examples are shuffled (seed, epoch), cut into chunks of `batch_size * sort_chunk_batches`, and within each
    chunk sorted by length (longest first) before being cut into batches, so a batch holds examples of similar
    length while the data stays random across chunks. With `pack`, each chunk is instead packed into rows of
    at most `pack_capacity` tokens. Batch order is then shuffled.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    rng = _epoch_rng(seed, epoch)
    n = len(lengths)
    order = rng.permutation(n) if shuffle else np.arange(n)
    chunk = batch_size * max(1, sort_chunk_batches)
    rows: list[list[int]] = []
    for start in range(0, n, chunk):
        part = order[start : start + chunk]
        if pack:
            rows.extend(_pack_rows(part, lengths, int(pack_capacity or lengths.max())))
        else:
            if sort_by_length:
                part = part[np.argsort(-lengths[part], kind="stable")]
            rows.extend([int(i)] for i in part)
    batches = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    if shuffle:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def padding_fraction(
    lengths: np.ndarray, plan: Plan, batch_size: int, pad_to_multiple: int = 1, max_seq_len: int | None = None
) -> float:
    """Share of the positions of all batch arrays `(B, L)` of `plan` that are padding."""
    real = total = 0
    for batch in plan:
        row_lengths = [int(sum(lengths[i] for i in row)) for row in batch]
        width = padded_length(max(row_lengths), pad_to_multiple, max_seq_len)
        real += sum(row_lengths)
        total += batch_size * width
    return 1.0 - real / total if total else 0.0


def collate(
    examples: Sequence, batch: list[list[int]], batch_size: int, pad_to_multiple: int, max_seq_len: int | None,
    pack: bool, pad_id: int,
) -> dict[str, np.ndarray]:
    """Numpy arrays of one batch (see the module docstring); rows past `len(batch)` are empty."""
    parts = [[_ids_and_labels(examples, i) for i in row] for row in batch]
    row_lengths = [sum(len(ids) for ids, _ in row) for row in parts]
    width = padded_length(max(row_lengths), pad_to_multiple, max_seq_len)
    input_ids = np.full((batch_size, width), pad_id, np.int32)
    labels = np.full((batch_size, width), IGNORE_INDEX, np.int32)
    attention_mask = np.zeros((batch_size, width), np.int32)
    segment_ids = np.zeros((batch_size, width), np.int32)
    for r, row in enumerate(parts):
        position = 0
        for segment, (ids, row_labels) in enumerate(row, start=1):
            end = position + len(ids)
            input_ids[r, position:end] = ids
            labels[r, position:end] = row_labels  # starts with BOS or a prompt token (label -100): no loss across examples
            segment_ids[r, position:end] = segment
            position = end
        attention_mask[r, :position] = 1
    arrays = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
    if pack:
        arrays["segment_ids"] = segment_ids
    return arrays


def batching_options(cfg) -> dict:
    """The keyword arguments of `batch_iterator` that a `DataConfig` (or `cfg.data`) holds."""
    return {
        "pad_to_multiple": cfg.pad_to_multiple,
        "sort_by_length": cfg.sort_by_length,
        "sort_chunk_batches": cfg.sort_chunk_batches,
        "pack": cfg.pack,
        "max_seq_len": cfg.max_seq_len,
    }


def num_batches(
    examples: Sequence,
    batch_size: int,
    *,
    seed: int = 0,
    epoch: int = 0,
    pack: bool = False,
    max_seq_len: int | None = None,
    sort_chunk_batches: int = 64,
) -> int:
    """Batches in one epoch of `batch_iterator` with the same arguments (without packing: ceil(n / batch_size);
    with packing it depends on the packed rows, so on `seed` and `epoch` too)."""
    if not pack:
        return -(-len(examples) // batch_size)
    plan = plan_batches(
        example_lengths(examples), batch_size, seed=seed, epoch=epoch, sort_chunk_batches=sort_chunk_batches,
        pack=True, pack_capacity=max_seq_len,
    )
    return len(plan)


def batch_iterator(
    examples: Sequence,
    batch_size: int,
    *,
    pad_id: int,
    seed: int = 0,
    epoch: int = 0,
    shuffle: bool = True,
    sort_by_length: bool = True,
    sort_chunk_batches: int = 64,
    pad_to_multiple: int = 32,
    max_seq_len: int | None = None,
    pack: bool = False,
    start_batch: int = 0,
) -> Iterator[dict[str, mx.array]]:
    """Training batches of one epoch (see `plan_batches` for the order and the module docstring for shapes).

    `epoch` changes the shuffle; `start_batch` skips the first batches of the epoch (resume at a batch index:
    the remaining batches are exactly those an uninterrupted run would see). `max_seq_len` caps the padded
    length and is the row capacity when packing (default: the longest example). `pad_id`: the tokenizer's.
    """
    lengths = example_lengths(examples)
    plan = plan_batches(
        lengths, batch_size, seed=seed, epoch=epoch, shuffle=shuffle, sort_by_length=sort_by_length,
        sort_chunk_batches=sort_chunk_batches, pack=pack, pack_capacity=max_seq_len,
    )
    for batch in plan[start_batch:]:
        arrays = collate(examples, batch, batch_size, pad_to_multiple, max_seq_len, pack, pad_id)
        yield {name: mx.array(value) for name, value in arrays.items()}


def validation_batches(
    examples: Sequence, batch_size: int, *, pad_id: int, pad_to_multiple: int = 32, max_seq_len: int | None = None
) -> Iterator[dict[str, mx.array]]:
    """Batches of the whole validation set in a fixed order (by length, ties by index): the same every call,
    so validation losses are comparable between steps and between trials. `pad_id`: the tokenizer's."""
    lengths = example_lengths(examples)
    order = np.argsort(-lengths, kind="stable").tolist()
    for start in range(0, len(order), batch_size):
        batch = [[i] for i in order[start : start + batch_size]]
        arrays = collate(examples, batch, batch_size, pad_to_multiple, max_seq_len, pack=False, pad_id=pad_id)
        yield {name: mx.array(value) for name, value in arrays.items()}


class RunBatches:
    """A training run's batch sources, from its config (`trainer` sizes and seed, `data` batching options).

    `train(epoch, start_batch)`: the shuffled training batches of `epoch` from `start_batch` on (the same every
    time); `validate()`: the validation batches (the first `trainer.max_eval_examples` examples, when set);
    `per_epoch`: training batches per epoch; `validation`: the validation examples.
    """

    def __init__(self, cfg, data, pad_id: int) -> None:
        self._trainer, self._data_cfg, self._train, self._pad_id = cfg.trainer, cfg.data, data.train, pad_id
        validation = data.validation
        if self._trainer.max_eval_examples is not None:
            validation = validation[: self._trainer.max_eval_examples]
        self.validation = validation
        self.per_epoch = num_batches(
            data.train,
            self._trainer.batch_size,
            seed=self._trainer.seed,
            pack=self._data_cfg.pack,
            max_seq_len=self._data_cfg.max_seq_len,
            sort_chunk_batches=self._data_cfg.sort_chunk_batches,
        )

    def train(self, epoch: int, start_batch: int = 0) -> Iterator[dict[str, mx.array]]:
        return batch_iterator(
            self._train,
            self._trainer.batch_size,
            seed=self._trainer.seed,
            epoch=epoch,
            shuffle=True,
            start_batch=start_batch,
            pad_id=self._pad_id,
            **batching_options(self._data_cfg),
        )

    def validate(self) -> Iterator[dict[str, mx.array]]:
        data_cfg = self._data_cfg
        return validation_batches(
            self.validation,
            self._trainer.eval_batch_size,
            pad_id=self._pad_id,
            pad_to_multiple=data_cfg.pad_to_multiple,
            max_seq_len=data_cfg.val_max_seq_len or data_cfg.max_seq_len,
        )
