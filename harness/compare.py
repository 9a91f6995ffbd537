"""Compare the trials of a sweep: `python -m harness.compare <multirun dir | study name> [--out fig.png]`.

Prints a table of trials sorted by best validation loss (swept parameters, best val loss, seed noise, distance
from the best, tokens/s, peak memory, status), the best configuration as a ready-to-paste override line, and
writes a PNG with the validation-loss curve of every trial (pruned ones end where they stopped) and Optuna's
parameter importances. Reads each job's `job.json` and `metrics.jsonl`, and the Optuna study from the storage
the sweep used.

The noise floor: `--repeat-top K --seeds S` re-runs the K best configurations with S-1 more values of
`trainer.seed` (data order and LoRA initialisation; the validation set stays fixed), records each
configuration's mean and standard deviation in `noise.json` beside the sweep, and from then on the table shows
them and marks as "tie" every trial whose distance from the best is within `--tie-sigmas` seed standard
deviations. `--noise-std` gives a standard deviation measured elsewhere (BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.tracking import read_metrics

JOB_FILE = "job.json"
NOISE_FILE = "noise.json"
RUN_CONFIG_FILE = "run_config.yaml"  # harness.run_state.RUN_CONFIG_FILE (not imported: it pulls in MLX)
# Overrides that say where things go, not what is trained: left out of the "ready to paste" line.
LOCATION_PREFIXES = ("hydra.", "paths.", "hparams_search", "resume")
# fANOVA importances from fewer completed trials mostly describe where the sampler happened to look, not what
# matters: below this, compare says how many it has instead of printing numbers.
MIN_IMPORTANCE_TRIALS = 10


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
    number: int | None = None  # Optuna trial number (the project's sweeper)
    experiment: str | None = None  # the experiment config the job composed
    seed_losses: list[float] = field(default_factory=list)  # best val loss per seed (noise.json), this run first


def load_trial(run_dir: Path) -> Trial:
    job = json.loads((run_dir / JOB_FILE).read_text())
    trial = Trial(run_dir, list(job.get("overrides") or []), job.get("study"), job.get("storage"))
    trial.number, trial.experiment = job.get("trial"), job.get("experiment")
    for record in read_metrics(run_dir):
        if record.get("summary"):
            trial.best_val_loss = float(record.get("best_val_loss", math.nan))
            trial.tokens_per_second = float(record.get("tokens_per_second", math.nan))
            trial.peak_memory_gb = float(record.get("peak_memory_gb", math.nan))
            trial.status = (
                "diverged" if record.get("diverged") else "pruned" if record.get("pruned") else "complete"
            )
        elif "val/loss" in record:
            trial.val_curve.append((int(record["step"]), float(record["val/loss"])))
        elif record.get("train/diverged"):
            trial.status = "diverged"
    return trial


def find_trials(target: str, root: Path) -> list[Trial]:
    """Jobs of a multirun directory, or of every sweep under `root` that ran study `target` (seed repeats under
    `repeats/` are not trials)."""
    path = Path(target)
    if path.is_dir():
        jobs = [load_trial(p.parent) for p in path.rglob(JOB_FILE) if "repeats" not in p.relative_to(path).parts]
        return sorted(jobs, key=lambda t: str(t.run_dir))
    jobs = [load_trial(p.parent) for p in root.rglob(JOB_FILE)] if root.is_dir() else []
    return sorted((t for t in jobs if t.study == target), key=lambda t: str(t.run_dir))


def noise_file(target: str, root: Path) -> Path:
    """Where the seed repeats of a sweep are recorded: beside the sweep, or per study under `root`."""
    return Path(target) / NOISE_FILE if Path(target).is_dir() else root / f"noise-{target}.json"


def attach_noise(trials: list[Trial], path: Path) -> None:
    """Fill `seed_losses` of the trials that `path` (noise.json) has repeats for."""
    if not path.exists():
        return
    records = {str(Path(r["run_dir"]).resolve()): r for r in json.loads(path.read_text())}
    for trial in trials:
        record = records.get(str(trial.run_dir.resolve()))
        if record:
            trial.seed_losses = [float(v) for v in record["best_val_losses"]]


def noise_floor(trials: list[Trial]) -> float | None:
    """Seed standard deviation of the best validation loss, pooled over the repeated configurations
    (root mean of their variances), or None without repeats."""
    variances = [statistics.variance(t.seed_losses) for t in trials if len(t.seed_losses) > 1]
    return math.sqrt(statistics.fmean(variances)) if variances else None


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


def importance_refusal(study, noise_std: float | None) -> str | None:
    """Why parameter importances would not mean anything for `study`, or None when they may be shown."""
    import optuna

    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if len(complete) < MIN_IMPORTANCE_TRIALS:
        return (
            f"{len(complete)} completed trials; importances need at least {MIN_IMPORTANCE_TRIALS}: "
            "with fewer, fANOVA credits whichever parameter happened to vary most with the noise"
        )
    values = [t.value for t in complete if t.value is not None and math.isfinite(t.value)]
    if noise_std is not None and values and max(values) - min(values) <= 2 * noise_std:
        return (
            f"all {len(values)} completed trials lie within {max(values) - min(values):.4f} of each other, "
            f"inside the seed noise (2 x {noise_std:.4f}): no parameter measurably matters"
        )
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


def seed_cell(trial: Trial) -> str:
    """`mean±std(n)` of the trial's seed repeats, or "" without repeats."""
    if len(trial.seed_losses) < 2:
        return ""
    return (
        f"{statistics.fmean(trial.seed_losses):.4f}±{statistics.stdev(trial.seed_losses):.4f}"
        f"({len(trial.seed_losses)})"
    )


def gap_cell(trial: Trial, best: float, noise_std: float | None, tie_sigmas: float) -> str:
    """Distance from the best trial's loss, with "tie" when it is within `tie_sigmas` seed std's."""
    if not math.isfinite(trial.best_val_loss) or not math.isfinite(best):
        return ""
    gap = trial.best_val_loss - best
    tie = noise_std is not None and gap <= tie_sigmas * noise_std
    return f"+{gap:.4f}" + ("(tie)" if tie else "")


def format_table(
    trials: list[Trial], keys: list[str], noise_std: float | None = None, tie_sigmas: float = 2.0
) -> str:
    header = ["#", *keys, "best val loss", "seeds mean±std(n)", "vs best", "tokens/s", "peak GB", "status", "run dir"]
    best = trials[0].best_val_loss if trials else math.nan
    rows = []
    for rank, trial in enumerate(trials, 1):
        values = dict(o.partition("=")[::2] for o in trial.overrides)
        rows.append(
            [
                str(rank),
                *(values.get(k, "") for k in keys),
                f"{trial.best_val_loss:.4f}",
                seed_cell(trial) or "-",
                ("best" if rank == 1 else gap_cell(trial, best, noise_std, tie_sigmas)) or "-",
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
    """The trial's overrides as a single-run command line; the experiment first when a sweep config chose it."""
    line = [o for o in trial.overrides if not o.startswith(LOCATION_PREFIXES)]
    if trial.experiment and not any(o.startswith("experiment=") for o in line):
        line.insert(0, f"experiment={trial.experiment}")
    return " ".join(line)


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
            pruned = trial.status == "pruned"
            label = trial_label(trial, keys) + (" (pruned)" if pruned else "")
            (line,) = curves.plot(
                steps, losses, marker="o", markersize=3, linestyle="--" if pruned else "-", label=label
            )
            if pruned:  # where the pruner stopped it
                curves.plot(steps[-1], losses[-1], marker="x", markersize=9, color=line.get_color())
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
            0.5,
            0.5,
            f"no importances: they need an Optuna study\nwith {MIN_IMPORTANCE_TRIALS}+ completed trials",
            ha="center",
            va="center",
        )
        bars.set_axis_off()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def study_states(trials: list[Trial], study) -> None:
    """Take each trial's state from the study where its run directory cannot tell: a job killed mid-run has no
    summary, and the study says whether it failed (its worker died) or is still running."""
    if study is None:
        return
    by_number = {t.number: t for t in study.trials}
    for trial in trials:
        frozen = by_number.get(trial.number)
        if frozen is not None and trial.status == "incomplete":
            trial.status = {"FAIL": "failed", "RUNNING": "running", "PRUNED": "pruned"}.get(
                frozen.state.name, trial.status
            )


def repeat_seeds(trial: Trial, seeds: int, out_dir: Path) -> list[float]:
    """Best validation losses of `trial`'s configuration with `seeds` values of `trainer.seed`: the trial's own
    run first, then re-runs (single runs, in subprocesses) with the next seeds, under `out_dir/seed<k>`."""
    from omegaconf import OmegaConf

    own_seed = int(OmegaConf.load(trial.run_dir / RUN_CONFIG_FILE).trainer.seed)
    losses = [trial.best_val_loss]
    for seed in range(own_seed + 1, own_seed + seeds):
        run_dir = out_dir / f"seed{seed}"
        summary = next((r for r in read_metrics(run_dir) if r.get("summary")), None)
        if summary is None:  # not run yet (a repeat command that was interrupted continues here)
            overrides = [o for o in best_override_line(trial).split() if not o.startswith("trainer.seed=")]
            command = [sys.executable, "-m", "harness.train", *overrides, f"trainer.seed={seed}",
                       f"hydra.run.dir={run_dir}"]  # fmt: skip
            print(f"repeat: {' '.join(command[1:])}", file=sys.stderr)
            subprocess.run(command, check=True)
            summary = next(r for r in read_metrics(run_dir) if r.get("summary"))
        losses.append(float(summary["best_val_loss"]))
    return losses


def repeat_top(trials: list[Trial], top: int, seeds: int, path: Path) -> None:
    """Re-run the `top` best finished trials with `seeds` seeds each, record them in `path` (noise.json) and
    print one line per configuration."""
    finished = [t for t in trials if t.status == "complete" and math.isfinite(t.best_val_loss)][:top]
    records = json.loads(path.read_text()) if path.exists() else []
    records = [r for r in records if r["run_dir"] not in {str(t.run_dir) for t in finished}]
    print(f"seed repeats ({seeds} seeds per configuration; validation set fixed):")
    for rank, trial in enumerate(finished, 1):
        out_dir = path.parent / "repeats" / f"{trial.run_dir.parent.name}-{trial.run_dir.name}"
        losses = repeat_seeds(trial, seeds, out_dir)
        trial.seed_losses = losses
        records.append(
            {
                "run_dir": str(trial.run_dir),
                "overrides": best_override_line(trial),
                "best_val_losses": losses,
                "mean": statistics.fmean(losses),
                "std": statistics.stdev(losses) if len(losses) > 1 else None,
            }
        )
        print(f"  {rank}. {seed_cell(trial)}  {best_override_line(trial)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=2))


def compare(
    target: str,
    *,
    root: str | Path = "multirun",
    storage: str | None = None,
    out: str | Path | None = None,
    repeat: int = 0,
    seeds: int = 3,
    noise_std: float | None = None,
    tie_sigmas: float = 2.0,
) -> dict[str, Any]:
    """Print the comparison and write the figure; returns the sorted trials, best line, importances, figure,
    study and the noise floor used (seed std of the best validation loss, or None)."""
    trials = find_trials(target, Path(root))
    if not trials:
        raise SystemExit(
            f"no trials found for {target!r} (a multirun directory, or a study name under {root})"
        )
    trials.sort(key=sort_key)
    study = load_study(trials, storage)
    study_states(trials, study)
    noise_path = noise_file(target, Path(root))
    if repeat:
        repeat_top(trials, repeat, seeds, noise_path)
    attach_noise(trials, noise_path)
    noise_std = noise_std if noise_std is not None else noise_floor(trials)
    refusal = importance_refusal(study, noise_std) if study is not None else "no Optuna study to read"
    importances = parameter_importances(study) if refusal is None else {}
    figure = Path(out) if out else (Path(target) if Path(target).is_dir() else Path(root)) / "compare.png"
    keys = swept_overrides(trials)
    plot(trials, importances, figure, keys)
    print(format_table(trials, keys, noise_std, tie_sigmas))
    best = trials[0]
    line = best_override_line(best)
    print(
        f"\nbest: python -m harness.train {line}"
        if math.isfinite(best.best_val_loss)
        else "\nno trial finished with a finite validation loss"
    )
    if noise_std is not None:
        ties = sum("(tie)" in gap_cell(t, best.best_val_loss, noise_std, tie_sigmas) for t in trials[1:])
        print(
            f"seed noise: std {noise_std:.4f} of the best validation loss; {ties} other trial(s) within "
            f"{tie_sigmas:g} std of the best (tie): the ranking among them is noise"
        )
    else:
        print(
            "seed noise: unknown; `--repeat-top 3 --seeds 3` measures it (or --noise-std), "
            "until then differences between trials may be noise"
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
    else:
        print(f"importances: not shown ({refusal})")
    print(f"figure: {figure}")
    return {
        "trials": trials,
        "best_overrides": line,
        "importances": importances,
        "figure": figure,
        "study": study,
        "noise_std": noise_std,
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
    parser.add_argument(
        "--repeat-top", type=int, default=0, metavar="K", help="re-run the K best trials with more seeds"
    )
    parser.add_argument(
        "--seeds", type=int, default=3, help="seeds per repeated configuration, the trial's own run included"
    )
    parser.add_argument(
        "--noise-std", type=float, default=None, help="seed std of the best val loss, measured elsewhere"
    )
    parser.add_argument(
        "--tie-sigmas", type=float, default=2.0, help="a trial this many seed std's from the best is a tie"
    )
    args = parser.parse_args(argv)
    if args.repeat_top and args.seeds < 2:
        parser.error("--seeds must be at least 2 to measure a spread")
    compare(
        args.target,
        root=args.root,
        storage=args.storage,
        out=args.out,
        repeat=args.repeat_top,
        seeds=args.seeds,
        noise_std=args.noise_std,
        tie_sigmas=args.tie_sigmas,
    )


if __name__ == "__main__":
    main()
