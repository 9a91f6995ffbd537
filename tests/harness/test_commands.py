"""The real command lines in subprocesses: single run, Optuna sweep (SQLite, resume, divergence), joblib
parallel trials, compare, generate, export, download, and a misspelled override."""

import json
import math
from pathlib import Path

import optuna
import pytest

from harness.tracking import read_metrics
from tests.harness.conftest import FAST, run_cli

pytestmark = pytest.mark.slow
STUDY = "tiny_dolly"


def storage_of(root):
    return f"sqlite:///{root}/multirun/optuna.db"


def trial_states(root, study=STUDY):
    study = optuna.load_study(study_name=study, storage=storage_of(root))
    return [t.state for t in study.trials], study


def run_tiny_sweep(root: Path, n_trials: int, name: str, env: dict):
    """`n_trials` trials of the tiny Optuna sweep whose study lives under `root/multirun`, outputs in `name/`."""
    return run_cli(
        "harness.train",
        "-m",
        "hparams_search=tiny_optuna",
        *FAST,
        f"hydra.sweeper.n_trials={n_trials}",
        f"paths.multirun={root}/multirun",
        "hydra.sweep.dir=" + str(root / "multirun" / name),
        env=env,
        cwd=root,
    )


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, hermetic_env):
    """A 3-trial Optuna sweep of the tiny model in a fresh directory (the SQLite folder does not exist yet)."""
    root = tmp_path_factory.mktemp("sweep")
    return root, run_tiny_sweep(root, 3, "first", hermetic_env)


def test_sweep_lands_in_sqlite_with_three_completed_trials(sweep):
    root, _ = sweep
    states, study = trial_states(root)
    assert states == [optuna.trial.TrialState.COMPLETE] * 3
    assert {"lora.rank", "optim.lr", "data.max_seq_len"} <= set(study.best_params)
    jobs = sorted((root / "multirun/first").glob("[0-9]*"))
    assert len(jobs) == 3
    values = sorted(t.value for t in study.trials)
    returned = sorted(next(r for r in read_metrics(j) if r.get("summary"))["best_val_loss"] for j in jobs)
    assert values == pytest.approx(returned)


def test_every_sweep_job_gets_its_own_wandb_run_grouped_by_study(sweep):
    root, _ = sweep
    jobs = sorted((root / "multirun/first").glob("[0-9]*"))
    runs = [list((job / "wandb").glob("offline-run-*/run-*.wandb")) for job in jobs]
    assert all(len(r) == 1 for r in runs)
    assert len({r[0].name for r in runs}) == 3
    for job, run in zip(jobs, runs):
        info = json.loads((job / "job.json").read_text())
        assert info["study"] == STUDY and info["storage"] == storage_of(root)
        # The run record (protobuf, stored as-is offline) carries the group and the override-derived name.
        record = run[0].read_bytes()
        assert STUDY.encode() in record
        assert next(o for o in info["overrides"] if o.startswith("optim.lr=")).encode() in record


def test_compare_ranks_trials_and_prints_the_best_overrides(sweep):
    root, _ = sweep
    proc = run_cli("harness.compare", str(root / "multirun/first"), env={}, cwd=root)
    out = proc.stdout
    _, study = trial_states(root)
    best = study.best_trial
    line = next(l for l in out.splitlines() if l.startswith("best: python -m harness.train"))
    for key, value in best.params.items():
        assert f"{key}={value}" in line
    rows = [l.split() for l in out.splitlines() if l[:1].isdigit()]
    losses = [float(r[4]) for r in rows]
    assert losses == sorted(losses) and losses[0] == pytest.approx(best.value, abs=1e-4)
    png = root / "multirun/first/compare.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "importances:" in out
    by_name = run_cli(
        "harness.compare",
        STUDY,
        "--root",
        str(root / "multirun"),
        "--out",
        str(root / "c.png"),
        env={},
        cwd=root,
    )
    assert line in by_name.stdout


def test_generate_and_export_on_the_best_run(sweep, hermetic_env):
    root, _ = sweep
    _, study = trial_states(root)
    jobs = sorted((root / "multirun/first").glob("[0-9]*"))
    best = min(jobs, key=lambda j: next(r for r in read_metrics(j) if r.get("summary"))["best_val_loss"])
    args = ["prompt=Name three rivers.", "temperature=0", "max_new_tokens=6"]
    from_run = run_cli("harness.generate", f"run_dir={best}", *args, env=hermetic_env, cwd=root).stdout
    run_cli("harness.export", f"run_dir={best}", f"out_dir={root / 'export'}", env=hermetic_env, cwd=root)
    assert (root / "export/merged/config.json").is_file() and (
        root / "export/merged/tokenizer.model"
    ).is_file()
    peft_config = json.loads((root / "export/peft/adapter_config.json").read_text())
    assert peft_config["peft_type"] == "LORA" and peft_config["r"] == study.best_params["lora.rank"]
    from_export = run_cli(
        "harness.generate", f"model_dir={root / 'export/merged'}", *args, env=hermetic_env, cwd=root
    ).stdout
    assert from_run.strip() and from_run == from_export  # greedy: merged weights act like base + adapters


def test_resumed_sweep_adds_trials(sweep, hermetic_env):
    root, _ = sweep
    run_tiny_sweep(root, 1, "second", hermetic_env)
    states, _ = trial_states(root)
    assert states == [optuna.trial.TrialState.COMPLETE] * 4


def test_a_diverging_trial_fails_without_stopping_the_sweep(tmp_path, hermetic_env):
    # Grid over two learning rates, the first absurd: its loss turns NaN, Optuna marks it FAIL, the sweep goes on.
    run_cli(
        "harness.train",
        "-m",
        "hparams_search=tiny_optuna",
        *FAST,
        "logger=none",
        "hydra.sweeper.study_name=diverging",
        "hydra.sweeper.n_trials=2",
        f"paths.multirun={tmp_path}/multirun",
        "hydra/sweeper/sampler=grid",
        "lora.rank=4",
        "data.max_seq_len=64",
        "optim.grad_clip=0",
        "optim.lr=choice(1e30,3e-3)",
        env=hermetic_env,
        cwd=tmp_path,
    )
    states, study = trial_states(tmp_path, "diverging")
    assert sorted(s.name for s in states) == ["COMPLETE", "FAIL"]
    failed = next(t for t in study.trials if t.state == optuna.trial.TrialState.FAIL)
    assert failed.params["optim.lr"] == pytest.approx(1e30)
    assert study.best_trial.params["optim.lr"] == pytest.approx(3e-3)
    table = run_cli(
        "harness.compare", "diverging", "--root", str(tmp_path / "multirun"), env={}, cwd=tmp_path
    )
    rows = [line.split() for line in table.stdout.splitlines() if line[:1].isdigit()]
    assert [row[-2] for row in rows] == ["complete", "diverged"]  # the failed trial is listed last
    assert "optim.lr=0.003" in table.stdout.split("best: ")[1].splitlines()[0]


def test_two_trials_run_in_parallel_through_joblib(tmp_path, hermetic_env):
    run_cli(
        "harness.train",
        "-m",
        "hydra/launcher=joblib_local",
        *FAST,
        "lora.rank=4,8",
        f"hydra.sweep.dir={tmp_path}/multirun",
        env=hermetic_env,
        cwd=tmp_path,
    )
    spans = []
    for job in ("0", "1"):
        records = read_metrics(tmp_path / "multirun" / job)
        summary = next(r for r in records if r.get("summary"))
        assert math.isfinite(summary["best_val_loss"])
        times = [r["time"] for r in records if "time" in r]
        assert len(list((tmp_path / "multirun" / job / "wandb").glob("offline-run-*/run-*.wandb"))) == 1
        spans.append((min(times), max(times)))
    (start_a, end_a), (start_b, end_b) = spans
    assert start_a < end_b and start_b < end_a, f"jobs did not overlap: {spans}"


def test_single_run_with_overrides(tmp_path, hermetic_env):
    run_dir = tmp_path / "run"
    run_cli(
        "harness.train",
        *FAST,
        "lora.rank=4",
        "lora.target_modules=[q_proj,v_proj]",
        "quant=nf4",
        "trainer.gradient_checkpointing=true",
        "optim.grad_accum_steps=2",
        "optim=adamw_constant",
        "optim.lr=3e-3",
        "logger=none",
        f"hydra.run.dir={run_dir}",
        env=hermetic_env,
        cwd=tmp_path,
    )
    adapter_config = json.loads(
        (run_dir / "checkpoints").glob("step-*/adapter_config.json").__next__().read_text()
    )
    assert adapter_config["lora"]["rank"] == 4 and adapter_config["lora"]["target_modules"] == [
        "q_proj",
        "v_proj",
    ]
    assert adapter_config["quant"]["method"] == "nf4"
    assert (run_dir / ".hydra/overrides.yaml").is_file()
    records = read_metrics(run_dir)
    lrs = [r["train/lr"] for r in records if "train/lr" in r]
    assert lrs and lrs == pytest.approx([3e-3] * len(lrs))  # constant after a 1-step warmup
    vals = [r["val/loss"] for r in records if "val/loss" in r]
    assert len(vals) == 3 and vals[-1] < vals[0]
    assert not list(tmp_path.glob("outputs")), "nothing may be written outside the run directory"


def test_misspelled_override_fails_naming_the_key(tmp_path, hermetic_env):
    proc = run_cli(
        "harness.train",
        "lora.rnak=4",
        f"hydra.run.dir={tmp_path}/run",
        env=hermetic_env,
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode != 0
    assert "rnak" in proc.stderr and "LoRAConfig" in proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_download_offline_fails_with_a_clear_message(tmp_path, hermetic_env):
    proc = run_cli(
        "harness.download",
        "model=mistral-7b",
        f"out_dir={tmp_path}/m",
        env=hermetic_env,
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode != 0 and "HF_HUB_OFFLINE=1 is set" in proc.stderr and "Mistral-7B-v0.1" in proc.stderr
    proc = run_cli("harness.download", "model=tiny", env=hermetic_env, cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "nothing to download" in proc.stderr


def test_prepare_tokenizes_caches_and_reports(tmp_path, hermetic_env):
    env = {**hermetic_env, "QLORA_CACHE_DIR": str(tmp_path / "cache")}
    proc = run_cli("harness.prepare", "model=tiny", "data.max_records=300", "data.max_seq_len=128", env=env, cwd=tmp_path)
    assert "train" in proc.stdout and "validation" in proc.stdout
    assert list((tmp_path / "cache").rglob("stats.json")), "the tokenized splits are cached for training"
    assert not list(tmp_path.glob("outputs"))
