"""Start a command on several ranks with MLX's launcher, and exit non-zero when a rank fails.

    python -m harness.launch -n 2 --backend ring -- -m harness.train debug=fast     # two local CPU processes
    python -m harness.launch -n 2 --backend nccl -- -m harness.train model=...     # two GPUs of one host
    python -m harness.launch --backend ring --hosts 10.0.0.1,10.0.0.2 -- -m harness.train ...   # two Macs

The options are `mlx.launch`'s (`python -m harness.launch --help`), with two differences: the ranks run this
Python interpreter unless `--python` says otherwise, and the exit status is that of the first rank that
failed. `mlx.launch` (MLX 0.32) stops the other ranks when one exits non-zero but itself exits 0, which would
hide a failed run from a shell script, Slurm or a sweep.
"""

from __future__ import annotations

import sys

from mlx._distributed_utils import launch as mlx_launch


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


def main(argv: list[str] | None = None) -> int:
    argv = _with_python(list(sys.argv[1:] if argv is None else argv))
    statuses: list[tuple[int | None, bool]] = []
    process_class = getattr(mlx_launch, "RemoteProcess", None)
    if process_class is not None:

        class RecordedProcess(process_class):
            """MLX's rank process, recording the exit status the launcher reads at the end."""

            @property
            def exit_status(self):
                status = super().exit_status
                statuses.append(status)
                return status

        mlx_launch.RemoteProcess = RecordedProcess
    else:  # another MLX version: launch anyway, without the exit status
        print("harness.launch: cannot read the ranks' exit status from this MLX version", file=sys.stderr)
    saved_argv = sys.argv
    sys.argv = ["mlx.launch", *argv]
    try:
        mlx_launch.main()
    finally:
        sys.argv = saved_argv
        if process_class is not None:
            mlx_launch.RemoteProcess = process_class
    return job_status(statuses)


if __name__ == "__main__":
    sys.exit(main())
