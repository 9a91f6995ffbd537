"""Which training step each shipped experiment gets: the checkpointed ones must take the memory-bounded step."""

from pathlib import Path

import mlx.optimizers as optim
import pytest

from harness.build import build_model
from harness.step.layerwise import LayerwiseTrainStep
from harness.cli import CONFIG_DIR
from harness.step import factory
from harness.step.factory import configured_train_step
from harness.step.standard import TrainStep

EXPERIMENTS = sorted(path.stem for path in (Path(CONFIG_DIR) / "experiment").glob("*.yaml"))
# On the CPU (and Metal) only checkpointing picks the layer-by-layer step; on CUDA "auto" also picks it for
# micro-batches of up to 2,048 tokens (`harness.step.factory.LAYERWISE_MAX_TOKENS`), as both sample experiments' are.
EXPECTED_STEP = {
    "cpu": {
        "mistral7b_dolly_qlora": LayerwiseTrainStep,
        "smollm2_dolly_sample": TrainStep,
        "tiny_dolly_sample": TrainStep,
    },
    "cuda": {
        "mistral7b_dolly_qlora": LayerwiseTrainStep,
        "smollm2_dolly_sample": LayerwiseTrainStep,  # 4 x 256 tokens
        "tiny_dolly_sample": LayerwiseTrainStep,  # 8 x 256 tokens
    },
}


def test_every_shipped_experiment_is_listed():
    for backend, steps in EXPECTED_STEP.items():
        assert set(EXPERIMENTS) == set(steps), f"add the new experiment to EXPECTED_STEP[{backend!r}]"


@pytest.mark.parametrize("backend", EXPECTED_STEP)
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_shipped_experiment_gets_the_expected_step(experiment, backend, compose_train, monkeypatch):
    # The experiment's own LoRA (rank, dropout), trainer, data and optimizer settings, on the tiny model's shape,
    # the step built as harness.train builds it.
    monkeypatch.setattr(factory, "backend_name", lambda: backend)
    cfg = compose_train(f"experiment={experiment}", "model=tiny", "model.arch.num_hidden_layers=2")
    model = build_model(cfg, progress=False)
    step = configured_train_step(model, optimizer=optim.AdamW(learning_rate=1e-3), cfg=cfg)
    assert type(step) is EXPECTED_STEP[backend][experiment]
    if cfg.trainer.gradient_checkpointing:
        assert type(step) is LayerwiseTrainStep


def test_the_flagship_experiment_uses_the_options_the_bounded_step_must_serve(compose_train):
    cfg = compose_train("experiment=mistral7b_dolly_qlora")
    assert cfg.lora.dropout > 0 and cfg.optim.grad_accum_steps > 1 and cfg.trainer.gradient_checkpointing
