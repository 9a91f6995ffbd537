"""Compare the trials of a sweep: `python -m harness.compare <multirun dir | study name> [--out fig.png]`.

Prints a table of trials sorted by best validation loss (swept parameters, best val loss, tokens/s, peak memory,
status), the best configuration as a ready-to-paste override line, and writes a PNG with the validation-loss
curve of every trial and Optuna's parameter importances. Reads each job's `job.json` and `metrics.jsonl`, and
the Optuna study from the storage the sweep used.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.tracking import read_metrics

JOB_FILE = "job.json"
# Overrides that say where things go, not what is trained: left out of the "ready to paste" line.
LOCATION_PREFIXES = ("hydra.", "paths.", "hparams_search", "resume")


@dataclass
class Trial:
    run_dir: Path
    overrides: list[str]
    study: str | None
    storage: str | None
    best_val_loss: float = math.nan
    tokens_per_second: float = math.nan
    peak_memory_gb: float = math.nan
    status: str = "incomplete"
    val_curve: list[tuple[int, float]] = field(default_factory=list)


def load_trial(run_dir: Path) -> Trial:
    job = json.loads((run_dir / JOB_FILE).read_text())
    trial = Trial(run_dir, list(job.get("overrides") or []), job.get("study"), job.get("storage"))
    for record in read_metrics(run_dir):
        if record.get("summary"):
            trial.best_val_loss = float(record.get("best_val_loss", math.nan))
            trial.tokens_per_second = float(record.get("tokens_per_second", math.nan))
            trial.peak_memory_gb = float(record.get("peak_memory_gb", math.nan))
            trial.status = "diverged" if record.get("diverged") else "complete"
        elif "val/loss" in record:
            trial.val_curve.append((int(record["step"]), float(record["val/loss"])))
        elif record.get("train/diverged"):
            trial.status = "diverged"
    return trial


def find_trials(target: str, root: Path) -> list[Trial]:
    """Jobs of a multirun directory, or of every sweep under `root` that ran study `target`."""
    path = Path(target)
    if path.is_dir():
        return sorted((load_trial(p.parent) for p in path.rglob(JOB_FILE)), key=lambda t: str(t.run_dir))
    trials = [load_trial(p.parent) for p in root.rglob(JOB_FILE)] if root.is_dir() else []
    return sorted((t for t in trials if t.study == target), key=lambda t: str(t.run_dir))


def swept_overrides(trials: list[Trial]) -> list[str]:
    """Keys whose override values differ between trials (the searched parameters), in first-seen order."""
    values: dict[str, set[str]] = {}
    for trial in trials:
        for override in trial.overrides:
            key, _, value = override.partition("=")
            values.setdefault(key, set()).add(value)
    return [
        key
        for key, seen in values.items()
        if (len(seen) > 1 or len(trials) == 1) and not key.startswith(LOCATION_PREFIXES)
    ]


def load_study(trials: list[Trial], storage: str | None):
    """The Optuna study the trials belong to, or None when it cannot be opened."""
    study_name = next((t.study for t in trials if t.study), None)
    storage = storage or next((t.storage for t in trials if t.storage), None)
    if not study_name or not storage:
        return None
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.load_study(study_name=study_name, storage=storage)
    except Exception as err:  # noqa: BLE001 - a missing/locked database only loses the importances
        print(f"note: cannot open study {study_name!r} in {storage}: {err}", file=sys.stderr)
        return None


def parameter_importances(study) -> dict[str, float]:
    import optuna

    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if len(complete) < 2:
        return {}
    try:
        return optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError) as err:
        print(f"note: no parameter importances ({err})", file=sys.stderr)
        return {}


def sort_key(trial: Trial) -> tuple[int, float]:
    return (0, trial.best_val_loss) if math.isfinite(trial.best_val_loss) else (1, 0.0)


def format_table(trials: list[Trial], keys: list[str]) -> str:
    header = ["#", *keys, "best val loss", "tokens/s", "peak GB", "status", "run dir"]
    rows = []
    for rank, trial in enumerate(trials, 1):
        values = dict(o.partition("=")[::2] for o in trial.overrides)
        rows.append(
            [
                str(rank),
                *(values.get(k, "") for k in keys),
                f"{trial.best_val_loss:.4f}",
                f"{trial.tokens_per_second:.0f}",
                f"{trial.peak_memory_gb:.2f}",
                trial.status,
                str(trial.run_dir),
            ]
        )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def best_override_line(trial: Trial) -> str:
    return " ".join(o for o in trial.overrides if not o.startswith(LOCATION_PREFIXES))


def trial_label(trial: Trial, keys: list[str]) -> str:
    """`<sweep>/<job>: key=value ...` with the swept values, short enough for a legend."""
    values = dict(o.partition("=")[::2] for o in trial.overrides)
    shown = " ".join(f"{k.split('.')[-1]}={values[k][:8]}" for k in keys if k in values)
    return f"{trial.run_dir.parent.name[-6:]}/{trial.run_dir.name}: {shown}"


def plot(trials: list[Trial], importances: dict[str, float], out: Path, keys: list[str]) -> Path:
    """PNG: validation loss against step per trial (left), parameter importances (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (curves, bars) = plt.subplots(1, 2, figsize=(12, 4.5))
    for trial in trials:
        if trial.val_curve:
            steps, losses = zip(*trial.val_curve)
            curves.plot(steps, losses, marker="o", markersize=3, label=trial_label(trial, keys))
    curves.set(
        xlabel="optimizer step", ylabel="validation loss (nats/token)", title="validation loss per trial"
    )
    if any(t.val_curve for t in trials):
        curves.legend(fontsize=7)
    if importances:
        names = list(importances)
        bars.barh(names, [importances[n] for n in names])
        bars.invert_yaxis()
        bars.set(xlabel="importance (fANOVA)", title="Optuna parameter importances")
    else:
        bars.text(
            0.5, 0.5, "importances need an Optuna study\nwith 2+ completed trials", ha="center", va="center"
        )
        bars.set_axis_off()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def compare(
    target: str, *, root: str | Path = "multirun", storage: str | None = None, out: str | Path | None = None
) -> dict[str, Any]:
    """Print the comparison and write the figure; returns the sorted trials, best line, importances, figure."""
    trials = find_trials(target, Path(root))
    if not trials:
        raise SystemExit(
            f"no trials found for {target!r} (a multirun directory, or a study name under {root})"
        )
    trials.sort(key=sort_key)
    study = load_study(trials, storage)
    importances = parameter_importances(study) if study is not None else {}
    figure = Path(out) if out else (Path(target) if Path(target).is_dir() else Path(root)) / "compare.png"
    keys = swept_overrides(trials)
    plot(trials, importances, figure, keys)
    print(format_table(trials, keys))
    best = trials[0]
    line = best_override_line(best)
    print(
        f"\nbest: python -m harness.train {line}"
        if math.isfinite(best.best_val_loss)
        else "\nno trial finished with a finite validation loss"
    )
    if study is not None:
        states: dict[str, int] = {}
        for t in study.trials:
            states[t.state.name] = states.get(t.state.name, 0) + 1
        print(
            f"study {study.study_name}: {len(study.trials)} trials "
            + ", ".join(f"{n} {s.lower()}" for s, n in sorted(states.items()))
        )
    if importances:
        print("importances: " + ", ".join(f"{k} {v:.2f}" for k, v in importances.items()))
    print(f"figure: {figure}")
    return {
        "trials": trials,
        "best_overrides": line,
        "importances": importances,
        "figure": figure,
        "study": study,
    }


def main(argv: list[str] | None = None) -> None:
    """Console entry point (`qlora-compare`)."""
    parser = argparse.ArgumentParser(prog="python -m harness.compare", description=__doc__.split("\n")[0])
    parser.add_argument("target", help="a multirun directory, or an Optuna study name")
    parser.add_argument(
        "--root", default="multirun", help="where to look for a study's jobs (paths.multirun)"
    )
    parser.add_argument(
        "--storage", default=None, help="Optuna storage URL (default: the one the sweep used)"
    )
    parser.add_argument("--out", default=None, help="PNG to write (default: <target or root>/compare.png)")
    args = parser.parse_args(argv)
    compare(args.target, root=args.root, storage=args.storage, out=args.out)


if __name__ == "__main__":
    main()
