"""OmegaConf resolvers the configs use, registered when `harness.schema` is imported (before Hydra composes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import OmegaConf


def resuming_a_path(resume: Any) -> bool:
    """Whether `resume` names a run directory (not false/true)."""
    return resume not in (False, True, None, "", "false", "False", "true", "True")


def _run_dir_for_resume(resume: Any, new_dir: str) -> str:
    return str(resume) if resuming_a_path(resume) else new_dir


def _hydra_subdir_for_resume(resume: Any, run_dir: str) -> str | None:
    # Also when the directory already holds a run (`resume=true`, or a new run refused by harness.resume):
    # Hydra writes its `.hydra/` before the task starts, and would overwrite that run's.
    return None if resuming_a_path(resume) or (Path(run_dir) / "state.json").exists() else ".hydra"


def register_resolvers() -> None:
    """`${run_dir_for_resume:${resume},<new dir>}` and `${hydra_subdir_for_resume:${resume},${hydra.run.dir}}` for
    `conf/hydra/default.yaml`: a job that resumes a run directory runs in it (its train.log continues) and
    writes no new `.hydra/` there, so the run's own stays as it was. Idempotent."""
    if not OmegaConf.has_resolver("run_dir_for_resume"):
        OmegaConf.register_resolver(
            "run_dir_for_resume", _run_dir_for_resume, annotation_validation="off"
        )
    if not OmegaConf.has_resolver("hydra_subdir_for_resume"):
        OmegaConf.register_resolver(
            "hydra_subdir_for_resume", _hydra_subdir_for_resume, annotation_validation="off"
        )
