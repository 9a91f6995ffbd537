"""In-process training runs on a tiny model: learning, W&B + metrics.jsonl, checkpoints, resume, divergence."""

import json
import math

import mlx.core as mx
import numpy as np
import pytest

from harness import build
from harness.run_state import OPTIMIZER_FILE, RunStateError, checkpoint_dir, read_state
from harness.tracking import read_metrics
from harness.train import prepare_data, train
from harness.step.factory import make_eval_step
from harness.loop import evaluate
from tests.harness.conftest import FAST


def adapters_of(run_dir, which="latest"):
    return mx.load(str(checkpoint_dir(run_dir, which) / "adapters.safetensors"))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, hermetic_env):
    """One fast run with W&B offline, shared by the assertions below."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from harness.cli import CONFIG_DIR

    run_dir = tmp_path_factory.mktemp("finished_run")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR):
        cfg = compose(
            "train",
            overrides=[
                *FAST,
                f"paths.outputs={run_dir}",
                "logger=wandb",
                "optim.lr=3e-3",
                "trainer.max_steps=9",
            ],
        )
    GlobalHydra.instance().clear()
    value = train(cfg, run_dir=run_dir)
    return cfg, run_dir, value


def test_validation_loss_falls_and_train_returns_the_best(finished_run):
    _, run_dir, value = finished_run
    vals = [(r["step"], r["val/loss"]) for r in read_metrics(run_dir) if "val/loss" in r]
    assert [s for s, _ in vals] == [0, 3, 6, 9]
    assert vals[-1][1] < vals[0][1] - 0.1, vals
    assert value == pytest.approx(min(v for _, v in vals))
    state = read_state(run_dir)
    assert state.finished and state.step == 9 and state.best_val_loss == pytest.approx(value)


def test_metrics_jsonl_and_wandb_offline_run_hold_the_run(finished_run):
    cfg, run_dir, _ = finished_run
    records = read_metrics(run_dir)
    train_records = [r for r in records if "train/loss" in r]
    for key in ("train/lr", "train/tokens_per_second", "train/peak_memory_gb", "train/grad_norm"):
        assert all(key in r for r in train_records)
    assert any(r.get("model/trainable_parameters", 0) > 0 for r in records)
    stored = next(r for r in records if "model/quantized_bits_per_weight" in r)
    # Row-wise 4-bit: 4 bits per weight plus a float32 scale and bias (64 bits) per output row of each projection.
    arch = cfg.model.arch
    h, inter = arch.hidden_size, arch.intermediate_size
    kv = arch.num_key_value_heads * h // arch.num_attention_heads
    shapes = [(h, h), (kv, h), (kv, h), (h, h), (inter, h), (inter, h), (h, inter)]  # (out, in)
    expected = 4 + 64 * sum(o for o, _ in shapes) / sum(o * i for o, i in shapes)
    assert stored["model/quantized_bits_per_weight"] == pytest.approx(expected)
    assert stored["model/bits_per_weight"] > expected  # dense embeddings and norms count too
    assert any(
        "val/perplexity" in r and r["val/perplexity"] == pytest.approx(math.exp(r["val/loss"]))
        for r in records
    )
    summary = [r for r in records if r.get("summary")][-1]
    assert summary["best_val_loss"] == pytest.approx(min(r["val/loss"] for r in records if "val/loss" in r))
    runs = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0
    generations = [json.loads(line) for line in (run_dir / "generations.jsonl").read_text().splitlines()]
    assert len(generations) == cfg.trainer.num_sample_prompts
    assert list((run_dir / "wandb").glob("offline-run-*/files/media/table/generations_*.table.json"))


def test_best_adapters_reload_and_give_the_same_validation_loss(finished_run):
    from harness.data import validation_batches

    _, run_dir, value = finished_run
    saved_cfg, model, tokenizer = build.load_trained(run_dir, "best")
    _, data = prepare_data(saved_cfg)
    validation = data.validation[: saved_cfg.trainer.max_eval_examples]
    loss, _ = evaluate(
        model,
        validation_batches(
            validation, saved_cfg.trainer.eval_batch_size, pad_id=tokenizer.pad_id,
            pad_to_multiple=saved_cfg.data.pad_to_multiple,
        ),
        make_eval_step(model),
    )
    assert loss == pytest.approx(value, rel=1e-5)


@pytest.mark.parametrize("train_step", ["standard", "layerwise"])
def test_interrupted_and_resumed_run_matches_an_uninterrupted_one(compose_train, tmp_path, train_step):
    # Dropout on: resuming must also restore the RNG, not just weights, optimizer and data position. The
    # layer-by-layer step keeps its adapters and AdamW's moments stacked (harness.step.stacked): its checkpoints
    # must still hold them per parameter, and a resumed run stack them again.
    common = [
        *FAST,
        "logger=none",
        "lora.dropout=0.1",
        "optim.lr=3e-3",
        "trainer.max_steps=7",
        "trainer.num_sample_prompts=0",
        f"trainer.train_step={train_step}",
    ]
    whole = tmp_path / "whole"
    train(compose_train(*common), run_dir=whole)
    parts = tmp_path / "parts"
    train(compose_train(*common, "trainer.stop_after_steps=4"), run_dir=parts)
    assert read_state(parts).step == 4 and not read_state(parts).finished
    # `resume=<run dir>` from a new Hydra job directory continues in the interrupted run's directory.
    train(compose_train(*common, f"resume={parts}"), run_dir=tmp_path / "new_job_dir")
    assert read_state(parts).finished
    a, b = adapters_of(whole), adapters_of(parts)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(np.array(a[key]), np.array(b[key]), rtol=1e-5, atol=1e-6)
    steps = [r["step"] for r in read_metrics(parts) if "val/loss" in r]
    assert steps == sorted(set(steps)), "records after the checkpoint must not be duplicated on resume"
    saved = mx.load(str(checkpoint_dir(parts, "latest") / OPTIMIZER_FILE))
    assert {key.rsplit(".", 1)[0] for key in saved if key not in ("step", "learning_rate")} == set(a), (
        "optimizer state is saved per adapter parameter")


def test_diverging_run_stops_early_returns_nan_and_keeps_its_state(compose_train, tmp_path):
    run_dir = tmp_path / "nan"
    value = train(compose_train(*FAST, "logger=none", "debug=diverge", "model=tiny", "trainer.max_steps=6"), run_dir=run_dir)
    assert math.isnan(value)
    state = read_state(run_dir)
    assert state.diverged and not state.finished and state.step < 6
    assert any(r.get("train/diverged") for r in read_metrics(run_dir))


def test_corrupt_checkpoint_fails_naming_the_file(compose_train, tmp_path):
    run_dir = tmp_path / "corrupt"
    cfg = compose_train(
        *FAST,
        "logger=none",
        "trainer.max_steps=3",
        "trainer.stop_after_steps=1",
        "trainer.num_sample_prompts=0",
    )
    train(cfg, run_dir=run_dir)
    optimizer_file = checkpoint_dir(run_dir, "latest") / "optimizer.safetensors"
    optimizer_file.write_bytes(optimizer_file.read_bytes()[:100])
    with pytest.raises(RunStateError, match="optimizer.safetensors"):
        train(compose_train(*FAST, "logger=none", "trainer.max_steps=3", "resume=true"), run_dir=run_dir)
    (run_dir / "state.json").write_text("{not json")
    with pytest.raises(RunStateError, match="state.json"):
        train(compose_train(*FAST, "logger=none", "trainer.max_steps=3", "resume=true"), run_dir=run_dir)


def test_epochs_set_the_number_of_steps_when_max_steps_is_null(compose_train):
    cfg = compose_train("trainer.max_steps=null", "trainer.epochs=2.5", "optim.grad_accum_steps=2")
    assert build.total_optimizer_steps(cfg.trainer, cfg.optim, batches_per_epoch=10) == 13
    cfg = compose_train("trainer.max_steps=7", "trainer.epochs=2.5")
    assert build.total_optimizer_steps(cfg.trainer, cfg.optim, batches_per_epoch=10) == 7


def test_training_from_a_local_hugging_face_checkpoint(compose_train, tmp_path, tiny_mistral_dir):
    """`model.path` = a local HF directory: loaded (quantized while loading), its own tokenizer, adapters reload."""
    run_dir = tmp_path / "hf"
    cfg = compose_train(
        "model=mistral-7b",
        f"model.path={tiny_mistral_dir}",
        *FAST,
        "logger=none",
        "trainer.max_steps=2",
        "trainer.eval_every=0",
        "trainer.num_sample_prompts=1",
    )
    value = train(cfg, run_dir=run_dir)
    assert math.isfinite(value)
    saved_cfg, model, tokenizer = build.load_trained(run_dir, "best")
    assert saved_cfg.model.path == str(tiny_mistral_dir)
    assert tokenizer.path == str(tiny_mistral_dir / "tokenizer.model")
    assert model.args.sliding_window == 16  # the checkpoint's config.json, not a preset
    adapter_config = json.loads((checkpoint_dir(run_dir, "best") / "adapter_config.json").read_text())
    assert adapter_config["base_model"] == str(tiny_mistral_dir)


def test_answers_before_and_after_training_are_kept_and_logged(finished_run):
    from harness.before_after import AFTER_FILE, BEFORE_FILE, AnswerSheet

    cfg, run_dir, _ = finished_run
    before, after = AnswerSheet.load(run_dir / BEFORE_FILE), AnswerSheet.load(run_dir / AFTER_FILE)
    assert len(before.shown) == len(after.shown) == cfg.trainer.num_sample_prompts
    assert [r["instruction"] for r in before.shown] == [r["instruction"] for r in after.shown]
    assert len(after.scored) == cfg.trainer.exact_match_examples
    assert after.accuracy["all"][1] == cfg.trainer.exact_match_examples
    final = [r for r in read_metrics(run_dir) if "eval/exact_match" in r]
    assert final and final[-1]["step"] == cfg.trainer.max_steps
    assert any("base/exact_match" in r and r["step"] == 0 for r in read_metrics(run_dir))
    rows = [json.loads(line) for line in (run_dir / "generations.jsonl").read_text().splitlines()]
    assert rows[0]["before"] == before.shown[0]["response"] and rows[0]["after"] == after.shown[0]["response"]
