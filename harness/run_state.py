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
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx import nn
from mlx.utils import tree_flatten, tree_unflatten
from omegaconf import DictConfig, OmegaConf

from harness.step.stacked import per_parameter_state
from models.adapters import AdapterError, load_adapters
from models.atomic_files import atomic_save_safetensors, atomic_write_text
from models.json_files import read_json_object, read_utf8_text

STATE_FILE = "state.json"
RUN_CONFIG_FILE = "run_config.yaml"  # the run's resolved config, written before training starts
JOB_FILE = "job.json"  # the Hydra job: overrides, sweep study and storage (read by harness.compare)
CHECKPOINTS_DIR = "checkpoints"
OPTIMIZER_FILE = "optimizer.safetensors"
ADAPTERS_FILE = "adapters.safetensors"


class RunStateError(RuntimeError):
    """Run state (state.json, a checkpoint) that cannot be read or used; the message names the file.

    Not `models.loading.CheckpointError`, which is about pretrained weights."""




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
    # What the run trains on (`file:<sha256>` of a local or embedded file, `hub:...`): `batch_in_epoch` counts
    # batches of this data, so a resume on other data would continue from a position that means nothing.
    data_source: str | None = None


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


def save_optimizer(optimizer: optim.Optimizer, path: Path, model: nn.Module) -> None:
    """Optimizer state (step, learning rate, AdamW moments) as safetensors, keyed by parameter path (state the
    training step keeps stacked by shape is cut back into its parameters: `harness.step.stacked`)."""
    atomic_save_safetensors(path, per_parameter_state(optimizer.state, model))


def load_optimizer(optimizer: optim.Optimizer, path: Path, model: nn.Module) -> None:
    """Restore `optimizer.state` saved by `save_optimizer`; the tree must match the model's trainable parameters."""
    try:
        flat = mx.load(str(path))
    except Exception as err:
        raise RunStateError(
            f"{path}: cannot read optimizer state ({err}); the checkpoint is corrupt"
        ) from err
    expected = {k for k, _ in tree_flatten(model.trainable_parameters())}
    found = {k.rsplit(".", 1)[0] for k in flat if k not in ("step", "learning_rate")}
    if found != expected:
        missing = sorted(expected - found)[:3]
        raise RunStateError(
            f"{path}: optimizer state does not match the model's LoRA parameters "
            f"(e.g. missing {missing}); was it written with another lora config?"
        )
    parameters = dict(tree_flatten(model.trainable_parameters()))
    for key, value in flat.items():
        owner = key.rsplit(".", 1)[0]
        if owner in parameters and value.shape != parameters[owner].shape:
            raise RunStateError(
                f"{path}: {key} has shape {tuple(value.shape)}, but the model's {owner} is "
                f"{tuple(parameters[owner].shape)}"
            )
        if mx.issubdtype(value.dtype, mx.inexact) and not mx.all(mx.isfinite(value)).item():
            raise RunStateError(f"{path}: {key} holds NaN or inf values; the checkpoint is damaged")
    # in place: a training step built already holds this dict (and stacks it again: `harness.step.stacked`)
    optimizer.state.clear()
    optimizer.state.update(tree_unflatten(list(flat.items())))
    optimizer.init(model.trainable_parameters())


def read_state(run_dir: Path) -> TrainState | None:
    """The run's `state.json`, checked (JSON object, known fields, their types), or None when it does not exist."""
    path = Path(run_dir) / STATE_FILE
    if not path.exists():
        return None
    data = read_json_object(path, RunStateError, "a valid training state")
    known = {f.name for f in fields(TrainState)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise RunStateError(f"{path}: not a valid training state (unknown field {unknown[0]!r})")
    for name, kinds in _STATE_TYPES.items():
        value = data.get(name)
        if name in data and (not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds)):
            raise RunStateError(f"{path}: field {name!r} has the wrong type ({data[name]!r:.40})")
    for name in ("step", "epoch", "batch_in_epoch", "tokens_seen"):
        if data.get(name, 0) < 0:
            raise RunStateError(f"{path}: field {name!r} is negative ({data[name]})")
    return TrainState(**data)


_STATE_TYPES: dict[str, tuple[type, ...]] = {
    "step": (int,),
    "epoch": (int,),
    "batch_in_epoch": (int,),
    "tokens_seen": (int,),
    "best_val_loss": (int, float, type(None)),
    "best_step": (int, type(None)),
    "latest": (str, type(None)),
    "best": (str, type(None)),
    "finished": (bool,),
    "diverged": (bool,),
    "numpy_rng": (dict,),
    "data_source": (str, type(None)),
}


def checkpoint_dir(run_dir: Path, which: str = "best") -> Path:
    """Folder with `adapters.safetensors` + `adapter_config.json` of the run's `best` or `latest` checkpoint."""
    state = read_state(Path(run_dir))
    if state is None:
        raise RunStateError(
            f"{Path(run_dir) / STATE_FILE}: missing; is {run_dir} a training run directory (one that reached its "
            "first checkpoint)?"
        )
    if getattr(state, which) is None:
        hint = "; no validation ran (empty validation split?): use adapters=latest" if state.latest else ""
        raise RunStateError(f"{Path(run_dir) / STATE_FILE}: no {which!r} checkpoint in this run directory{hint}")
    path = Path(run_dir) / getattr(state, which)
    if not (path / ADAPTERS_FILE).exists():
        raise RunStateError(f"{path / ADAPTERS_FILE}: missing (the run directory is incomplete)")
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
        try:
            save_adapters_fn(model, tmp)
            save_optimizer(optimizer, tmp / OPTIMIZER_FILE, model)
            os.replace(tmp, final)
        except BaseException:  # a full disk, a second Ctrl-C: give the space back; state.json is unchanged
            shutil.rmtree(tmp, ignore_errors=True)
            raise
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
    run_dir: Path, model: nn.Module, optimizer: optim.Optimizer, state: TrainState | None = None
) -> TrainState:
    """Restore the latest checkpoint of `run_dir` into `model` (which carries its LoRA adapters already) and
    `optimizer`; RNGs too. `state`: the run's `read_state`, when the caller has read it already. Everything is
    checked on the way (keys, shapes, adapter config, finite values) and a failure is a `RunStateError` naming the
    file; nothing in the run directory is written."""
    run_dir = Path(run_dir)
    state = read_state(run_dir) if state is None else state
    if state is None or state.latest is None:
        raise RunStateError(f"{run_dir / STATE_FILE}: nothing to resume (no checkpoint was written)")
    ckpt = run_dir / state.latest
    adapters = ckpt / ADAPTERS_FILE
    if not adapters.exists():
        raise RunStateError(f"{adapters}: missing; state.json points at a checkpoint that is not there")
    try:
        load_adapters(model, ckpt)
    except AdapterError as err:
        raise RunStateError(str(err)) from err
    load_optimizer(optimizer, ckpt / OPTIMIZER_FILE, model)
    restore_rng(state)
    return state


def load_saved_config(run_dir: Path) -> DictConfig | None:
    """`run_config.yaml` of a run, checked (UTF-8, a YAML mapping); None when the run has none."""
    path = Path(run_dir) / RUN_CONFIG_FILE
    if not path.is_file():
        return None
    text = read_utf8_text(path, RunStateError)
    try:
        saved = OmegaConf.create(text)
    except Exception as err:  # OmegaConf/YAML parse errors come in several types (and span several lines)
        reason = " ".join(str(err).split())
        raise RunStateError(f"{path}: not a readable config ({type(err).__name__}: {reason})") from err
    if not isinstance(saved, DictConfig):
        raise RunStateError(f"{path}: not a readable config (expected a mapping)")
    return saved


def restore_run_state(
    run_dir: Path, model: nn.Module, optimizer: optim.Optimizer, *, continuing: bool, total_steps: int,
    data_source: str | None = None, data_description: str = "the data",
) -> TrainState | None:
    """The state a continued run resumes from, with its adapters and optimizer loaded into `model` and
    `optimizer` (everything checked, nothing written); None for a run that starts at step 0.

    `data_source`: the fingerprint of the data this process prepared; a run that trained on a local file whose
    content has changed since is refused (`RunStateError`)."""
    from harness.console import note

    run_dir = Path(run_dir)
    if continuing and (run_dir / STATE_FILE).exists():
        state = read_state(run_dir)
        saved = state.data_source if state is not None else None
        # Only files: a Hub dataset's fingerprint also follows the `datasets` library's version.
        files = saved and data_source and saved.startswith("file:") and data_source.startswith("file:")
        if files and saved != data_source:
            raise RunStateError(
                f"{data_description}: the data changed since the run started ({saved[5:17]}... then, "
                f"{data_source[5:17]}... now); the run's data position would point into other records. Restore "
                f"the file, or start a new run ({run_dir / STATE_FILE} keeps the run's fingerprint)"
            )
        state = load_checkpoint(run_dir, model, optimizer, state)
        state.data_source = state.data_source or data_source
        state.finished = state.finished and state.step >= total_steps  # a run extended with trainer.max_steps
        note(f"resuming {run_dir} at step {state.step} (epoch {state.epoch}, batch {state.batch_in_epoch})")
        return state
    if continuing:
        note(f"resume: {run_dir} has no checkpoint yet; starting from step 0")
    return None


def write_run_record(run_dir: Path, cfg: DictConfig, job: dict, *, continuing: bool) -> None:
    """Create `run_dir` with the run's resolved config and (unless a resumed run already has one) its job."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / RUN_CONFIG_FILE, OmegaConf.to_yaml(cfg, resolve=True))
    if not continuing or not (run_dir / JOB_FILE).exists():  # a resume keeps its job
        atomic_write_text(run_dir / JOB_FILE, json.dumps(job, indent=2))
