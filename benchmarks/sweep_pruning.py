"""Pruned against unpruned sweeps, and the seed noise of one configuration, on any model.

    python benchmarks/sweep_pruning.py --out /tmp/pruning -- model=tiny            # what BENCHMARKS.md reports
    python benchmarks/sweep_pruning.py --out /tmp/pruning --settings '' -- experiment=<smollm2 experiment>

Runs the same `hparams_search` sweep (same sampler seed, one trial at a time so the pruner and TPE see every
earlier trial) twice: with `--pruner` and with `hparams_search/pruner=none`; then the configuration the overrides
describe (no swept parameters) with `trainer.seed` = 0..seeds-1. Prints, and writes to `<out>/summary.json`, the
optimizer steps each sweep spent, each sweep's best validation loss, and the mean and standard deviation of the
seed runs' best validation losses. Everything after `--` is passed to every run (model, experiment, data...).
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
# Short runs of the tiny model that still show a learning curve: 24 steps, a validation every 4.
TINY_SETTINGS = (
    "experiment=tiny_dolly_sample debug=fast data.max_records=2000 trainer.max_steps=24 trainer.eval_every=4 "
    "trainer.batch_size=4 "
    "trainer.max_eval_examples=32 optim.warmup_steps=2 trainer.num_sample_prompts=0 logger=none"
)


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


def sweep(name: str, pruner: str, opts: argparse.Namespace, common: list[str]) -> dict:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="working folder (sweeps, studies, summary.json)")
    parser.add_argument("--hparams-search", default="tiny_optuna")
    parser.add_argument("--pruner", default="median", help="hparams_search/pruner option of the pruned sweep")
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--sampler-seed", type=int, default=1234)
    parser.add_argument("--settings", default=TINY_SETTINGS, help="overrides for short runs ('' for none)")
    parser.add_argument("overrides", nargs="*", help="after --: overrides for every run")
    opts = parser.parse_args()
    opts.out = opts.out.resolve()
    opts.out.mkdir(parents=True, exist_ok=True)
    common = [*opts.settings.split(), *opts.overrides]
    results = {
        "overrides": common,
        "pruned": sweep("pruned", opts.pruner, opts, common),
        "unpruned": sweep("unpruned", "none", opts, common),
        "seed_noise": seed_noise(opts, common),
    }
    pruned, unpruned, noise = results["pruned"], results["unpruned"], results["seed_noise"]
    results["step_ratio"] = pruned["optimizer_steps"] / unpruned["optimizer_steps"]
    results["best_gap_in_seed_std"] = (pruned["best_val_loss"] - unpruned["best_val_loss"]) / noise["std"]
    (opts.out / "summary.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
