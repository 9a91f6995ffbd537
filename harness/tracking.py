"""Experiment tracking: one W&B run per Hydra job (optional) and a `metrics.jsonl` in the run directory.

`metrics.jsonl` is the harness's own record (one JSON object per line, always written): `harness.compare` and
the tests read it back, since offline W&B runs are stored in an internal binary format.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from models.atomic_files import DiskWriteError, atomic_write_text

METRICS_FILE = "metrics.jsonl"


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them readable ("nan", "inf")
    return value


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """Records of `<run_dir>/metrics.jsonl` ("nan"/"inf" strings turned back into floats)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    records = []
    for n, raw in enumerate(path.read_bytes().splitlines(), 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except ValueError as err:  # JSON or UTF-8
            raise ValueError(f"{path}, line {n}: not a JSON line ({err})") from err
        records.append({k: float(v) if v in ("nan", "inf", "-inf") else v for k, v in record.items()})
    return records


class Tracker:
    """Logs metrics to `metrics.jsonl` and, when `wandb` settings are given, to a W&B run.

    `wandb` is a dict with `project`, `entity`, `mode`, `group`, `tags`; None turns W&B off.
    `resume_step` drops records logged after that step by an interrupted run (they are logged again).
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        wandb: dict[str, Any] | None,
        config: dict[str, Any],
        name: str | None = None,
        group: str | None = None,
        resume_step: int | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / METRICS_FILE
        if resume_step is not None and self.metrics_path.exists():
            kept = [r for r in read_metrics(self.run_dir) if r.get("step", 0) <= resume_step]
            atomic_write_text(
                self.metrics_path, "".join(json.dumps({k: _jsonable(v) for k, v in r.items()}) + "\n" for r in kept)
            )
        elif resume_step is None and self.metrics_path.exists():
            self.metrics_path.unlink()
        self._file = open(self.metrics_path, "a", encoding="utf-8")  # noqa: SIM115 - open for the whole run, closed in finish()
        self.wandb_run = None
        self.wandb_dir = None
        if wandb is not None and wandb.get("mode") != "disabled":
            self._start_wandb(wandb, config, name, group)

    def _start_wandb(
        self, settings: dict[str, Any], config: dict[str, Any], name: str | None, group: str | None
    ) -> None:
        # Thread start method: the documented fix for hangs under multiprocessing launchers (joblib/loky).
        os.environ.setdefault("WANDB_START_METHOD", "thread")
        import wandb

        self.wandb_run = wandb.init(
            project=settings.get("project"),
            entity=settings.get("entity"),
            mode=settings.get("mode", "offline"),
            group=settings.get("group") or group,
            tags=list(settings.get("tags") or []),
            name=name,
            config=config,
            dir=str(self.run_dir),
            job_type="train",
            reinit="finish_previous",  # one run per Hydra job, also in multirun
        )
        self.wandb_dir = Path(self.wandb_run.dir).parent
        self.wandb_run.define_metric("val/loss", summary="min")

    def log(self, metrics: dict[str, Any], *, step: int) -> None:
        """Record `metrics` at optimizer step `step`."""
        record = {"step": step, "time": round(time.time(), 3), **metrics}
        self._append(json.dumps({k: _jsonable(v) for k, v in record.items()}))
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        """Final values of the run (best val loss, ...), also appended to metrics.jsonl as `"summary": true`."""
        self._append(json.dumps({"summary": True, **{k: _jsonable(v) for k, v in values.items()}}))
        if self.wandb_run is not None:
            for key, value in values.items():
                self.wandb_run.summary[key] = value

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]], *, step: int) -> None:
        """A small table (e.g. generations for fixed prompts): W&B Table, and `<key>.jsonl` in the run dir."""
        path = self.run_dir / f"{key.replace('/', '_')}.jsonl"
        atomic_write_text(path, "".join(json.dumps(dict(zip(columns, row))) + "\n" for row in rows))
        if self.wandb_run is not None:
            import wandb

            self.wandb_run.log({key: wandb.Table(columns=columns, data=rows)}, step=step)

    def _append(self, line: str) -> None:
        """One line of metrics.jsonl, on disk now; a failed write (a full disk) names the file."""
        try:
            self._file.write(line + "\n")
            self._file.flush()
        except OSError as err:
            raise DiskWriteError.from_error(self.metrics_path, err) from err

    def finish(self, exit_code: int = 0) -> None:
        failed = None
        if not self._file.closed:
            try:
                self._file.close()
            except OSError as err:  # what a failed write left in the buffer: W&B is closed all the same
                failed = err
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=exit_code)
            self.wandb_run = None
        if failed is not None:
            raise DiskWriteError.from_error(self.metrics_path, failed) from failed
