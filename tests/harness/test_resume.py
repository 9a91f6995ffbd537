"""Resume continues a run as it was configured, and never damages a run directory it refuses.

One short run is stopped after 3 of its 8 steps (`trainer.max_steps=8`, not the debug preset's 6, so a resume
that composed today's defaults would show). Each test works on a copy; a refused resume must leave every file
of the copy as it was (the lock file aside, and train.log, which only grows).
"""

import hashlib
import json
import shutil
import stat
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import yaml

from harness.config_checks import ConfigError
from harness.run_state import RunStateError, checkpoint_dir, read_state
from harness.resume import ResumeError
from harness.tracking import read_metrics
from harness.train import train
from models.atomic_files import process_umask
from tests.harness.conftest import FAST, run_cli

ORIGINAL = [*FAST, "model=tiny", "logger=none", "trainer.max_steps=8", "trainer.num_sample_prompts=0"]


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, hermetic_env):
    """A run directory stopped (cleanly) at step 3 of 8 through the command line."""
    root = tmp_path_factory.mktemp("stopped")
    run_cli(
        "harness.train", *ORIGINAL, "trainer.stop_after_steps=3", f"hydra.run.dir={root}/run",
        env=hermetic_env, cwd=root,
    )
    assert read_state(root / "run").step == 3
    return root / "run"


@pytest.fixture
def run_copy(stopped_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(stopped_run, copy)
    return copy


def snapshot(run_dir: Path) -> dict[str, str]:
    """sha256 of every file of a run directory except the lock and the log."""
    return {
        str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and p.name not in (".lock", "train.log")
    }


def resume_cli(run_dir: Path, *overrides: str, env: dict, check: bool = False):
    return run_cli(
        "harness.train", *ORIGINAL, f"resume={run_dir}", *overrides,
        env=env, cwd=run_dir.parent, check=check,
    )


def assert_refused(proc, run_dir: Path, before: dict, *names: str):
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    for name in names:
        assert name in proc.stderr, (name, proc.stderr[-2000:])
    assert snapshot(run_dir) == before, "a refused resume must not change the run directory"


@pytest.mark.slow
def test_resume_keeps_the_runs_own_config_and_writes_no_new_hydra_dir(run_copy, hermetic_env):
    saved = yaml.safe_load((run_copy / "run_config.yaml").read_text())
    log_before = (run_copy / "train.log").read_text()
    # Today's defaults differ from the run (debug=fast alone would stop at 6): the command gives no max_steps.
    proc = run_cli(
        "harness.train", *FAST, "model=tiny", "logger=none", "trainer.num_sample_prompts=0", f"resume={run_copy}",
        env=hermetic_env, cwd=run_copy.parent,
    )
    state = read_state(run_copy)
    assert state.finished and state.step == 8
    assert [r["step"] for r in read_metrics(run_copy) if "val/loss" in r] == [0, 3, 6, 8]
    after = yaml.safe_load((run_copy / "run_config.yaml").read_text())
    assert after["trainer"]["max_steps"] == saved["trainer"]["max_steps"] == 8
    assert after["lora"] == saved["lora"] and after["optim"] == saved["optim"]
    assert not (run_copy.parent / "outputs").exists(), "a resume must not leave a new Hydra job directory"
    log = (run_copy / "train.log").read_text()
    assert log.startswith(log_before) and "resuming" in log and "finished" in log
    assert "resuming" in proc.stderr


@pytest.mark.slow
def test_resume_extends_a_run_with_max_steps_and_refuses_other_changes(run_copy, hermetic_env):
    before = snapshot(run_copy)
    proc = resume_cli(run_copy, "lora.rank=4", env=hermetic_env)
    assert_refused(proc, run_copy, before, "lora.rank=4", "run_config.yaml", "trainer.max_steps")
    proc = resume_cli(run_copy, "optim.lr=1e-2", "trainer.eval_every=1", env=hermetic_env)
    assert_refused(proc, run_copy, before, "optim.lr", "trainer.eval_every")
    proc = resume_cli(run_copy, "trainer.max_steps=2", env=hermetic_env)
    assert_refused(proc, run_copy, before, "trainer.max_steps=2", "step 3")

    resume_cli(run_copy, "trainer.max_steps=10", env=hermetic_env, check=True)
    state = read_state(run_copy)
    assert state.finished and state.step == 10
    assert yaml.safe_load((run_copy / "run_config.yaml").read_text())["trainer"]["max_steps"] == 10


@pytest.mark.slow
def test_run_dir_without_state_json_is_refused_and_kept(run_copy, hermetic_env):
    (run_copy / "state.json").unlink()
    before = snapshot(run_copy)
    proc = resume_cli(run_copy, env=hermetic_env)
    assert_refused(proc, run_copy, before, str(run_copy / "state.json"), "step-000003")


@pytest.mark.slow
def test_a_new_run_into_a_run_directory_is_refused(run_copy, hermetic_env):
    before = snapshot(run_copy)
    proc = run_cli(
        "harness.train", *ORIGINAL, f"hydra.run.dir={run_copy}", env=hermetic_env, cwd=run_copy.parent, check=False
    )
    assert_refused(proc, run_copy, before, "already holds a training run", f"resume={run_copy}")


@pytest.mark.slow
@pytest.mark.parametrize("target", ["typo", "foreign"])
def test_resume_of_a_directory_that_holds_no_run_is_refused(tmp_path, hermetic_env, target):
    """A mistyped run directory, or a folder of something else: refused, not a new run started there."""
    run_dir = tmp_path / "outputs" / "2026-11-26" / "10-00-00-12345"  # one digit short of a real one
    if target == "foreign":
        run_dir = tmp_path / "my_notes"
        run_dir.mkdir()
        (run_dir / "notes.txt").write_text("mine\n")
    proc = run_cli("harness.train", *ORIGINAL, f"resume={run_dir}", env=hermetic_env, cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: resume={run_dir}: not a training run directory")
    for name in ("run_config.yaml", "state.json", "checkpoints", "metrics.jsonl", ".lock"):
        assert not (run_dir / name).exists(), name


@pytest.mark.slow
def test_resume_on_a_data_file_that_changed_is_refused(tmp_path, compose_train, hermetic_env):
    """The data position (`batch_in_epoch`) means nothing in other data: same path, other content, refused."""
    from harness.data import load_records

    records = load_records("embedded:dolly_sample").records[:120]
    source = tmp_path / "data.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in records))
    run_dir = tmp_path / "run"
    overrides = [*ORIGINAL, f"data.source={source}", "data.max_records=null"]
    train(compose_train(*overrides, "trainer.stop_after_steps=2"), run_dir=run_dir)
    source.write_text("".join(json.dumps(r) + "\n" for r in records[::-1]))  # the same records, another order
    before = snapshot(run_dir)
    proc = run_cli("harness.train", *overrides, f"resume={run_dir}", env=hermetic_env, cwd=tmp_path, check=False)
    assert_refused(proc, run_dir, before, f"{source}: the data changed since the run started")


@pytest.mark.slow
def test_a_second_writer_is_locked_out(run_copy, hermetic_env):
    import fcntl

    before = snapshot(run_copy)
    with open(run_copy / ".lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running training process holds it
        proc = resume_cli(run_copy, env=hermetic_env)
    assert_refused(proc, run_copy, before, "another process", ".lock")


def _nan_bytes(path: Path, key: str):
    """Overwrite the data of tensor `key` in a safetensors file with NaN (the header stays valid)."""
    raw = bytearray(path.read_bytes())
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_len])
    start, end = header[key]["data_offsets"]
    nan = np.full((end - start) // 4, np.nan, dtype=np.float32).tobytes()
    raw[8 + header_len + start : 8 + header_len + end] = nan
    path.write_bytes(bytes(raw))


def corrupt_adapters_nan(ckpt: Path):
    path = ckpt / "adapters.safetensors"
    _nan_bytes(path, sorted(mx.load(str(path)))[0])
    return "adapters.safetensors", "NaN"


def corrupt_optimizer_nan(ckpt: Path):
    path = ckpt / "optimizer.safetensors"
    _nan_bytes(path, next(k for k in sorted(mx.load(str(path))) if k.endswith(".v")))
    return "optimizer.safetensors", "NaN"


def corrupt_adapters_rank(ckpt: Path):
    path = ckpt / "adapters.safetensors"
    arrays = {k: v[:4] if k.endswith("lora_A") else v[:, :4] for k, v in mx.load(str(path)).items()}
    mx.save_safetensors(str(path), arrays)
    return "adapters.safetensors", "shape"


def corrupt_state_truncated(ckpt: Path):
    path = ckpt.parent.parent / "state.json"
    path.write_bytes(path.read_bytes()[:120])
    return "state.json", "not a valid training state"


def corrupt_state_binary(ckpt: Path):
    (ckpt.parent.parent / "state.json").write_bytes(bytes(range(256)) * 4)
    return "state.json", "UTF-8"


def corrupt_state_types(ckpt: Path):
    path = ckpt.parent.parent / "state.json"
    state = json.loads(path.read_text())
    state["step"] = "three"
    path.write_text(json.dumps(state))
    return "state.json", "'step'"


def corrupt_adapter_config_binary(ckpt: Path):
    (ckpt / "adapter_config.json").write_bytes(b"\xff\xfe\x00garbage\x81")
    return "adapter_config.json", "UTF-8"


def corrupt_run_config_binary(ckpt: Path):
    (ckpt.parent.parent / "run_config.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    return "run_config.yaml", "UTF-8"


def corrupt_optimizer_missing(ckpt: Path):
    (ckpt / "optimizer.safetensors").unlink()
    return "optimizer.safetensors", "missing"


def corrupt_optimizer_truncated(ckpt: Path):
    path = ckpt / "optimizer.safetensors"
    path.write_bytes(path.read_bytes()[:5000])
    return "optimizer.safetensors", "corrupt"


def corrupt_run_config_missing(ckpt: Path):
    (ckpt.parent.parent / "run_config.yaml").unlink()  # today's defaults must not stand in for it
    return "run_config.yaml", "missing"


def corrupt_run_config_value(ckpt: Path):
    path = ckpt.parent.parent / "run_config.yaml"
    saved = yaml.safe_load(path.read_text())
    saved["trainer"]["batch_size"] = 0
    path.write_text(yaml.safe_dump(saved))
    return "run_config.yaml", "trainer.batch_size=0: must be an integer >= 1"


def corrupt_run_config_yaml(ckpt: Path):
    (ckpt.parent.parent / "run_config.yaml").write_text("trainer: [1, 2\n")
    return "run_config.yaml", "not a readable config"


@pytest.mark.parametrize(
    "corrupt",
    [
        corrupt_adapters_nan,
        corrupt_optimizer_nan,
        corrupt_adapters_rank,
        corrupt_state_truncated,
        corrupt_state_binary,
        corrupt_state_types,
        corrupt_adapter_config_binary,
        corrupt_run_config_binary,
        corrupt_optimizer_missing,
        corrupt_optimizer_truncated,
        corrupt_run_config_missing,
        corrupt_run_config_value,
        corrupt_run_config_yaml,
    ],
)
def test_damaged_run_directory_is_named_and_left_as_it_was(run_copy, compose_train, corrupt):
    """In-process (the same `train` the command runs; seconds each): one line naming the damaged file."""
    file_name, what = corrupt(run_copy / "checkpoints" / "step-000003")
    before = snapshot(run_copy)
    with pytest.raises((RunStateError, ResumeError, ConfigError)) as error:
        train(compose_train(*ORIGINAL, f"resume={run_copy}"), run_dir=run_copy.parent / "job")
    message = str(error.value)
    assert file_name in message and what in message and len(message.splitlines()) == 1, message
    assert snapshot(run_copy) == before


@pytest.mark.slow
def test_resuming_a_finished_run_changes_nothing(run_copy, compose_train, hermetic_env):
    train(compose_train(*ORIGINAL, f"resume={run_copy}"), run_dir=run_copy)  # the run to its end (step 8)
    assert read_state(run_copy).finished
    before = snapshot(run_copy)
    proc = resume_cli(run_copy, env=hermetic_env, check=True)
    assert "finished at step 8 of 8; nothing to do" in proc.stderr and "trainer.max_steps" in proc.stderr
    assert snapshot(run_copy) == before, "resuming a finished run must not rewrite it"


def test_state_json_with_a_bom_is_read(run_copy):
    """An editor may save state.json with a UTF-8 BOM; it is still the same state."""
    path = run_copy / "state.json"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert read_state(run_copy).step == 3


@pytest.mark.slow
def test_generate_and_export_refuse_adapters_with_nan(run_copy, hermetic_env):
    corrupt_adapters_nan(checkpoint_dir(run_copy, "latest"))
    for module, args in (("harness.generate", ["prompt=Hi", "adapters=latest"]), ("harness.export", ["adapters=latest"])):
        proc = run_cli(module, f"run_dir={run_copy}", *args, env=hermetic_env, cwd=run_copy.parent, check=False)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "adapters.safetensors" in proc.stderr and "NaN" in proc.stderr and "Traceback" not in proc.stderr
    assert not (run_copy / "export").exists()


@pytest.mark.slow
def test_export_checks_its_run_and_its_output_folder_before_loading(run_copy, hermetic_env):
    """A mistyped run directory is not created (with an export/ inside); an output path that cannot be a
    folder is said at once, without the full-disk guess."""
    missing = run_copy.parent / "no_such_run"
    proc = run_cli("harness.export", f"run_dir={missing}", env=hermetic_env, cwd=run_copy.parent, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {missing / 'state.json'}: missing; is {missing}")
    assert not missing.exists()
    taken = run_copy.parent / "export.txt"
    taken.write_text("a file, not a folder\n")
    proc = run_cli(
        "harness.export", f"run_dir={run_copy}", "adapters=latest", f"out_dir={taken}", env=hermetic_env,
        cwd=run_copy.parent, check=False,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == f"error: {taken}: cannot write (File exists)"


@pytest.mark.slow
def test_generate_refuses_a_prompt_longer_than_max_prompt_tokens(run_copy, hermetic_env):
    proc = run_cli(
        "harness.generate", f"run_dir={run_copy}", "adapters=latest", "max_prompt_tokens=64",
        "prompt=" + "word " * 200, env=hermetic_env, cwd=run_copy.parent, check=False,
    )
    assert proc.returncode == 2 and "max_prompt_tokens=64" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_generate_names_a_prompt_that_is_not_utf8(run_copy, hermetic_env):
    """Instructions on stdin are read as UTF-8 (a BOM accepted); a Latin-1 line is named, not a crash."""
    import os
    import subprocess
    import sys

    from tests.harness.conftest import REPO

    def generate(*args: bytes | str, stdin: bytes = b"") -> str:
        proc = subprocess.run(
            [sys.executable, "-m", "harness.generate", f"run_dir={run_copy}", "adapters=latest", *args],
            input=stdin, capture_output=True, cwd=run_copy.parent, timeout=300,
            env={**os.environ, **hermetic_env, "PYTHONPATH": str(REPO)},
        )
        stderr = proc.stderr.decode("utf-8", "replace")
        assert proc.returncode == 2 and "Traceback" not in stderr, stderr[-3000:]
        return stderr.strip().splitlines()[-1]

    last = generate("max_new_tokens=2", stdin=b"\xef\xbb\xbfName a river.\nCaf\xe9 au lait?\n")
    assert last == "error: stdin, line 2: not UTF-8 text (byte 0xe9 at column 4); send UTF-8"
    last = generate(b"prompt='Caf\xe9 au lait?'")  # a Latin-1 terminal's argument (quoted for Hydra)
    assert last == "error: prompt: not UTF-8 text (character 4); pass it as UTF-8"


@pytest.mark.slow
def test_a_log_that_cannot_grow_does_not_bury_the_output(run_copy, hermetic_env):
    """train.log past what the disk takes (a file-size limit stands in for a full disk): the lines still reach
    the terminal, without logging's traceback for each one, and the run goes on."""
    import os
    import resource
    import subprocess
    import sys

    from tests.harness.conftest import REPO

    limit = 400_000  # above every file a resume writes, below the padded log
    with open(run_copy / "train.log", "a", encoding="utf-8") as log:
        log.write("x" * (limit + 1000) + "\n")
    proc = subprocess.run(
        [sys.executable, "-m", "harness.train", *ORIGINAL, f"resume={run_copy}"], cwd=run_copy.parent,
        env={**os.environ, **hermetic_env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming" in proc.stderr and "Logging error" not in proc.stderr, proc.stderr[-3000:]
    assert read_state(run_copy).finished


def test_run_files_follow_the_umask(stopped_run):
    """Files and folders of a run get the process's umask (no private 0600/0700 temporary-file modes)."""
    mask = process_umask()  # the training subprocess inherited it
    for path in stopped_run.rglob("*"):
        expected = (0o777 if path.is_dir() else 0o666) & ~mask
        assert stat.S_IMODE(path.stat().st_mode) == expected, (path, oct(path.stat().st_mode))
