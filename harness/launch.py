"""Start a command on several ranks with MLX's launcher, and exit non-zero when a rank fails.

    python -m harness.launch -n 2 --backend ring -- -m harness.train debug=fast     # two local CPU processes
    python -m harness.launch -n 2 --backend nccl -- -m harness.train model=...     # two GPUs of one host
    python -m harness.launch --backend ring --hosts 10.0.0.1,10.0.0.2 -- -m harness.train ...   # two Macs

The options are `mlx.launch`'s (`python -m harness.launch --help`), with two differences: the ranks run this
Python interpreter unless `--python` says otherwise, and the exit status is that of the first rank that
failed. `mlx.launch` (MLX 0.32) stops the other ranks when one exits non-zero but itself exits 0, which would
hide a failed run from a shell script, Slurm or a sweep.

`train_on_ranks` is how `python -m harness.train distributed=gpus` (`distributed.ranks_per_host` > 1) starts
itself on several ranks: each rank runs `harness.train_rank` on the composed config, and the job's result
comes back to the caller (a sweep's trial, too).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from mlx._distributed_utils import launch as mlx_launch

# The Hydra job (overrides, sweep study) of a run started on several ranks, for its rank 0 to record.
JOB_ENV = "QLORA_HYDRA_JOB"
RANKS_CONFIG_FILE = "ranks_config.yaml"  # the composed config every rank trains with


def _with_python(argv: list[str]) -> list[str]:
    if any(arg == "--python" or arg.startswith("--python=") for arg in argv):
        return argv
    return ["--python", sys.executable, *argv]


def job_status(statuses: list[tuple[int | None, bool]]) -> int:
    """The launcher's exit status from its ranks' `(returncode, killed by the launcher)`: the first failed
    rank's code (1 when that is not a valid exit status), 1 when a rank was killed, else 0."""
    failed = [code for code, killed in statuses if code and not killed]
    if failed:
        return failed[0] if 0 < failed[0] < 256 else 1
    return 1 if any(killed or code for code, killed in statuses) else 0


def quiet_stdin() -> None:
    """Give the launcher a stdin that never has input unless it is a terminal. The launcher forwards its stdin
    to the ranks, polling it in a loop: at the end of a file (`< /dev/null`, a test, a batch job) the poll
    returns at once, every time, and the loop took a core's worth of time slices from the ranks."""
    try:
        if os.isatty(0):
            return
    except OSError:
        pass
    read_end, write_end = os.pipe()  # the write end stays open (never written): reads would wait, not end
    os.dup2(read_end, 0)
    os.close(read_end)
    _KEEP_OPEN.append(write_end)


_KEEP_OPEN: list[int] = []


def main(argv: list[str] | None = None) -> int:
    argv = _with_python(list(sys.argv[1:] if argv is None else argv))
    statuses: list[tuple[int | None, bool]] = []
    process_class = getattr(mlx_launch, "RemoteProcess", None)
    if process_class is not None:

        class RecordedProcess(process_class):
            """MLX's rank process, recording the exit status the launcher reads at the end.

            Its stdin is replaced by a pipe's read end: the launcher's output thread waits in `select` for the
            rank's stdin to be writable, and a real pipe always is, so each thread spun on a core for the whole
            run (ranks read no input here). A read end is never writable: the threads sleep until output comes."""

            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                stdin = getattr(self.process, "stdin", None)
                if stdin is not None:
                    read_end, write_end = os.pipe()
                    os.close(write_end)
                    stdin.close()
                    self.process.stdin = os.fdopen(read_end, "wb", buffering=0)

            @property
            def exit_status(self):
                status = super().exit_status
                statuses.append(status)
                return status

        mlx_launch.RemoteProcess = RecordedProcess
    else:  # another MLX version: launch anyway, without the exit status
        print("harness.launch: cannot read the ranks' exit status from this MLX version", file=sys.stderr)
    quiet_stdin()
    saved_argv = sys.argv
    sys.argv = ["mlx.launch", *argv]
    try:
        mlx_launch.main()
    finally:
        sys.argv = saved_argv
        if process_class is not None:
            mlx_launch.RemoteProcess = process_class
    return job_status(statuses)


def free_port(count: int = 1) -> int:
    """A port on 127.0.0.1 with `count - 1` free ports after it (the ring backend listens on one per rank)."""
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        held: list[socket.socket] = []
        try:
            for port in range(base, base + count):
                held.append(socket.socket())
                held[-1].bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
    raise RuntimeError("no free ports on 127.0.0.1")


def launcher_options(distributed_cfg) -> list[str]:
    """`mlx.launch` options for a `DistributedConfig`; on this host alone, free ports (several runs at once,
    e.g. a sweep's parallel trials, must not meet on MLX's default port)."""
    options = ["-n", str(distributed_cfg.ranks_per_host), "--backend", str(distributed_cfg.backend)]
    extra = [str(a) for a in distributed_cfg.launcher_args]
    if distributed_cfg.hosts:
        options += ["--hosts", str(distributed_cfg.hosts)]
    elif not any(a.startswith(("--starting-port", "-p", "--nccl-port", "--hostfile")) for a in extra):
        port = free_port(distributed_cfg.ranks_per_host)
        options += ["--nccl-port", str(port)] if distributed_cfg.backend == "nccl" else ["--starting-port", str(port)]
    return options + extra


def starts_ranks(cfg) -> bool:
    """Whether `harness.train` should start `cfg`'s run on several ranks: its `distributed` config asks for
    more than one, and this process is not already a rank that a launcher started."""
    from harness.distributed import launched_rank

    spread = cfg.get("distributed")
    if spread is None or launched_rank() is not None:
        return False
    hosts = len(str(spread.hosts).split(",")) if spread.hosts else 1
    return spread.ranks_per_host * hosts > 1


def train_on_ranks(cfg, run_dir: Path, job: dict) -> float:
    """Train `cfg` on the ranks `cfg.distributed` asks for, with `run_dir` as the run directory; returns the
    run's best validation loss (what `harness.train.train` returns). Raises when the job fails. `job`: the Hydra
    job (`harness.train.hydra_job_info`), passed on to the ranks."""
    from omegaconf import OmegaConf

    from harness.resume import resume_target
    from harness.tracking import read_metrics

    results_dir = resume_target(cfg.resume, run_dir) or run_dir  # a resumed run goes on in its own directory
    run_dir.mkdir(parents=True, exist_ok=True)
    config_file = run_dir / RANKS_CONFIG_FILE
    OmegaConf.save(cfg, config_file, resolve=True)
    command = [sys.executable, "-m", "harness.launch", *launcher_options(cfg.distributed), "--",
               "-m", "harness.train_rank", str(config_file.resolve()), str(run_dir.resolve())]
    print(f"starting the run on several ranks: {' '.join(command)}", file=sys.stderr, flush=True)
    status = subprocess.run(command, env={**os.environ, JOB_ENV: json.dumps(job)}).returncode
    if status != 0:
        raise RuntimeError(f"the run in {run_dir} failed on its ranks (exit status {status}; their output is above)")
    summaries = [r for r in read_metrics(results_dir) if r.get("summary")]
    if not summaries:
        raise RuntimeError(f"{results_dir}: the ranks finished without a summary in metrics.jsonl")
    return float(summaries[-1]["best_val_loss"])


if __name__ == "__main__":
    sys.exit(main())
