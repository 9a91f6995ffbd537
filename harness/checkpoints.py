"""Run-directory state: adapters (latest and best), optimizer state and `state.json`, written atomically.

Layout of a run directory (everything an interrupted run needs to continue):

    state.json                      step, epoch, data position, RNG, best val loss, and which checkpoints are current
    checkpoints/step-000050/        adapters.safetensors + adapter_config.json + optimizer.safetensors
    checkpoints/step-000025/        the best checkpoint by validation loss, when it is not the latest

A checkpoint is written into a temporary folder renamed into place, then `state.json` is replaced atomically to
point at it; a crash at any moment leaves the previous state.json and the checkpoints it names intact.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx import nn
from mlx.utils import tree_flatten, tree_unflatten

STATE_FILE = "state.json"
CHECKPOINTS_DIR = "checkpoints"
OPTIMIZER_FILE = "optimizer.safetensors"
ADAPTERS_FILE = "adapters.safetensors"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read; the message names the file."""


@dataclass
class TrainState:
    """Progress of a run, saved as `state.json`."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch (0-based)
    batch_in_epoch: int = 0  # micro-batches of `epoch` already consumed
    tokens_seen: int = 0  # loss tokens trained on
    best_val_loss: float | None = None
    best_step: int | None = None
    latest: str | None = None  # checkpoint folder, relative to the run dir
    best: str | None = None
    finished: bool = False
    diverged: bool = False
    numpy_rng: dict[str, Any] = field(default_factory=dict)


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file renamed into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def capture_rng(state: TrainState) -> None:
    """Record numpy's global RNG. MLX's key cannot be set back, so the loop reseeds it from (seed, step)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state.numpy_rng = {
        "name": name,
        "keys": keys.tolist(),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached": float(cached),
    }


def restore_rng(state: TrainState) -> None:
    if state.numpy_rng:
        r = state.numpy_rng
        np.random.set_state(
            (r["name"], np.array(r["keys"], dtype=np.uint32), r["pos"], r["has_gauss"], r["cached"])
        )


def save_optimizer(optimizer: optim.Optimizer, path: Path) -> None:
    """Optimizer state (step, learning rate, AdamW moments) as safetensors, keyed by parameter path."""
    mx.save_safetensors(str(path), dict(tree_flatten(optimizer.state)))


def load_optimizer(optimizer: optim.Optimizer, path: Path, model: nn.Module) -> None:
    """Restore `optimizer.state` saved by `save_optimizer`; the tree must match the model's trainable parameters."""
    try:
        flat = mx.load(str(path))
    except Exception as err:
        raise CheckpointError(
            f"{path}: cannot read optimizer state ({err}); the checkpoint is corrupt"
        ) from err
    expected = {k for k, _ in tree_flatten(model.trainable_parameters())}
    found = {k.rsplit(".", 1)[0] for k in flat if k not in ("step", "learning_rate")}
    if found != expected:
        missing = sorted(expected - found)[:3]
        raise CheckpointError(
            f"{path}: optimizer state does not match the model's LoRA parameters "
            f"(e.g. missing {missing}); was it written with another lora config?"
        )
    optimizer.state = tree_unflatten(list(flat.items()))
    optimizer.init(model.trainable_parameters())


def read_state(run_dir: Path) -> TrainState | None:
    """The run's `state.json`, or None when the run has never checkpointed."""
    path = Path(run_dir) / STATE_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        return TrainState(**data)
    except (json.JSONDecodeError, TypeError) as err:
        raise CheckpointError(f"{path}: not a valid training state ({err})") from err


def checkpoint_dir(run_dir: Path, which: str = "best") -> Path:
    """Folder with `adapters.safetensors` + `adapter_config.json` of the run's `best` or `latest` checkpoint."""
    state = read_state(Path(run_dir))
    if state is None or getattr(state, which) is None:
        raise CheckpointError(f"{Path(run_dir) / STATE_FILE}: no {which!r} checkpoint in this run directory")
    path = Path(run_dir) / getattr(state, which)
    if not (path / ADAPTERS_FILE).exists():
        raise CheckpointError(f"{path / ADAPTERS_FILE}: missing (the run directory is incomplete)")
    return path


def save_checkpoint(
    run_dir: Path,
    model: nn.Module,
    optimizer: optim.Optimizer,
    state: TrainState,
    save_adapters_fn,
    *,
    is_best: bool,
) -> None:
    """Write adapters + optimizer for `state.step`, then point `state.json` at them (atomically).

    `save_adapters_fn(model, out_dir)` writes the adapter files. Checkpoints neither latest nor best are deleted.
    """
    run_dir = Path(run_dir)
    root = run_dir / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{state.step:06d}"
    final = root / name
    if not final.exists():
        tmp = root / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_adapters_fn(model, tmp)
        save_optimizer(optimizer, tmp / OPTIMIZER_FILE)
        os.replace(tmp, final)
    state.latest = f"{CHECKPOINTS_DIR}/{name}"
    if is_best:
        state.best = state.latest
    capture_rng(state)
    atomic_write_text(run_dir / STATE_FILE, json.dumps(asdict(state), indent=2))
    keep = {state.latest, state.best}
    for old in root.glob("step-*"):
        if f"{CHECKPOINTS_DIR}/{old.name}" not in keep:
            shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(
    run_dir: Path, model: nn.Module, optimizer: optim.Optimizer, load_weights_fn
) -> TrainState:
    """Restore the latest checkpoint of `run_dir` into `model` (adapter weights) and `optimizer`; RNGs too.

    `load_weights_fn(model, adapters_file)` loads LoRA weights into a model that already has LoRA applied.
    """
    run_dir = Path(run_dir)
    state = read_state(run_dir)
    if state is None or state.latest is None:
        raise CheckpointError(f"{run_dir / STATE_FILE}: nothing to resume (no checkpoint was written)")
    ckpt = run_dir / state.latest
    adapters = ckpt / ADAPTERS_FILE
    if not adapters.exists():
        raise CheckpointError(f"{adapters}: missing; state.json points at a checkpoint that is not there")
    try:
        load_weights_fn(model, adapters)
    except CheckpointError:
        raise
    except Exception as err:
        raise CheckpointError(f"{adapters}: cannot load adapters ({err}); the checkpoint is corrupt") from err
    load_optimizer(optimizer, ckpt / OPTIMIZER_FILE, model)
    restore_rng(state)
    return state
