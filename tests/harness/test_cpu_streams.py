"""CPU streams: a micro-batch's rows split over streams give one stream's numbers; the plan picks the streams."""

import copy
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten

from harness.step.cpu_streams import EVAL_ORDER_WIDTH, cpu_cores, plan_cpu_streams, split_rows
from harness.step.factory import make_eval_step, make_train_step
from harness.step.standard import TrainStep
from harness.loop import evaluate
from models import blas
from models.backend import backend_name
from tests.harness.tiny_lora import tiny_lora_model

REPO = Path(__file__).resolve().parents[2]


def _model():
    return tiny_lora_model(num_layers=2)


def _batch(seed, rows=4, packed=False):
    ids = mx.random.randint(3, 300, (rows, 16), key=mx.random.key(seed))
    prompt = mx.arange(16)[None] < mx.arange(2, 2 + rows)[:, None]  # prompts of different lengths: no loss
    batch = {"input_ids": ids, "labels": mx.where(prompt, -100, ids)}
    if packed:  # two sequences per row, longer together than the sliding window
        batch["segment_ids"] = mx.array([[0] * (5 + r) + [1] * (11 - r) for r in range(rows)])
    return batch


def _run(model, schedule, streams, compile=True):
    optimizer = optim.SGD(learning_rate=0.5)  # updates linear in the gradients (Adam's would magnify rounding)
    step = TrainStep(model, optimizer, grad_clip=0.5, compile=compile, streams=streams)
    results = []
    for batches in schedule:
        loss, n_tokens, norm = step(batches)
        mx.eval(loss, n_tokens, norm, model.parameters(), optimizer.state)
        results.append((loss.item(), n_tokens.item(), norm.item()))
    return results, dict(tree_flatten(model.trainable_parameters()))


@pytest.mark.parametrize("case", ["plain", "packed", "odd_rows", "three_streams", "accumulation", "uncompiled"])
def test_rows_split_over_streams_give_one_streams_numbers(case):
    rows = 3 if case == "odd_rows" else 4
    if case == "accumulation":
        schedule = [[_batch(1), _batch(2)], [_batch(3), _batch(4)]]
    else:
        schedule = [[_batch(s, rows, packed=case == "packed")] for s in (1, 2, 3)]
    streams = 3 if case == "three_streams" else 2
    reference = _model()
    split = copy.deepcopy(reference)
    expected, expected_params = _run(reference, schedule, 1, compile=case != "uncompiled")
    got, got_params = _run(split, schedule, streams, compile=case != "uncompiled")
    for (loss, n, norm), (loss_ref, n_ref, norm_ref) in zip(got, expected):
        assert n == n_ref
        assert loss == pytest.approx(loss_ref, rel=1e-5)
        assert norm == pytest.approx(norm_ref, rel=1e-4)
    for name, value in expected_params.items():
        np.testing.assert_allclose(np.array(got_params[name]), np.array(value), rtol=1e-4, atol=1e-6, err_msg=name)


def test_a_step_makes_its_own_streams_only_for_more_than_one():
    model = _model()
    step = TrainStep(model, optim.AdamW(learning_rate=1e-2), grad_clip=0.0, streams=2)
    assert len(step.streams) == 2 and step.streams[0] != step.streams[1]
    assert TrainStep(model, optim.AdamW(learning_rate=1e-2), grad_clip=0.0, streams=1).streams == []
    assert make_train_step(model, optim.AdamW(learning_rate=1e-2), grad_clip=0.0, streams=2).streams


@pytest.mark.parametrize("rows, parts, sizes", [(8, 2, [4, 4]), (3, 2, [2, 1]), (5, 3, [2, 1, 2]), (2, 4, [1, 1])])
def test_split_rows_cuts_every_array_alike_in_order(rows, parts, sizes):
    batch = {"input_ids": mx.arange(rows * 3).reshape(rows, 3), "labels": -mx.arange(rows * 3).reshape(rows, 3)}
    pieces = split_rows(batch, parts)
    assert [p["input_ids"].shape[0] for p in pieces] == sizes
    for key in batch:
        assert mx.array_equal(mx.concatenate([p[key] for p in pieces]), batch[key])


@pytest.fixture
def clean_eval_order(monkeypatch):
    monkeypatch.delenv("MLX_BFS_MAX_WIDTH", raising=False)


def test_automatic_plan_uses_a_stream_per_core_each_with_its_share_of_blas_threads(clean_eval_order):
    if backend_name() != "cpu" or blas.blas_threads() is None:
        assert plan_cpu_streams(None, 8) == 1  # a GPU, or a BLAS whose threads cannot be set: one stream
        return
    cores = cpu_cores()
    streams = plan_cpu_streams(None, 8)
    assert streams == min(cores, 8)
    if streams > 1:
        assert blas.blas_threads() == max(1, cores // streams)
        assert os.environ["MLX_BFS_MAX_WIDTH"] == EVAL_ORDER_WIDTH
    assert plan_cpu_streams(None, 1) == 1  # one row cannot be split


def test_plan_honours_explicit_settings_and_refuses_bad_ones(clean_eval_order):
    assert plan_cpu_streams(1, 8) == 1
    assert "MLX_BFS_MAX_WIDTH" not in os.environ  # one stream leaves MLX's order alone
    if backend_name() == "cpu":
        assert plan_cpu_streams(4, 2) == 2  # never more streams than rows
    else:
        with pytest.warns(UserWarning, match="CPU backend"):
            assert plan_cpu_streams(4, 2) == 1  # GPUs run one stream
    with pytest.warns(UserWarning, match="gradient checkpointing"):
        assert plan_cpu_streams(2, 8, checkpointing=True) == 1
    with pytest.raises(ValueError, match="trainer.cpu_streams"):
        plan_cpu_streams(0, 8)


@pytest.mark.skipif(backend_name() != "cpu", reason="CPU-specific: the wide evaluation order serves CPU streams")
@pytest.mark.parametrize("compiled", [False, True])
def test_the_loss_keeps_about_one_block_of_logits_alive_in_a_wide_evaluation_order(compiled):
    """The loss's vocabulary blocks are chained: in MLX's order as wide as streams need it, the loss of 2,048
    positions over 32,000 words holds a block of logits (2 MB) and its temporaries at a time, not all 136 of
    them (without the chain: 787 MB at its peak)."""
    code = (
        "import models, mlx.core as mx\n"
        "from models.cross_entropy import linear_cross_entropy\n"
        "h = mx.random.normal((2048, 64)); w = 0.1 * mx.random.normal((32000, 64))\n"
        "labels = mx.random.randint(0, 32000, (2048,)); mx.eval(h, w, labels)\n"
        "grad = mx.grad(lambda h: linear_cross_entropy(h, w, labels, exp='polynomial', chunk_size=256,"
        " vocab_block=1953)[0])\n"
        f"grad = mx.compile(grad) if {compiled} else grad\n"
        "base = mx.get_active_memory(); mx.reset_peak_memory(); mx.eval(grad(h))\n"
        "print((mx.get_peak_memory() - base) / 1e6)\n"
    )
    env = {**os.environ, "MLX_BFS_MAX_WIDTH": EVAL_ORDER_WIDTH}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, check=True)
    peak_mb = float(proc.stdout.strip())
    all_blocks_mb = 136 * 256 * 1953 * 4 / 1e6
    assert peak_mb < 150, f"{peak_mb:.0f} MB above the inputs (the logits of all blocks: {all_blocks_mb:.0f} MB)"


@pytest.mark.parametrize("compile", [True, False])
def test_validation_over_streams_gives_one_streams_loss(compile):
    model = _model()
    batches = [_batch(s, rows=3, packed=s == 2) for s in (1, 2, 3)]
    expected = evaluate(model, batches, make_eval_step(model, compile=compile))
    got = evaluate(model, batches, make_eval_step(model, compile=compile, streams=2))
    assert got[1] == expected[1]
    assert got[0] == pytest.approx(expected[0], rel=1e-6)


def test_the_streams_dequantize_each_weight_once_for_the_run_and_drop_the_copies_with_the_model(monkeypatch):
    import gc

    from models import dense_copies, quant

    calls = []
    build = quant._dense_weight
    monkeypatch.setattr(quant, "_dense_weight", lambda *a, **k: calls.append(a[2]["weight"].shape) or build(*a, **k))
    model = _model()
    quantized = [m for _, m in model.named_modules() if isinstance(m, quant.QuantizedLinear)]
    # uncompiled, so that every call runs the Python that dequantizes (a compiled step replays its first trace)
    train_step = make_train_step(model, optim.SGD(learning_rate=0.1), grad_clip=1.0, compile=False, streams=2)
    eval_step = make_eval_step(model, compile=False, streams=2)
    for seed in (1, 2, 3):  # three training steps and a validation pass after each
        mx.eval(train_step([_batch(seed)]), model.parameters())
        mx.eval(eval_step(_batch(seed + 10)))
    assert len(calls) == len(quantized) == 14  # once per weight for the run, shared by both steps and streams
    model_id = id(model)
    assert model_id in dense_copies._KEPT
    del model, quantized, train_step, eval_step
    gc.collect()
    assert model_id not in dense_copies._KEPT  # freed with the model
