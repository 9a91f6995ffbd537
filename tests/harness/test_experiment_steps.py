"""Which training step each shipped experiment gets: the checkpointed ones must take the memory-bounded step."""

from pathlib import Path

import mlx.optimizers as optim
import pytest

from harness.build import build_model
from harness.step.layerwise import LayerwiseTrainStep
from harness.cli import CONFIG_DIR
from harness.step.factory import make_train_step
from harness.step.standard import TrainStep

EXPERIMENTS = sorted(path.stem for path in (Path(CONFIG_DIR) / "experiment").glob("*.yaml"))
EXPECTED_STEP = {
    "mistral7b_dolly_qlora": LayerwiseTrainStep,
    "smollm2_dolly_sample": TrainStep,
    "tiny_dolly_sample": TrainStep,
}


def test_every_shipped_experiment_is_listed():
    assert set(EXPERIMENTS) == set(EXPECTED_STEP), "add the new experiment to EXPECTED_STEP"


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_shipped_experiment_gets_the_expected_step(experiment, compose_train):
    # The experiment's own LoRA (rank, dropout), trainer and optimizer settings, on the tiny model's shape.
    cfg = compose_train(f"experiment={experiment}", "model=tiny", "model.arch.num_hidden_layers=2")
    model = build_model(cfg, progress=False)
    step = make_train_step(model, optim.AdamW(learning_rate=1e-3), grad_clip=cfg.optim.grad_clip)
    assert type(step) is EXPECTED_STEP[experiment]
    assert (type(step) is LayerwiseTrainStep) == cfg.trainer.gradient_checkpointing


def test_the_flagship_experiment_uses_the_options_the_bounded_step_must_serve(compose_train):
    cfg = compose_train("experiment=mistral7b_dolly_qlora")
    assert cfg.lora.dropout > 0 and cfg.optim.grad_accum_steps > 1 and cfg.trainer.gradient_checkpointing
