"""How a training command ends: SIGINT/SIGTERM stop cleanly with a checkpoint and a resume hint, a diverged
run exits non-zero, and what the data pipeline dropped or lacked is said at the end."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.run_state import RunStateError, checkpoint_dir, read_state
from harness.tracking import read_metrics
from harness.train import train
from models.tokenizer import default_tokenizer_path
from tests.harness.conftest import FAST, REPO, run_cli

LONG_RUN = [
    *FAST, "model=tiny", "logger=none", "trainer.max_steps=400", "trainer.log_every=1", "trainer.eval_every=0",
    "trainer.num_sample_prompts=0",
]


def logged_a_step(run_dir: Path) -> bool:
    metrics = run_dir / "metrics.jsonl"
    return metrics.exists() and any("train/loss" in json.loads(line) for line in metrics.read_text().splitlines())


def stop_a_run(tmp_path: Path, env: dict, signum: int) -> tuple[subprocess.CompletedProcess, Path]:
    """Start a long run, send `signum` at a random moment after its first logged step, wait for it to end."""
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "harness.train", *LONG_RUN, f"hydra.run.dir={run_dir}"],
        cwd=tmp_path, env={**os.environ, **env, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not logged_a_step(run_dir):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the run logged no step"
            time.sleep(0.1)
        time.sleep(random.uniform(0, 0.5))
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), run_dir


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_run_with_a_checkpoint_and_a_resume_hint(tmp_path, hermetic_env, signum):
    proc, run_dir = stop_a_run(tmp_path, hermetic_env, signum)
    assert proc.returncode == 128 + signum, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    state = read_state(run_dir)
    assert 1 <= state.step < 400 and not state.finished
    assert (run_dir / state.latest).name == f"step-{state.step:06d}"
    assert (run_dir / state.latest / "adapters.safetensors").is_file()
    logged = [r["step"] for r in read_metrics(run_dir) if "step" in r]
    assert max(logged) == state.step, "every step trained was checkpointed"
    assert f"stopped at step {state.step}" in proc.stderr
    assert f"python -m harness.train resume={run_dir}" in proc.stderr
    if signum == signal.SIGTERM:  # and the hint works: the run continues from there
        run_cli(
            "harness.train", *LONG_RUN, f"resume={run_dir}", f"trainer.max_steps={state.step + 2}",
            env=hermetic_env, cwd=tmp_path,
        )
        resumed = read_state(run_dir)
        assert resumed.finished and resumed.step == state.step + 2


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal")
def test_closing_the_terminal_stops_the_run_with_a_checkpoint(tmp_path, hermetic_env):
    """The run's terminal goes away (an ssh session drops): SIGHUP, then writes to the terminal fail; the run
    still ends with a checkpoint, the resume hint in train.log and status 129."""
    import fcntl
    import termios

    run_dir = tmp_path / "run"
    master, terminal = os.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "harness.train", *LONG_RUN, "trainer.progress=true", f"hydra.run.dir={run_dir}"],
        stdin=terminal, stdout=terminal, stderr=terminal, cwd=tmp_path, start_new_session=True,
        preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),  # the terminal controls the run's session
        env={**os.environ, **hermetic_env, "PYTHONPATH": str(REPO)},
    )
    os.close(terminal)
    os.set_blocking(master, False)
    try:
        deadline = time.monotonic() + 240
        while not logged_a_step(run_dir):
            try:
                while os.read(master, 1 << 16):  # what a terminal would show
                    pass
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended or logged no step"
            time.sleep(0.1)
        os.close(master)  # the terminal is gone: the kernel sends SIGHUP to the session
        returncode = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert returncode == 128 + signal.SIGHUP
    state = read_state(run_dir)
    assert 1 <= state.step < 400 and (run_dir / state.latest / "adapters.safetensors").is_file()
    log = (run_dir / "train.log").read_text()
    assert f"SIGHUP: stopped at step {state.step}" in log and f"resume={run_dir}" in log


@pytest.fixture(scope="module")
def diverged_run(tmp_path_factory, hermetic_env) -> tuple[subprocess.CompletedProcess, Path]:
    root = tmp_path_factory.mktemp("diverged")
    proc = run_cli(
        "harness.train", *FAST, "model=tiny", "logger=none", "optim.lr=1e30", "optim.grad_clip=0",
        "trainer.num_sample_prompts=0", f"hydra.run.dir={root}/run",
        env=hermetic_env, cwd=root, check=False,
    )
    return proc, root / "run"


@pytest.mark.slow
def test_a_diverged_single_run_exits_non_zero(diverged_run):
    proc, run_dir = diverged_run
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "diverged" in proc.stderr.splitlines()[-1] and "Traceback" not in proc.stderr
    assert read_state(run_dir).diverged


@pytest.mark.slow
def test_resuming_a_diverged_run_says_it_diverged(diverged_run, tmp_path, hermetic_env):
    """Not "the file is damaged": the NaN in its checkpoint is what the diverged step left."""
    run_dir = tmp_path / "run"
    shutil.copytree(diverged_run[1], run_dir)
    state_before = (run_dir / "state.json").read_bytes()
    proc = run_cli("harness.train", f"resume={run_dir}", env=hermetic_env, cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {run_dir}: the run diverged at step {read_state(run_dir).step}"), last
    assert (run_dir / "state.json").read_bytes() == state_before


def test_an_empty_validation_split_is_warned_about(compose_train, tmp_path, capfd):
    train(
        compose_train(*FAST, "model=tiny", "logger=none", "data.val_fraction=0", "trainer.max_steps=2",
                      "trainer.num_sample_prompts=0"),
        run_dir=tmp_path / "run",
    )
    assert "warning: the validation split is empty" in capfd.readouterr().err
    with pytest.raises(RunStateError, match="no 'best' checkpoint .*: use adapters=latest"):
        checkpoint_dir(tmp_path / "run", "best")  # what generate and export are told
    assert checkpoint_dir(tmp_path / "run", "latest").name == "step-000002"


def test_skipped_records_are_counted_at_the_end_of_training(compose_train, tmp_path, capfd):
    from harness.data import load_records

    good = [json.dumps(r) for r in load_records("embedded:dolly_sample").records[:80]]
    source = tmp_path / "data.jsonl"
    source.write_bytes(
        "\n".join([*good[:40], "{not json", '{"instruction": 3}', *good[40:]]).encode() + b"\n\xe9t\xe9\n"
    )
    train(
        compose_train(*FAST, "model=tiny", "logger=none", f"data.source={source}", "data.invalid_records=skip",
                      "data.max_records=null", "trainer.max_steps=2", "trainer.num_sample_prompts=0"),
        run_dir=tmp_path / "run",
    )
    err = capfd.readouterr().err
    line = next(line for line in err.splitlines() if line.startswith("invalid records skipped"))
    assert "skipped: 3 " in line and str(source) in line


@pytest.mark.slow
def test_prepare_names_an_undecodable_line_skips_it_on_request_and_rebuilds_a_damaged_cache(tmp_path, hermetic_env):
    from harness.data import load_records

    records = load_records("embedded:dolly_sample").records[:120]
    lines = [json.dumps(r, ensure_ascii=False).encode() for r in records]
    lines[6] = json.dumps({**records[6], "response": "Café"}, ensure_ascii=False).encode("latin-1")
    source = tmp_path / "latin1.jsonl"
    source.write_bytes(b"\xef\xbb\xbf" + b"\n".join(lines) + b"\n")  # a BOM too: accepted
    env = {**hermetic_env, "QLORA_CACHE_DIR": str(tmp_path / "cache")}
    common = ["model=tiny", f"data.source={source}", "data.max_seq_len=128"]
    proc = run_cli("harness.prepare", *common, env=env, cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {source}, line 7: not UTF-8 text")

    proc = run_cli("harness.prepare", *common, "data.invalid_records=skip", env=env, cwd=tmp_path)
    assert "invalid records skipped: 1 " in proc.stdout and f"{source}, line 7" in proc.stdout
    (entry,) = (tmp_path / "cache").rglob("stats.json")
    (entry.parent / "train.npz").write_bytes(b"PK\x03\x04 not a zip any more")
    proc = run_cli("harness.prepare", *common, "data.invalid_records=skip", env=env, cwd=tmp_path)
    assert f"damaged cache entry, tokenizing again: {entry.parent / 'train.npz'}" in proc.stderr
    assert "(written)" in proc.stdout
    proc = run_cli("harness.prepare", *common, "data.invalid_records=skip", env=env, cwd=tmp_path)
    assert "(reused)" in proc.stdout and "damaged" not in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    "config, message",
    [
        ({"model_type": "qwen2"}, "model_type='qwen2' is not supported"),  # a model this project cannot build
        ("{not json", "invalid JSON at line 1"),  # a damaged checkpoint
    ],
)
def test_a_checkpoint_it_cannot_load_is_one_line_naming_its_config(tmp_path, hermetic_env, config, message):
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    config_path = checkpoint / "config.json"
    config_path.write_text(config if isinstance(config, str) else json.dumps(config))
    shutil.copyfile(default_tokenizer_path(), checkpoint / "tokenizer.model")  # the tokenizer is checked first
    proc = run_cli(
        "harness.train", *FAST, f"model.path={checkpoint}", "logger=none", f"hydra.run.dir={tmp_path / 'run'}",
        env=hermetic_env, cwd=tmp_path, check=False,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {config_path}"), proc.stderr[-1000:]
    assert message in proc.stderr


@pytest.mark.slow
def test_a_model_file_not_fetched_yet_is_one_line(tmp_path, hermetic_env):
    """The default model before `scripts/setup.sh`: what to run, not a traceback."""
    missing = tmp_path / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    proc = run_cli(
        "harness.train", "model=smollm2-135m", f"model.path={missing}", "logger=none", "trainer.max_steps=1",
        f"hydra.run.dir={tmp_path / 'run'}", env=hermetic_env, cwd=tmp_path, check=False,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: model.path={missing}: not there yet") and "harness.download" in last, last


def run_with_file_size_limit(limit: int, args: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    """`python <args>` unable to write a file past `limit` bytes: its writes fail as on a full disk (EFBIG for
    ENOSPC; Python ignores SIGXFSZ), which a test cannot otherwise arrange without root."""
    import resource

    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env={**os.environ, **env, "PYTHONPATH": str(REPO)},
        capture_output=True, text=True, timeout=300,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)),
    )


@pytest.mark.slow
def test_a_full_disk_during_a_checkpoint_names_the_file_and_leaves_no_partial_checkpoint(tmp_path, hermetic_env):
    run_dir = tmp_path / "run"
    proc = run_with_file_size_limit(  # room for the adapters of the tiny model, not for its optimizer state
        100_000,
        ["-m", "harness.train", *FAST, "model=tiny", "logger=none", "data.max_records=100",
         "trainer.num_sample_prompts=0", f"hydra.run.dir={run_dir}"],
        {**hermetic_env, "QLORA_CACHE_DIR": str(tmp_path / "cache")}, tmp_path,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {run_dir}/checkpoints/.step-000000.tmp/optimizer.safetensors: cannot write"), last
    assert list((run_dir / "checkpoints").iterdir()) == [], "the partial checkpoint's space is given back"
    assert not (run_dir / "state.json").exists()


@pytest.mark.slow
def test_a_full_disk_while_caching_tokenized_data_names_the_cache(tmp_path, hermetic_env):
    cache = tmp_path / "cache"
    proc = run_with_file_size_limit(
        8_000, ["-m", "harness.prepare", "model=tiny", "data.max_records=100"],
        {**hermetic_env, "QLORA_CACHE_DIR": str(cache)}, tmp_path,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {cache}/data/tokenized/.") and "cannot write" in last, last
    assert list((cache / "data" / "tokenized").iterdir()) == [], "no partial cache entry is left"


FULL_METRICS_LOG = """
import resource, sys
from pathlib import Path
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
from harness.tracking import Tracker
from models.atomic_files import DiskWriteError
tracker = Tracker(Path(sys.argv[1]), wandb=None, config={})
try:
    for step in range(1000):
        tracker.log({"train/loss": 1.0, "padding": "x" * 100}, step=step)
except DiskWriteError as err:
    print(err)
try:
    tracker.finish()
except DiskWriteError as err:
    print(err)
"""


def test_a_full_disk_while_logging_names_metrics_jsonl(tmp_path):
    """Python's own message for a failed write ("[Errno 28] No space left on device") names no file."""
    proc = subprocess.run(
        [sys.executable, "-c", FULL_METRICS_LOG, str(tmp_path)], capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 2 and all(line.startswith(f"{tmp_path / 'metrics.jsonl'}: cannot write") for line in lines)
