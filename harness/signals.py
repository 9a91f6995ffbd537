"""Stopping a run cleanly on SIGINT (Ctrl-C), SIGTERM (what Slurm and most schedulers send before a kill) and
SIGHUP (the terminal or ssh session that started the run closed).

While training (`armed`), a signal only asks the loop to stop: it finishes the step in progress, writes a
checkpoint and returns; the command then closes W&B, prints how to resume and exits with 128 + the signal's
number. A second signal, or one that arrives before training began, stops at once (`RunInterrupted`): the last
checkpoint stays as it was, since checkpoints are written atomically.
A signal the process was started ignoring (`nohup` ignores SIGHUP) stays ignored. After SIGHUP, output that
went to the closed terminal goes to /dev/null (writing to it would fail); `train.log` still gets every line.
"""

from __future__ import annotations

import os
import signal
import stat
import sys
import threading

# SIGHUP does not exist on Windows.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, *((signal.SIGHUP,) if hasattr(signal, "SIGHUP") else ()))


class RunInterrupted(KeyboardInterrupt):
    """The run stopped on a signal; `message` says what was saved and how to continue."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum
        self.message = message
        self.exit_code = 128 + signum  # the shell's convention for "ended by signal N"


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class StopSignals:
    """Context manager: handlers of the stop signals while training (module docstring). Outside the main thread
    (where Python cannot install handlers) it does nothing and `requested()` stays False."""

    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS) -> None:
        self._signals = signals  # the ones handled here; others keep their default action
        self._armed = self._was_armed = False
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in self._signals:
                if signal.getsignal(signum) is not signal.SIG_IGN:
                    self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    @property
    def armed(self) -> bool:
        """Whether training is under way (a signal then asks for a stop after the step)."""
        return self._armed

    @armed.setter
    def armed(self, value: bool) -> None:
        self._armed = value
        self._was_armed = self._was_armed or value

    def requested(self) -> bool:
        """Whether a stop was asked for (the loop's `should_stop`)."""
        return self.received is not None

    def _handle(self, signum: int, frame) -> None:
        if signum == getattr(signal, "SIGHUP", None):
            _leave_the_terminal()
        if not self.armed or self.received is not None:
            when = (
                "again" if self.received is not None
                else "after training" if self._was_armed
                else "before training began"
            )
            raise RunInterrupted(signum, f"{signal_name(signum)} {when}: stopped at once; nothing more was saved")
        self.received = signum
        print(
            f"{signal_name(signum)} received: stopping after this step with a checkpoint (send it again to stop at once)",
            file=sys.stderr,
            flush=True,
        )


def _leave_the_terminal() -> None:
    """Point stdout and stderr, where they are a terminal, at /dev/null: after a hang-up, writing to the
    terminal fails (EIO) and would end the run before its checkpoint. (A hung-up terminal no longer answers
    `isatty`; a character device is what a terminal still looks like to `fstat`.)"""
    for stream in (sys.stdout, sys.stderr):
        try:
            fd = stream.fileno()
            if stat.S_ISCHR(os.fstat(fd).st_mode):
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, fd)
                os.close(null)
            stream.flush()
        except (OSError, ValueError):  # closed, not a real file, or text that can no longer be flushed
            pass
