"""Fixtures for the harness tests: hermetic environment, composing configs, a finished tiny training run."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

import harness.schema  # noqa: F401  (registers the structured configs)
import models  # noqa: F401  (first: fast BLAS before mlx)
from harness.cli import CONFIG_DIR

REPO = Path(__file__).resolve().parents[2]
# A few seconds per run: 2-layer hidden-64 model, 6 steps, 8 validation examples, no W&B unless asked.
FAST = ["debug=fast", "quant=rowwise4", "data.max_records=600"]


@pytest.fixture(scope="session")
def hermetic_env(tmp_path_factory):
    """Environment for every harness test and subprocess: offline Hub and W&B, caches under a temp dir."""
    root = tmp_path_factory.mktemp("env")
    env = {
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(root / "wandb"),
        "WANDB_CACHE_DIR": str(root / "wandb-cache"),
        "WANDB_CONFIG_DIR": str(root / "wandb-config"),
        "WANDB_DATA_DIR": str(root / "wandb-data"),
        "QLORA_CACHE_DIR": str(root / "cache"),
        "HYDRA_FULL_ERROR": "1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def compose_train(hermetic_env, tmp_path):
    """`compose_train(*overrides, config_name="train")` -> the composed config, outputs under tmp_path."""

    def _compose(*overrides: str, config_name: str = "train", hydra_config: bool = False):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=CONFIG_DIR):
            extra = [f"paths.outputs={tmp_path}/outputs", f"paths.multirun={tmp_path}/multirun"]
            if config_name != "train":
                extra = []
            return compose(config_name, overrides=[*extra, *overrides], return_hydra_config=hydra_config)

    yield _compose
    GlobalHydra.instance().clear()


def run_cli(
    module: str,
    *args: str,
    env: dict,
    cwd: Path,
    check: bool = True,
    timeout: int = 300,
    stdin: str | None = None,
) -> subprocess.CompletedProcess:
    """Run `python -m <module> <args>` in `cwd` with the hermetic environment; fail with its output."""
    full_env = {**os.environ, **env, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        check=False,
        text=True,
        timeout=timeout,
        input=stdin,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{module} {' '.join(args)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n"
            f"{proc.stderr[-6000:]}"
        )
    return proc
