"""Which run directory a training command writes, with which config, and a lock against a second writer.

A resumed run continues as it was configured: its saved `run_config.yaml` is the truth. Values given on the
command line with `resume=` are applied only where changing them mid-run is safe (`SAFE_ON_RESUME`, e.g.
`trainer.max_steps` to extend a run); any other value that differs from the saved one is refused, naming the key.
Defaults that changed in the code since the run started do not leak in: the saved values win; repeating the
run's own command line (its `.hydra/overrides.yaml`) with `resume=` changes nothing.
Everything here only reads: the run directory is not written until the resume has checked what it will load.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from harness.config_checks import ConfigError, check_train_config
from harness.run_state import (
    ADAPTERS_FILE,
    CHECKPOINTS_DIR,
    OPTIMIZER_FILE,
    RUN_CONFIG_FILE,
    STATE_FILE,
    RunStateError,
    load_saved_config,
    read_state,
)

LOCK_FILE = ".lock"
# What any run directory holds once its Hydra job started (`.hydra/`), or once training started (the others).
RUN_DIR_MARKERS = (RUN_CONFIG_FILE, STATE_FILE, CHECKPOINTS_DIR, ".hydra")
# Keys (or whole sections) a resumed run may change: how long it runs, how it logs, where caches live, how
# the work is spread over this machine. Nothing that changes the model, the data or the optimizer's path.
SAFE_ON_RESUME = (
    "trainer.max_steps",
    "trainer.stop_after_steps",
    "trainer.log_every",
    "trainer.save_every",
    "trainer.progress",
    "trainer.cpu_streams",
    "trainer.memory_limit_gb",
    "trainer.num_sample_prompts",
    "trainer.sample_max_new_tokens",
    "data.cache_dir",
    "data.tokenize_threads",
    "logger",
    "paths",
    "experiment_name",
    "distributed",
)
# Settings of one process, not of the run: always this command's value (a run stopped with stop_after_steps
# resumes without stopping again unless asked).
PER_PROCESS = ("trainer.stop_after_steps", "trainer.progress")
# Config groups that write keys all over the config (`# @package _global_`).
GLOBAL_GROUPS = ("experiment", "debug", "hparams_search")


class ResumeError(ValueError):
    """A run directory that cannot be continued (or must not be overwritten); the message says why."""


class RunDirInUse(ResumeError):
    """Another process holds the run directory's lock."""


@dataclass
class RunPlan:
    cfg: DictConfig  # the config to train with (the saved one, plus safe overrides, when continuing)
    run_dir: Path
    continuing: bool  # resume was asked for
    notes: list[str] = field(default_factory=list)  # lines for the user (what was kept, what was changed)


def resume_target(value: Any, run_dir: Path) -> Path | None:
    """The run directory to continue, from `resume` (false | true | a path); None: a new run."""
    if value in (False, None, "false", "False", ""):
        return None
    if value in (True, "true", "True"):
        return Path(run_dir)
    path = Path(str(value)).expanduser()
    if not path.is_dir():
        raise ResumeError(f"resume={value}: no such run directory")
    if not any((path / name).exists() for name in RUN_DIR_MARKERS):
        raise ResumeError(
            f"resume={value}: not a training run directory (it holds none of {', '.join(RUN_DIR_MARKERS)}); "
            "nothing to resume"
        )
    return path


def checkpoint_folders(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (Path(run_dir) / CHECKPOINTS_DIR).glob("step-*") if p.is_dir())


def flat_leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    """`{"trainer.max_steps": 40, ...}`: the leaves of a config (lists are leaves)."""
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    if not isinstance(node, dict):
        return {prefix: node}
    leaves = {}
    for key, value in node.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            leaves.update(flat_leaves(value, name))
        else:
            leaves[name] = value
    return leaves


def requested_keys(overrides: list[str] | None) -> tuple[set[str], bool]:
    """Keys the command line set, and whether it chose a group that may set any key (`debug=`, ...).

    `overrides` None (a call without Hydra): every difference from the saved config counts as requested."""
    if overrides is None:
        return set(), True
    keys, everything = set(), False
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key == "resume" or key.split(".")[0] == "hydra" or key.startswith("hydra/"):
            continue
        everything = everything or key in GLOBAL_GROUPS
        keys.add(key)
    return keys, everything


def _covered(key: str, by: set[str]) -> bool:
    return any(key == k or key.startswith(k + ".") for k in by)


def check_run_dir(run_dir: Path) -> None:
    """Raise `ResumeError` / `RunStateError` naming the file when `run_dir` cannot be continued as it is."""
    state = read_state(run_dir)  # damaged state.json: RunStateError naming it
    folders = checkpoint_folders(run_dir)
    if state is None and folders:
        raise ResumeError(
            f"{Path(run_dir) / STATE_FILE}: missing, but {CHECKPOINTS_DIR}/ holds {', '.join(folders)}; without it "
            "the data position and the optimizer's step are unknown, so resume stops here and changes nothing. "
            "Restore state.json, or start a new run"
        )
    if state is not None and not (Path(run_dir) / RUN_CONFIG_FILE).is_file():
        raise ResumeError(
            f"{Path(run_dir) / RUN_CONFIG_FILE}: missing, but {STATE_FILE} says the run is at step {state.step}; "
            "without its config the run cannot continue as it was configured, so resume stops here and changes "
            "nothing. Restore run_config.yaml, or start a new run"
        )
    if state is not None and state.diverged:
        raise ResumeError(
            f"{run_dir}: the run diverged at step {state.step} (loss nan/inf; see {Path(run_dir) / 'metrics.jsonl'}); "
            "its latest checkpoint holds what the diverged step left and would diverge again. Start a new run "
            "(e.g. with a lower optim.lr)"
        )
    if state is not None and state.latest is not None:
        ckpt = Path(run_dir) / state.latest
        for name in (ADAPTERS_FILE, "adapter_config.json", OPTIMIZER_FILE):
            if not (ckpt / name).is_file():
                raise RunStateError(f"{ckpt / name}: missing; {STATE_FILE} points at a checkpoint that is not there")


def refuse_existing_run(run_dir: Path) -> None:
    """A new run must not write over a run directory that already holds one."""
    if (Path(run_dir) / STATE_FILE).exists() or checkpoint_folders(run_dir):
        raise ResumeError(
            f"{run_dir} already holds a training run ({STATE_FILE}, {CHECKPOINTS_DIR}/); continue it with "
            f"resume={run_dir}, or choose another directory"
        )


def plan_run(cfg: DictConfig, run_dir: Path, overrides: list[str] | None) -> RunPlan:
    """Decide the config of the run in `run_dir` (see module docstring); reads only.

    `overrides`: the command line's overrides (Hydra's task overrides), or None without Hydra."""
    run_dir = Path(run_dir)
    continuing = resume_target(cfg.resume, run_dir) is not None
    if not continuing:
        refuse_existing_run(run_dir)
        return RunPlan(cfg, run_dir, continuing=False)
    check_run_dir(run_dir)
    saved = load_saved_config(run_dir)
    if saved is None:  # the run never got as far as saving its config: nothing to keep
        return RunPlan(cfg, run_dir, continuing=True)
    if overrides is not None:  # the run's own command line repeated asks for no change
        started_with = original_overrides(run_dir)
        overrides = [o for o in overrides if o not in started_with]
    return merge_for_resume(cfg, saved, run_dir, overrides)


def original_overrides(run_dir: Path) -> list[str]:
    """The overrides the run was started with (Hydra's `.hydra/overrides.yaml`; [] when absent or unreadable)."""
    try:
        listed = OmegaConf.load(Path(run_dir) / ".hydra" / "overrides.yaml")
    except Exception:  # absent (a run started without Hydra) or damaged: then every override counts
        return []
    return [str(o) for o in listed] if OmegaConf.is_list(listed) else []


def merge_for_resume(cfg: DictConfig, saved: DictConfig, run_dir: Path, overrides: list[str] | None) -> RunPlan:
    """The saved config, plus the requested changes that are safe; `ResumeError` for the others."""
    import harness.schema as schema

    path = run_dir / RUN_CONFIG_FILE
    try:  # typed like a composed config (missing new keys get their defaults; wrong types fail here)
        merged = OmegaConf.merge(OmegaConf.structured(schema.TrainRoot), saved)
    except Exception as err:
        key = getattr(err, "full_key", None)
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]  # OmegaConf appends the key's context
        raise ResumeError(
            f"{path}: does not fit today's config schema ({f'{key}: ' if key else ''}{reason})"
        ) from err
    try:  # values the run's own file holds are checked like the command line's, naming the file
        check_train_config(merged)
    except ConfigError as err:
        raise ConfigError("\n".join(f"{path}: {line}" for line in str(err).splitlines())) from None
    new, old = flat_leaves(cfg), flat_leaves(merged)
    requested, everything = requested_keys(overrides)
    changed, kept, refused = [], [], []
    for key, value in new.items():
        if key == "resume" or key not in old or old[key] == value:
            continue
        if key in PER_PROCESS:
            OmegaConf.update(merged, key, value, merge=False)
            continue
        asked = everything or _covered(key, requested)
        if asked and _covered(key, set(SAFE_ON_RESUME)):
            OmegaConf.update(merged, key, value, merge=False)
            changed.append(f"{key}={value}")
        elif asked:
            refused.append(f"{key}={value} (the run has {old[key]})")
        else:
            kept.append(key)
    if refused:
        raise ResumeError(
            f"resume keeps the run's config ({path}); refused: {'; '.join(refused)}. Only these may change on "
            f"resume: {', '.join(SAFE_ON_RESUME)}. To train with other values, start a new run"
        )
    merged.resume = cfg.resume
    state = read_state(run_dir)
    max_steps = merged.trainer.max_steps
    if state is not None and max_steps is not None and max_steps < state.step:
        raise ResumeError(
            f"trainer.max_steps={max_steps}: the run in {run_dir} is already at step {state.step}; "
            "give at least that many steps"
        )
    notes = []
    if changed:
        notes.append(f"resume: changed {', '.join(changed)}")
    if kept:
        notes.append(
            f"resume: kept the run's own values of {len(kept)} key(s) whose defaults differ today "
            f"(e.g. {', '.join(kept[:3])})"
        )
    return RunPlan(merged, run_dir, continuing=True, notes=notes)


class RunDirLock:
    """An exclusive lock on a run directory (`<run_dir>/.lock`, holding the writer's pid) for one process.

    An OS lock (`flock`): the kernel drops it when the process ends, however it ends, so a lock file left
    behind by a killed run never blocks the next one. Where `fcntl` does not exist, no lock is taken."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def __enter__(self) -> RunDirLock:
        try:
            import fcntl
        except ImportError:  # not POSIX
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 64).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise RunDirInUse(
                f"{self.path.parent}: another process (pid {holder}) is training in this run directory "
                f"({self.path} is locked); wait for it to end, or stop it first"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the lock
            self._fd = None
