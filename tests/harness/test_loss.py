"""The objective: next-token cross-entropy, summed over labelled tokens, shifted by one position."""

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

from harness.step.loss import causal_lm_loss
from harness.step.standard import TrainStep
from models.lora import LoRASpec, apply_lora
from models.mistral import MistralForCausalLM, ModelArgs
from tests.conftest import TINY_MISTRAL_CONFIG


def tiny_model(seed=0) -> MistralForCausalLM:
    mx.random.seed(seed)
    return MistralForCausalLM(ModelArgs(**{**TINY_MISTRAL_CONFIG, "vocab_size": 97}))


def batch(rows: list[list[int]], prompt: list[int], length: int) -> dict:
    ids = np.zeros((len(rows), length), np.int32)
    labels = np.full((len(rows), length), -100, np.int32)
    for i, (row, p) in enumerate(zip(rows, prompt)):
        ids[i, : len(row)] = row
        labels[i, p : len(row)] = row[p:]
    return {
        "input_ids": mx.array(ids),
        "labels": mx.array(labels),
        "attention_mask": mx.array(np.arange(length)[None] < np.array([len(r) for r in rows])[:, None]),
    }


def test_loss_is_shifted_token_sum_over_labels_only():
    model = tiny_model()
    b = batch([[1, 5, 9, 13, 17, 2], [1, 7, 8, 2]], prompt=[3, 1], length=8)
    total, count = causal_lm_loss(model, b)
    logits = np.array(model(b["input_ids"]).astype(mx.float32))
    logp = (
        logits
        - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - logits.max(-1, keepdims=True)
    )
    labels = np.array(b["labels"])
    expected, n = 0.0, 0
    for r in range(2):
        for t in range(1, 8):
            if labels[r, t] != -100:
                expected -= logp[r, t - 1, labels[r, t]]
                n += 1
    assert int(count) == n == 3 + 3
    assert float(total) == pytest.approx(expected, rel=1e-5)


def test_padding_rows_change_nothing():
    model = tiny_model()
    one = batch([[1, 5, 9, 13, 2]], prompt=[2], length=8)
    padded = batch([[1, 5, 9, 13, 2], [0]], prompt=[2, 1], length=8)
    a, b = causal_lm_loss(model, one), causal_lm_loss(model, padded)
    assert int(a[1]) == int(b[1]) and float(a[0]) == pytest.approx(float(b[0]), rel=1e-6)


def test_accumulated_micro_batches_equal_one_big_batch():
    """Gradients are summed over tokens and divided by the total count, so 2 x 1 row == 1 x 2 rows."""
    import mlx.optimizers as optim

    rows, prompts = [[1, 5, 9, 13, 17, 21, 2], [1, 7, 2]], [2, 1]
    results = []
    for split in (False, True):
        model = tiny_model()
        mx.random.seed(1)
        apply_lora(model, LoRASpec(rank=2, alpha=4.0))
        # B starts at zero: give it values so the first step's gradients reach A too.
        model.update(tree_map(lambda p: p + 0.05, model.trainable_parameters()))
        optimizer = optim.AdamW(learning_rate=1e-2)
        optimizer.init(model.trainable_parameters())
        step = TrainStep(model, optimizer, grad_clip=0.5, compile=True)
        if split:
            loss, n, _ = step([batch(rows[:1], prompts[:1], 8), batch(rows[1:], prompts[1:], 8)])
        else:
            loss, n, _ = step([batch(rows, prompts, 8)])
        results.append((float(loss), int(n), dict(tree_flatten(model.trainable_parameters()))))
    (loss_a, n_a, params_a), (loss_b, n_b, params_b) = results
    assert n_a == n_b == 7 and loss_a == pytest.approx(loss_b, rel=1e-5)
    for key in params_a:
        np.testing.assert_allclose(
            np.array(params_a[key]), np.array(params_b[key]), rtol=1e-4, atol=5e-5
        )  # Adam magnifies float noise in tiny gradients
