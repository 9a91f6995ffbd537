"""The project's Optuna sweeper (hydra_plugins/qlora_sweeper): per-trial sampler seeds, pruning inside Hydra sweeps,
workers sharing a study on SQLite and on a real PostgreSQL server (one of them killed mid-trial), one device per
worker process, and the noise-floor repeat of `harness.compare`."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState
from sqlalchemy.exc import OperationalError

from harness.tracking import read_metrics
from hydra_plugins.qlora_sweeper.sweeper import QLoRAOptunaSweeperImpl
from tests.harness.conftest import FAST, REPO, run_cli
from tests.harness.postgres import postgres_url  # noqa: F401  (fixture)

STUDY = "tiny_dolly"
MAX_STEPS = 6  # debug=fast
SPACE = {"x": FloatDistribution(0.0, 1.0), "c": CategoricalDistribution([1, 2, 3, 4, 5, 6, 7, 8])}


def sweeper_impl(seed: int | None = 7) -> QLoRAOptunaSweeperImpl:
    sampler = OmegaConf.create({"_target_": "optuna.samplers.TPESampler", "seed": seed})
    return QLoRAOptunaSweeperImpl(
        sampler, "minimize", None, "s", 4, 1, 0.0, None, None, pruner=None, heartbeat_interval=None,
        grace_period=None, max_retry=0, sqlite_timeout=60.0, max_study_trials=None,
    )  # fmt: skip


def draw(impl: QLoRAOptunaSweeperImpl, study: optuna.Study) -> tuple:
    """Ask one trial the way the sweeper does, suggest the space, tell a value; return the drawn point."""
    trial = impl._ask(study)
    point = tuple(trial._suggest(name, dist) for name, dist in SPACE.items())
    study.tell(trial, point[0])
    return point


def test_fresh_studies_repeat_their_seed_and_relaunches_or_second_workers_draw_new_points(tmp_path):
    storage = f"sqlite:///{tmp_path}/s.db"
    first = optuna.create_study(study_name="a", storage=storage)
    points = [draw(sweeper_impl(), first) for _ in range(3)]  # three launches of one trial each
    again = optuna.create_study(study_name="b", storage=storage)
    impl = sweeper_impl()
    assert [draw(impl, again) for _ in range(3)] == points  # a fresh study is reproducible from its seed
    # Two workers (sweeper processes, each seeded the same) taking turns on one study: every point is new.
    shared = optuna.create_study(study_name="c", storage=storage)
    worker_a, worker_b = sweeper_impl(), sweeper_impl()
    drawn = [draw(worker, shared) for _ in range(3) for worker in (worker_a, worker_b)]
    assert len(set(drawn)) == len(drawn)
    assert drawn[:3] != drawn[3:]


def test_a_batch_of_parallel_trials_draws_the_points_one_trial_at_a_time_draws(tmp_path):
    """With `n_jobs` > 1 the sweeper asks a batch of trials before launching them; each must still draw with the
    sampler seeded for it, so a fresh study's points do not depend on how many trials run at once."""
    storage = f"sqlite:///{tmp_path}/s.db"

    def suggest(trial):
        return tuple(trial._suggest(name, dist) for name, dist in SPACE.items())

    def points(study_name: str, batch: int) -> list[tuple]:
        study, impl, drawn = optuna.create_study(study_name=study_name, storage=storage), sweeper_impl(), []
        while len(drawn) < 4:
            trials: list = []
            for trial, overrides in zip(trials, impl._ask_batch(study, batch, trials, suggest)):
                drawn.append(overrides[:-1])  # the last override names the trial for its job
                study.tell(trial, overrides[0])
        return drawn

    one_at_a_time = points("one", 1)
    assert points("two", 2) == one_at_a_time
    assert len(set(one_at_a_time)) == 4


def test_each_worker_process_claims_its_own_device(tmp_path):
    from harness import worker_devices

    claim = (
        "import sys; from pathlib import Path; from harness.worker_devices import claim_device; "
        "print(claim_device(['0', '1'], Path(sys.argv[1])), flush=True); sys.stdin.read()"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    first = subprocess.Popen(
        [sys.executable, "-c", claim, str(tmp_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env=env,
    )  # fmt: skip
    try:
        assert first.stdout.readline().strip() == "0"  # and holds it while alive
        second = run_claim(claim, tmp_path, env)
        assert second.stdout.strip() == "1"
        worker_devices._claimed = None
        assert worker_devices.claim_device(["0", "1"], tmp_path) == "1"  # "1" is free again: its process ended
        assert worker_devices.claim_device(["0", "1"], tmp_path) == "1"  # the same process keeps its device
        third = run_claim(claim, tmp_path, env, check=False)
        assert third.returncode != 0 and "every device is held" in third.stderr
    finally:
        first.communicate("", timeout=30)
        if worker_devices._claimed is not None:
            worker_devices._claimed[1].close()
            worker_devices._claimed = None


def run_claim(code: str, lock_dir: Path, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code, str(lock_dir)], input="", capture_output=True, text=True, env=env,
        check=check, timeout=60,
    )  # fmt: skip


def sweep_args(root: Path, name: str, *extra: str) -> list[str]:
    return [
        "-m",
        "hparams_search=tiny_optuna",
        *FAST,
        "logger=none",
        f"paths.multirun={root}/multirun",
        f"hydra.sweep.dir={root}/multirun/{name}",
        *extra,
    ]


def run_sweep(root: Path, name: str, *extra: str, env: dict):
    return run_cli("harness.train", *sweep_args(root, name, *extra), env=env, cwd=root)


def load(storage: str, study: str = STUDY) -> optuna.Study:
    return optuna.load_study(study_name=study, storage=storage)


def job_dirs(sweep_dir: Path) -> dict[int, Path]:
    """Run directories of a sweep by Optuna trial number (from each job's job.json)."""
    return {json.loads(p.read_text())["trial"]: p.parent for p in sweep_dir.glob("*/job.json")}


@pytest.fixture(scope="module")
def pruned_sweep(tmp_path_factory, hermetic_env):
    """Four trials of the tiny sweep with the median pruner judging from the first finished trial on."""
    root = tmp_path_factory.mktemp("pruned")
    run_sweep(root, "first", "hydra.sweeper.n_trials=4", "hydra.sweeper.pruner.n_startup_trials=1", env=hermetic_env)
    return root


@pytest.mark.slow
def test_pruned_trials_stop_early_and_end_pruned_in_the_study(pruned_sweep):
    study = load(f"sqlite:///{pruned_sweep}/multirun/optuna.db")
    states = [t.state for t in study.trials]
    assert TrialState.PRUNED in states and TrialState.COMPLETE in states, states
    assert set(states) <= {TrialState.PRUNED, TrialState.COMPLETE}
    runs = job_dirs(pruned_sweep / "multirun" / "first")
    for trial in study.trials:
        records = read_metrics(runs[trial.number])
        val_steps = [r["step"] for r in records if "val/loss" in r]
        summary = next(r for r in records if r.get("summary"))
        # Every validation after training started was reported to the trial.
        assert sorted(trial.intermediate_values) == [s for s in val_steps if 0 < s < MAX_STEPS]
        if trial.state == TrialState.PRUNED:
            assert max(val_steps) < MAX_STEPS and summary["pruned"]
            assert trial.user_attrs["pruned_at_step"] == max(val_steps)
        else:
            assert max(val_steps) == MAX_STEPS and not summary["pruned"]
            assert trial.value == pytest.approx(summary["best_val_loss"])


@pytest.mark.slow
def test_a_resumed_pruned_sweep_samples_new_points(pruned_sweep, hermetic_env):
    storage = f"sqlite:///{pruned_sweep}/multirun/optuna.db"
    before = [t.params for t in load(storage).trials]
    run_sweep(
        pruned_sweep, "second", "hydra.sweeper.n_trials=2", "hydra.sweeper.pruner.n_startup_trials=1", env=hermetic_env
    )
    study = load(storage)
    assert len(study.trials) == 6
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials)
    added = [t.params for t in study.trials[4:]]
    assert all(params not in before for params in added), (before, added)
    assert sorted(job_dirs(pruned_sweep / "multirun" / "second")) == [4, 5]


def start_worker(root: Path, name: str, storage: str, *extra: str, env: dict, n_jobs: int = 1) -> subprocess.Popen:
    args = sweep_args(
        root, name, f"hydra.sweeper.storage={storage}", "hydra.sweeper.study_name=shared",
        f"hydra.sweeper.n_jobs={n_jobs}",
        "hparams_search/pruner=none", "hydra.sweeper.heartbeat_interval=1", "hydra.sweeper.grace_period=6", *extra,
    )  # fmt: skip
    return subprocess.Popen(
        [sys.executable, "-m", "harness.train", *args], cwd=root, env={**os.environ, **env, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip


def finish(worker: subprocess.Popen) -> None:
    output, _ = worker.communicate(timeout=600)
    assert worker.returncode == 0, output[-5000:]


def assert_study_complete(storage: str, total: int) -> optuna.Study:
    """`total` trials COMPLETE at distinct points; nothing RUNNING or WAITING."""
    study = load(storage, "shared")
    states = [t.state for t in study.trials]
    assert TrialState.RUNNING not in states and TrialState.WAITING not in states, states
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(complete) == total, states
    points = [tuple(sorted(t.params.items())) for t in complete]
    assert len(set(points)) == total
    return study


@pytest.mark.slow
def test_two_workers_share_a_sqlite_study(tmp_path, hermetic_env):
    storage = f"sqlite:///{tmp_path}/multirun/optuna.db"
    bound = ("hydra.sweeper.n_trials=4", "hydra.sweeper.max_study_trials=4")
    # Worker a runs its trials two at a time through joblib: each job reports from its own process.
    joblib = ("hydra/launcher=joblib_local", "hydra.launcher.n_jobs=2")
    workers = [
        start_worker(tmp_path, "a", storage, *bound, *joblib, env=hermetic_env, n_jobs=2),
        start_worker(tmp_path, "b", storage, *bound, env=hermetic_env),
    ]
    for worker in workers:
        finish(worker)
    study = assert_study_complete(storage, 4)
    runs = {**job_dirs(tmp_path / "multirun" / "a"), **job_dirs(tmp_path / "multirun" / "b")}
    assert sorted(runs) == [t.number for t in study.trials]  # every job knew its trial
    assert all(sorted(t.intermediate_values) == [3] for t in study.trials)  # and reported to it


@pytest.mark.slow
def test_two_workers_on_postgresql_survive_one_killed_mid_trial(tmp_path, hermetic_env, postgres_url):  # noqa: F811
    total = 3
    bound = (f"hydra.sweeper.n_trials={total + 2}", f"hydra.sweeper.max_study_trials={total}")
    doomed = start_worker(tmp_path, "doomed", postgres_url, *bound, env=hermetic_env)
    survivor = start_worker(tmp_path, "survivor", postgres_url, *bound, env=hermetic_env)
    wait_for_running(doomed, postgres_url, 2)  # both workers mid-trial
    os.killpg(doomed.pid, signal.SIGKILL)
    doomed.wait()
    finish(survivor)
    study = assert_study_complete(postgres_url, total)
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    assert len(failed) == 1  # the killed trial, failed for its stale heartbeat ...
    retried = [t for t in study.trials if t.system_attrs.get("failed_trial") == failed[0].number]
    assert [t.state for t in retried] == [TrialState.COMPLETE]  # ... and re-run by the survivor, same point
    assert retried[0].params == failed[0].params
    # compare takes the dead job's state from the study: failed, not running.
    table = run_cli("harness.compare", "shared", "--root", str(tmp_path / "multirun"), env={}, cwd=tmp_path)
    statuses = [line.split()[-2] for line in table.stdout.splitlines() if line[:1].isdigit()]
    assert "running" not in statuses and "incomplete" not in statuses, table.stdout
    killed_job_started = failed[0].number in job_dirs(tmp_path / "multirun" / "doomed")  # wrote its job.json
    assert statuses.count("failed") == int(killed_job_started)


def wait_for_running(worker: subprocess.Popen, storage: str, count: int) -> None:
    """Until the study `shared` holds `count` RUNNING trials with all their parameters drawn (the workers are
    mid-trial).

    A trial is RUNNING from `study.ask`, a moment before its parameters are suggested one by one: a worker killed in
    that moment leaves a trial without all its parameters, and its retry rightly draws the missing ones anew.
    """
    drawn = len(OmegaConf.load(REPO / "conf" / "hparams_search" / "tiny_optuna.yaml").hydra.sweeper.params)
    deadline = time.monotonic() + 300
    while True:
        assert time.monotonic() < deadline and worker.poll() is None, "no trial ever ran"
        try:
            trials = load(storage, "shared").get_trials(states=(TrialState.RUNNING,))
            running = [t for t in trials if len(t.params) == drawn]
        except (KeyError, OperationalError):  # the study (or its SQLite folder) does not exist yet
            running = []
        if len(running) == count:
            return
        time.sleep(0.2)


@pytest.mark.slow
def test_an_interrupted_sweep_leaves_no_trial_running(tmp_path, hermetic_env):
    storage = f"sqlite:///{tmp_path}/multirun/optuna.db"
    worker = start_worker(tmp_path, "interrupted", storage, "hydra.sweeper.n_trials=2", env=hermetic_env)
    deadline = time.monotonic() + 300
    while not list((tmp_path / "multirun" / "interrupted").glob("*/job.json")):  # the job is training
        assert time.monotonic() < deadline and worker.poll() is None, "no trial ever ran"
        time.sleep(0.2)
    worker.send_signal(signal.SIGINT)  # Ctrl-C
    worker.communicate(timeout=120)
    assert worker.returncode != 0
    assert [t.state for t in load(storage, "shared").trials] == [TrialState.FAIL]


@pytest.mark.slow
def test_repeat_top_records_seed_noise_and_marks_ties(pruned_sweep, hermetic_env):
    sweep_dir = pruned_sweep / "multirun" / "first"
    table = run_cli(
        "harness.compare", str(sweep_dir), "--repeat-top", "1", "--seeds", "2", env=hermetic_env, cwd=pruned_sweep
    ).stdout
    (record,) = json.loads((sweep_dir / "noise.json").read_text())
    own, repeat = record["best_val_losses"]
    rerun = sweep_dir / "repeats" / f"first-{Path(record['run_dir']).name}" / "seed1"
    assert repeat == pytest.approx(next(r for r in read_metrics(rerun) if r.get("summary"))["best_val_loss"])
    assert own != repeat  # another seed: another data order and LoRA initialisation
    std = abs(own - repeat) / 2**0.5
    assert record["std"] == pytest.approx(std)
    # Columns from the right: best val loss, seeds, vs best, tokens/s, peak GB, status, run dir.
    rows = [line.split()[-7:] for line in table.splitlines() if line[:1].isdigit()]
    assert rows[0][1] == f"{record['mean']:.4f}±{std:.4f}(2)" and rows[0][2] == "best"
    best = float(rows[0][0])
    for row in rows[1:]:
        assert row[2].endswith("(tie)") == (float(row[0]) - best <= 2 * std), row
    assert f"seed noise: std {std:.4f}" in table
    assert "importances: not shown (" in table and "need at least 10" in table


@pytest.mark.slow
def test_two_trials_on_a_local_ray_cluster(tmp_path, hermetic_env):
    pytest.importorskip("ray", reason="ray is not installed (pip install -e '.[ray]'); Ray launcher not tested")
    pytest.importorskip("hydra_plugins.hydra_ray_launcher", reason="hydra-ray-launcher is not installed")
    run_sweep(
        tmp_path, "ray", "hydra/launcher=ray_cluster", "hydra.launcher.ray.init.address=null",
        "++hydra.launcher.ray.init.num_cpus=2", "++hydra.launcher.ray.init.include_dashboard=false",
        "hydra.launcher.ray.remote.num_cpus=1", "hydra.sweeper.n_trials=2", "hparams_search/pruner=none",
        env=hermetic_env,
    )  # fmt: skip
    study = load(f"sqlite:///{tmp_path}/multirun/optuna.db")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    assert all(sorted(t.intermediate_values) == [3] for t in study.trials)
