"""The train/validation split: deterministic, disjoint, complete, stratified by category."""

from collections import Counter

import numpy as np
import pytest

from harness.data.split import split_indices

from tests.data.conftest import dolly_records

CATEGORIES = ("open_qa", "closed_qa", "summarization", "brainstorming", "creative_writing")


@pytest.mark.parametrize("stratify", [True, False])
def test_split_is_deterministic_disjoint_and_complete(stratify):
    records = dolly_records(503, categories=CATEGORIES)
    train, val = split_indices(records, 0.1, seed=3, stratify=stratify)
    assert set(train.tolist()).isdisjoint(val.tolist())
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(503))
    assert len(val) == pytest.approx(50, abs=3)
    again_train, again_val = split_indices(records, 0.1, seed=3, stratify=stratify)
    assert np.array_equal(train, again_train) and np.array_equal(val, again_val)
    _, other_val = split_indices(records, 0.1, seed=4, stratify=stratify)
    assert not np.array_equal(val, other_val)


def test_stratified_split_keeps_category_proportions():
    categories = ["big"] * 900 + ["small"] * 90 + ["tiny"] * 3
    records = [{"category": c} for c in categories]
    _, val = split_indices(records, 0.1, seed=0, stratify=True)
    counts = Counter(categories[i] for i in val)
    assert counts == {"big": 90, "small": 9, "tiny": 1}  # even a 3-record category reaches validation


def test_split_does_not_depend_on_the_order_of_other_categories():
    records = dolly_records(200, categories=CATEGORIES)
    _, val = split_indices(records, 0.2, seed=1)
    reordered = sorted(range(200), key=lambda i: records[i]["category"])  # same per-category order
    _, val_reordered = split_indices([records[i] for i in reordered], 0.2, seed=1)
    assert sorted(reordered[i] for i in val_reordered) == val.tolist()


def test_zero_validation_fraction_and_bad_fraction():
    train, val = split_indices(dolly_records(10), 0.0)
    assert len(train) == 10 and len(val) == 0
    with pytest.raises(ValueError, match="val_fraction"):
        split_indices(dolly_records(10), 1.0)
