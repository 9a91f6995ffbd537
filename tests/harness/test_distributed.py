"""Data-parallel training (`harness.distributed`) under MLX's launcher, ring backend, on local CPU processes.

Two ranks must train what one process trains on the same global batches: the same adapters (up to the order of
float additions), the same validation losses, one run directory; a run resumes on another number of ranks; a
rank that fails stops the whole job with a non-zero exit.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from harness.distributed import Ranks, hydra_argv
from harness.launch import free_port, job_status
from harness.tracking import read_metrics
from tests.harness.conftest import FAST, REPO

# Seconds of training: 6 steps of 2 rows (one per rank), validation at steps 0, 3 and 6, no W&B.
RUN = [*FAST, "logger=none", "trainer.num_sample_prompts=0", "trainer.exact_match_examples=0"]
MLX_LAUNCH = "import sys; from mlx._distributed_utils.launch import main; sys.argv[0] = 'mlx.launch'; main()"


# ----------------------------------------------------------------------------------------------- fast checks


def test_each_rank_takes_its_own_consecutive_rows():
    batch = {"input_ids": mx.arange(10).reshape(5, 2), "labels": mx.arange(10, 20).reshape(5, 2)}
    shares = [Ranks(None, rank, 2).rows(batch) for rank in range(2)]
    assert [s["input_ids"].shape[0] for s in shares] == [2, 3]
    joined = np.concatenate([np.array(s["labels"]) for s in shares])
    assert (joined == np.array(batch["labels"])).all()
    assert Ranks().rows(batch) is batch


def test_a_batch_with_fewer_rows_than_ranks_fails_naming_the_setting():
    with pytest.raises(ValueError, match="trainer.batch_size"):
        Ranks(None, 0, 4).rows({"input_ids": mx.zeros((2, 8))})


def test_ranks_other_than_zero_give_hydra_a_command_line_that_writes_nothing(monkeypatch):
    monkeypatch.setenv("MLX_RANK", "1")
    argv = hydra_argv(["train.py", "debug=fast", "hydra.run.dir=outputs/x", "lora.rank=4"])
    assert argv[:3] == ["train.py", "debug=fast", "lora.rank=4"]
    assert "hydra.output_subdir=null" in argv and "hydra/job_logging=none" in argv
    assert not any(a == "hydra.run.dir=outputs/x" for a in argv)
    monkeypatch.setenv("MLX_RANK", "0")
    assert hydra_argv(["train.py", "hydra.run.dir=outputs/x"]) == ["train.py", "hydra.run.dir=outputs/x"]


def test_a_sweep_under_a_launcher_is_refused(monkeypatch):
    monkeypatch.setenv("MLX_RANK", "0")
    with pytest.raises(SystemExit, match="sweep"):
        hydra_argv(["train.py", "-m", "hparams_search=tiny_optuna"])


def test_the_job_exits_with_the_first_failed_ranks_status():
    assert job_status([(0, False), (0, False)]) == 0
    assert job_status([(-15, True), (3, False)]) == 3  # rank 0 stopped by the launcher after rank 1 failed
    assert job_status([(0, False), (-9, False)]) == 1  # killed by a signal: no valid exit status of its own


# ------------------------------------------------------------------------------------- launched processes


def launch(
    ranks: int, args: list[str], env: dict, cwd: Path, *, plain_mlx: bool = False, timeout: int = 240
) -> subprocess.CompletedProcess:
    """`python <args>` on `ranks` local ranks (ring backend) through `harness.launch`, or through MLX's own
    launcher (`mlx.launch`) with `plain_mlx`. One rank: the command in a single process, no launcher."""
    full_env = {**os.environ, **env, "PYTHONPATH": str(REPO)}
    if ranks == 1:
        command = [sys.executable, *args]
    else:
        options = ["-n", str(ranks), "--backend", "ring", "--starting-port", str(free_port(ranks))]
        if plain_mlx:
            command = [sys.executable, "-c", MLX_LAUNCH, *options, "--python", sys.executable, *args]
        else:
            command = [sys.executable, "-m", "harness.launch", *options, "--", *args]
    return subprocess.run(command, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def train(ranks: int, overrides: list[str], env: dict, cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    proc = launch(ranks, ["-m", "harness.train", *RUN, *overrides], env, cwd, **kwargs)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def adapters(run_dir: Path) -> dict[str, np.ndarray]:
    state = json.loads((run_dir / "state.json").read_text())
    return {k: np.array(v) for k, v in mx.load(str(run_dir / state["latest"] / "adapters.safetensors")).items()}


def assert_same_adapters(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-4, atol=1e-5, err_msg=name)


def val_losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["val/loss"]) for r in read_metrics(run_dir) if "val/loss" in r]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, hermetic_env):
    """The reference: the whole run in one process, no launcher."""
    root = tmp_path_factory.mktemp("one_process")
    train(1, [f"hydra.run.dir={root / 'run'}"], hermetic_env, root)
    return root / "run"


@pytest.mark.slow
def test_two_ranks_train_the_same_adapters_as_one_process(one_process, tmp_path, hermetic_env):
    # MLX's own launcher, unchanged command line; Hydra names the run directory (a timestamp per process).
    proc = train(2, [f"paths.outputs={tmp_path}/outputs"], hermetic_env, tmp_path, plain_mlx=True)
    run_dirs = [p.parent for p in (tmp_path / "outputs").rglob(".hydra")]
    assert len(run_dirs) == 1, f"one run directory expected, got {run_dirs}"
    run_dir = run_dirs[0]
    assert_same_adapters(adapters(run_dir), adapters(one_process))
    reference = val_losses(one_process)
    assert [s for s, _ in val_losses(run_dir)] == [s for s, _ in reference] == [0, 3, 6]
    np.testing.assert_allclose([v for _, v in val_losses(run_dir)], [v for _, v in reference], rtol=1e-6)
    steps = [r["step"] for r in read_metrics(run_dir) if "train/loss" in r]
    assert steps == [2, 4, 6], "rank 1 must not write metrics"
    assert proc.stderr.count("run dir") == 1, "only rank 0 prints the summary"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("first", "then"),
    # 2 ranks with the layer-wise checkpointed step, then 1 process; 1 process, then train starts its 2 ranks.
    [((2, ["trainer.gradient_checkpointing=true"]), (1, [])), ((1, []), (1, ["distributed=ring"]))],
    ids=["2-ranks-then-1", "1-then-2-ranks"],
)
def test_a_run_resumes_on_another_number_of_ranks(first, then, one_process, tmp_path, hermetic_env):
    run_dir = tmp_path / "run"
    train(first[0], [*first[1], f"hydra.run.dir={run_dir}", "trainer.stop_after_steps=3"], hermetic_env, tmp_path)
    assert json.loads((run_dir / "state.json").read_text())["step"] == 3
    overrides = [*then[1], f"paths.outputs={tmp_path}/outputs", f"resume={run_dir}"]
    proc = train(then[0], overrides, hermetic_env, tmp_path)
    assert f"resuming {run_dir} at step 3" in proc.stderr
    state = json.loads((run_dir / "state.json").read_text())
    assert state["step"] == 6 and state["finished"]
    assert_same_adapters(adapters(run_dir), adapters(one_process))
    np.testing.assert_allclose(val_losses(run_dir)[-1][1], val_losses(one_process)[-1][1], rtol=1e-6)


@pytest.mark.slow
def test_a_sweep_trial_runs_on_two_ranks_and_reports_its_loss_to_optuna(tmp_path, hermetic_env):
    import optuna

    proc = launch(1, ["-m", "harness.train", "-m", "hparams_search=tiny_optuna", *RUN, "distributed=ring",
                      "hydra.sweeper.n_trials=1", f"paths.multirun={tmp_path}/multirun",
                      f"hydra.sweep.dir={tmp_path}/multirun/sweep"], hermetic_env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-6000:]
    study = optuna.load_study(study_name="tiny_dolly", storage=f"sqlite:///{tmp_path}/multirun/optuna.db")
    (trial,) = study.trials
    assert trial.state == optuna.trial.TrialState.COMPLETE
    job = tmp_path / "multirun/sweep/0"
    summary = next(r for r in read_metrics(job) if r.get("summary"))
    assert trial.value == pytest.approx(summary["best_val_loss"])
    assert json.loads((job / "job.json").read_text())["study"] == "tiny_dolly"  # rank 0 knew its sweep
    assert "launch -n 2" in proc.stderr


FAILING_RANK = """
import os, sys
import harness.distributed as distributed

if os.environ.get("MLX_RANK") == "1":  # rank 1 raises on its fourth batch share (the third training step)
    shares, original = [], distributed.Ranks.rows

    def rows(self, batch):
        shares.append(1)
        if len(shares) == 4:
            raise RuntimeError("injected failure on rank 1")
        return original(self, batch)

    distributed.Ranks.rows = rows
from harness.train import main

sys.argv = ["train.py", *sys.argv[1:]]
main()
"""


@pytest.mark.slow
def test_a_rank_that_raises_stops_every_rank_and_the_job_fails(tmp_path, hermetic_env):
    script = tmp_path / "failing_rank.py"
    script.write_text(FAILING_RANK)
    start = time.monotonic()
    proc = launch(2, [str(script), *RUN, f"hydra.run.dir={tmp_path / 'run'}"], hermetic_env, tmp_path, timeout=180)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    assert "injected failure on rank 1" in output
    assert "[rank 0] rank 1 of 2 failed" in output, "rank 0 must stop with a message naming rank 1"
    assert time.monotonic() - start < 180
    assert json.loads((tmp_path / "run/state.json").read_text())["step"] == 0  # nothing past the failure


DYING_RANK = """
import os, time
import mlx.core as mx
from harness.distributed import world

ranks = world()
if ranks.rank == 1:
    os._exit(7)  # dies without a word: rank 0 waits in the collective below until the launcher stops it
mx.eval(ranks.sum_arrays([mx.ones(4)]))
time.sleep(60)
"""


@pytest.mark.slow
def test_a_rank_that_dies_ends_the_job_with_a_failure_status(tmp_path, hermetic_env):
    script = tmp_path / "dying_rank.py"
    script.write_text(DYING_RANK)
    start = time.monotonic()
    proc = launch(2, [str(script)], hermetic_env, tmp_path, timeout=60)
    # Non-zero: 7 when the launcher saw rank 1 end first, else rank 0's own error (its peer's socket closed).
    assert proc.returncode != 0, proc.stderr[-3000:]
    assert "Node with rank 1 exited with code 7" in proc.stderr
    assert time.monotonic() - start < 40
