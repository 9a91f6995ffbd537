"""The seeded, deterministic train/validation split of records."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def split_indices(
    records: Sequence[Mapping[str, str]], val_fraction: float, *, seed: int = 0, stratify: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the train and validation records, each sorted ascending; disjoint and together complete.

    The same records, fraction and seed always give the same split. With `stratify`, each category is split
    on its own (its validation share rounded, at least one record when the category has two or more), so small
    categories appear in both splits; otherwise the whole set is shuffled once and cut.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n = len(records)
    rng = np.random.default_rng(seed)
    if stratify:
        groups: dict[str, list[int]] = {}
        for index, record in enumerate(records):
            groups.setdefault(record.get("category", ""), []).append(index)
        val: list[int] = []
        for category in sorted(groups):  # sorted: the result must not depend on record order per category
            members = np.array(groups[category])
            count = int(round(len(members) * val_fraction))
            if val_fraction > 0 and count == 0 and len(members) >= 2:
                count = 1
            val.extend(rng.permutation(members)[:count].tolist())
        val_idx = np.array(sorted(val), dtype=np.int64)
    else:
        count = int(round(n * val_fraction))
        val_idx = np.sort(rng.permutation(n)[:count]).astype(np.int64)
    is_val = np.zeros(n, dtype=bool)
    is_val[val_idx] = True
    return np.flatnonzero(~is_val), val_idx
