"""Pruned against unpruned sweeps, and the seed noise of one configuration, on any model.

    python benchmarks/sweep_pruning.py --out /tmp/pruning -- model=tiny            # what BENCHMARKS.md reports
    python benchmarks/sweep_pruning.py --out /tmp/pruning --hparams-search dolly_optuna --settings smollm2
    python benchmarks/sweep_pruning.py --out /tmp/pruning ... --part unpruned      # one part at a time, then
    python benchmarks/sweep_pruning.py --out /tmp/pruning ... --replay median:n_warmup_steps=8  # pruners replayed

Runs the same `hparams_search` sweep (same sampler seed, one trial at a time so the pruner and TPE see every
earlier trial) twice: with `--pruner` and with `hparams_search/pruner=none`; then the configuration the overrides
describe (no swept parameters) with `trainer.seed` = 0..seeds-1. Prints, and writes to `<out>/summary.json`, the
optimizer steps each sweep spent, each sweep's best validation loss, and the mean and standard deviation of the
seed runs' best validation losses. Everything after `--` is passed to every run (model, experiment, data...).
`--part` runs one of the three (results in `<out>/<part>.json`; the summary combines what is there). `--replay`
feeds the unpruned sweep's learning curves, trial by trial, to Optuna pruners built from the given settings and
prints the steps each would have spent and the best loss it would have kept: a way to choose a pruner before
paying for a real pruned sweep (the real one still differs, since its sampler sees the pruned curves).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # harness.tracking for reading runs, from a checkout without installing
# Short runs of the tiny model that still show a learning curve: 24 steps, a validation every 4.
TINY_SETTINGS = (
    "experiment=tiny_dolly_sample debug=fast data.max_records=2000 trainer.max_steps=24 trainer.eval_every=4 "
    "trainer.batch_size=4 "
    "trainer.max_eval_examples=32 optim.warmup_steps=2 trainer.num_sample_prompts=0 logger=none"
)


# Short runs of the default model (SmolLM2-135M-Instruct) on the default data (the first 480 sample records):
# 24 steps of batch 4, a validation of the first 24 validation records every 4 steps, no answers or exact match.
SMOLLM2_SETTINGS = (
    "trainer.max_steps=24 trainer.eval_every=4 trainer.max_eval_examples=24 optim.warmup_steps=2 "
    "trainer.num_sample_prompts=0 trainer.exact_match_examples=0 logger=none"
)
SETTINGS = {"tiny": TINY_SETTINGS, "smollm2": SMOLLM2_SETTINGS}


def run(args: list[str], out: Path) -> float:
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    proc = subprocess.run(
        [sys.executable, "-m", "harness.train", *args], cwd=out, env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise SystemExit(f"harness.train {' '.join(args)} failed:\n{proc.stderr[-4000:]}")
    return time.perf_counter() - start


def summaries(sweep_dir: Path) -> list[dict]:
    """The summary record of every job of a sweep directory."""
    from harness.tracking import read_metrics

    found = []
    for job in sorted(sweep_dir.glob("*/job.json")):
        summary = next((r for r in read_metrics(job.parent) if r.get("summary")), None)
        if summary is not None:
            found.append(summary)
    return found


def sweep(name: str, pruner: str, opts: argparse.Namespace, common: list[str], extra: list[str] = ()) -> dict:
    sweep_dir = opts.out / name
    seconds = run(
        [
            "-m",
            f"hparams_search={opts.hparams_search}",
            f"hparams_search/pruner={pruner}",
            f"hydra.sweeper.study_name=bench_{name}",
            f"hydra.sweeper.n_trials={opts.trials}",
            "hydra.sweeper.n_jobs=1",
            f"hydra.sweeper.sampler.seed={opts.sampler_seed}",
            f"paths.multirun={opts.out}/multirun",
            f"hydra.sweep.dir={sweep_dir}",
            *common,
            *extra,
        ],
        opts.out,
    )
    runs = summaries(sweep_dir)
    return {
        "pruner": pruner,
        "trials": len(runs),
        "pruned": sum(bool(r.get("pruned")) for r in runs),
        "optimizer_steps": sum(int(r["steps"]) for r in runs),
        "best_val_loss": min(r["best_val_loss"] for r in runs),
        "wall_seconds": round(seconds, 1),
    }


def seed_noise(opts: argparse.Namespace, common: list[str]) -> dict:
    seeds = ",".join(str(s) for s in range(opts.seeds))
    seed_dir = opts.out / "seeds"
    run(["-m", f"trainer.seed={seeds}", f"hydra.sweep.dir={seed_dir}", *common], opts.out)
    losses = [r["best_val_loss"] for r in summaries(seed_dir)]
    return {
        "seeds": opts.seeds,
        "best_val_losses": losses,
        "mean": statistics.fmean(losses),
        "std": statistics.stdev(losses) if len(losses) > 1 else float("nan"),
    }


def curves(sweep_dir: Path) -> list[list[tuple[int, float]]]:
    """Each job's validation curve, [(step, val/loss), ...], in job order."""
    from harness.tracking import read_metrics

    jobs = sorted(sweep_dir.glob("*/job.json"), key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
    return [[(int(r["step"]), float(r["val/loss"])) for r in read_metrics(job.parent) if "val/loss" in r]
            for job in jobs]


def replay(spec: str, trial_curves: list[list[tuple[int, float]]], max_steps: int) -> dict:
    """What the pruner `spec` ("median:n_warmup_steps=8,n_startup_trials=4" or "successive_halving:...") would
    have done to these curves, fed in order as finished trials: steps spent, trials pruned, best loss kept."""
    import optuna

    kind, _, args = spec.partition(":")
    kwargs = {k: float(v) if "." in v else int(v) for k, v in (a.split("=") for a in args.split(",") if a)}
    pruner = {"median": optuna.pruners.MedianPruner, "percentile": optuna.pruners.PercentilePruner,
              "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
              "hyperband": optuna.pruners.HyperbandPruner}[kind](**kwargs)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # A fixed name: Hyperband assigns trials to brackets by hashing the study's name with the trial number.
    study = optuna.create_study(study_name="replay", direction="minimize", pruner=pruner)
    steps, pruned, best = 0, 0, float("inf")
    for curve in trial_curves:
        trial = study.ask()
        stopped_at = None
        for step, loss in curve:
            trial.report(loss, step)
            if step > 0 and trial.should_prune():
                stopped_at = step
                break
        seen = [loss for step, loss in curve if stopped_at is None or step <= stopped_at]
        best = min(best, *seen)
        if stopped_at is None:
            study.tell(trial, min(seen))
            steps += max_steps
        else:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            steps += stopped_at
            pruned += 1
    return {"pruner": spec, "pruned": pruned, "optimizer_steps": steps, "best_val_loss": best}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="working folder (sweeps, studies, summary.json)")
    parser.add_argument("--hparams-search", default="tiny_optuna")
    parser.add_argument("--pruner", default="median", help="hparams_search/pruner option of the pruned sweep")
    parser.add_argument("--pruner-overrides", default="", help="overrides for the pruned sweep alone, e.g. "
                        "'hydra.sweeper.pruner.min_resource=4'")
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--sampler-seed", type=int, default=1234)
    parser.add_argument("--settings", default="tiny",
                        help="overrides for short runs: 'tiny', 'smollm2', '' for none, or the overrides themselves")
    parser.add_argument("--part", choices=("all", "pruned", "unpruned", "seeds"), default="all")
    parser.add_argument("--replay", nargs="*", default=[], metavar="PRUNER:K=V,...",
                        help="replay the unpruned sweep's curves through these pruners, then exit")
    parser.add_argument("overrides", nargs="*", help="after --: overrides for every run")
    opts = parser.parse_args()
    opts.out = opts.out.resolve()
    opts.out.mkdir(parents=True, exist_ok=True)
    common = [*SETTINGS.get(opts.settings, opts.settings).split(), *opts.overrides]
    if opts.replay:
        trial_curves = curves(opts.out / "unpruned")
        max_steps = max(step for curve in trial_curves for step, _ in curve)
        for spec in ["none:", *opts.replay]:
            if spec.startswith("none"):
                row = {"pruner": "none", "pruned": 0, "optimizer_steps": max_steps * len(trial_curves),
                       "best_val_loss": min(loss for curve in trial_curves for _, loss in curve)}
            else:
                row = replay(spec, trial_curves, max_steps)
            print(json.dumps(row))
        return
    parts = {
        "pruned": lambda: sweep("pruned", opts.pruner, opts, common, opts.pruner_overrides.split()),
        "unpruned": lambda: sweep("unpruned", "none", opts, common),
        "seed_noise": lambda: seed_noise(opts, common),
    }
    chosen = {"all": list(parts), "seeds": ["seed_noise"]}.get(opts.part, [opts.part])
    for part in chosen:
        result = {"overrides": common, **parts[part]()}
        (opts.out / f"{part}.json").write_text(json.dumps(result, indent=2))
        print(json.dumps({part: result}, indent=2))
    results = {p: json.loads((opts.out / f"{p}.json").read_text()) for p in parts if (opts.out / f"{p}.json").exists()}
    if len(results) == len(parts):
        pruned, unpruned, noise = results["pruned"], results["unpruned"], results["seed_noise"]
        results["step_ratio"] = pruned["optimizer_steps"] / unpruned["optimizer_steps"]
        results["best_gap_in_seed_std"] = (pruned["best_val_loss"] - unpruned["best_val_loss"]) / noise["std"]
        (opts.out / "summary.json").write_text(json.dumps(results, indent=2))
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
