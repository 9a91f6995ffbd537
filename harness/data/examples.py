"""`EncodedSplit`: the tokenized examples of one split, stored flat (numpy) and read as example dicts."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from harness.data.encode import IGNORE_INDEX, EncodedSequence
from harness.data.errors import DataError


class EncodedSplit(Sequence):
    """A sequence of examples backed by flat arrays: tokens of all examples end to end, `offsets` (n + 1),
    `prompt_lengths` (BOS + prompt tokens, which carry no label) and the record each example came from.

    `split[i]` is a dict with `input_ids`, `attention_mask`, `labels` (lists of int, unpadded) and `record`
    (instruction/context/response/category: the text to build generation prompts from).
    """

    def __init__(
        self,
        tokens: np.ndarray,
        offsets: np.ndarray,
        prompt_lengths: np.ndarray,
        records: list[dict[str, str]],
    ):
        if not (len(offsets) == len(prompt_lengths) + 1 == len(records) + 1):
            raise ValueError("offsets, prompt_lengths and records disagree on the number of examples")
        self.tokens = np.asarray(tokens, dtype=np.int32)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.prompt_lengths = np.asarray(prompt_lengths, dtype=np.int32)
        self.records = records

    @classmethod
    def from_sequences(
        cls, sequences: Sequence[EncodedSequence], records: list[Mapping[str, str]]
    ) -> EncodedSplit:
        lengths = np.fromiter((len(s.input_ids) for s in sequences), dtype=np.int64, count=len(sequences))
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        tokens = np.fromiter(
            (t for s in sequences for t in s.input_ids), dtype=np.int32, count=int(offsets[-1])
        )
        prompt_lengths = np.array([s.prompt_length for s in sequences], dtype=np.int32)
        return cls(tokens, offsets, prompt_lengths, [dict(r) for r in records])

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per example, `(n,)` int64."""
        return np.diff(self.offsets)

    @property
    def num_label_tokens(self) -> int:
        """Tokens that carry a label (response + EOS) over the split."""
        return int(self.lengths.sum() - self.prompt_lengths.sum())

    def __len__(self) -> int:
        return len(self.records)

    def input_ids(self, index: int) -> np.ndarray:
        return self.tokens[self.offsets[index] : self.offsets[index + 1]]

    def labels(self, index: int) -> np.ndarray:
        labels = self.input_ids(index).copy()
        labels[: self.prompt_lengths[index]] = IGNORE_INDEX
        return labels

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        ids = self.input_ids(index)
        return {
            "input_ids": ids.tolist(),
            "attention_mask": [1] * len(ids),
            "labels": self.labels(index).tolist(),
            "record": self.records[index],
        }

    def save(self, directory: Path, name: str) -> None:
        """Write `<name>.npz` (arrays) and `<name>.records.jsonl` into `directory`."""
        np.savez(
            directory / f"{name}.npz",
            tokens=self.tokens,
            offsets=self.offsets,
            prompt_lengths=self.prompt_lengths,
        )
        with (directory / f"{name}.records.jsonl").open("w", encoding="utf-8") as f:
            for record in self.records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, directory: Path, name: str) -> EncodedSplit:
        """Read a split written by `save`, checked; a damaged file is a `DataError` naming it."""
        arrays_file, records_file = directory / f"{name}.npz", directory / f"{name}.records.jsonl"
        try:
            with np.load(arrays_file, allow_pickle=False) as arrays:
                tokens, offsets, prompt_lengths = arrays["tokens"], arrays["offsets"], arrays["prompt_lengths"]
        except Exception as err:  # zipfile, numpy and OS errors of a truncated or overwritten file
            raise DataError(f"{arrays_file}: unreadable ({type(err).__name__}: {err})") from err
        lengths = np.diff(offsets)
        if (
            offsets.ndim != 1 or len(offsets) == 0 or offsets[0] != 0 or offsets[-1] != len(tokens)
            or (lengths < 0).any() or len(prompt_lengths) != len(lengths) or (prompt_lengths > lengths).any()
            or (tokens < 0).any()
        ):
            raise DataError(f"{arrays_file}: inconsistent arrays (offsets, tokens, prompt lengths)")
        records = []
        try:
            with records_file.open("r", encoding="utf-8") as f:
                for line_number, line in enumerate(f, start=1):
                    record = json.loads(line)
                    if not isinstance(record, dict):
                        raise ValueError(f"line {line_number} is not a JSON object")
                    records.append(record)
        except (OSError, ValueError) as err:
            raise DataError(f"{records_file}: unreadable ({err})") from err
        if len(records) != len(prompt_lengths):
            raise DataError(f"{records_file}: {len(records)} records for {len(prompt_lengths)} examples")
        return cls(tokens, offsets, prompt_lengths, records)
