"""Data parallelism over MLX's distributed engine (`mx.distributed`): several processes ("ranks") train one run.

Every rank reads the same global batches and keeps its own share of each batch's rows (`Ranks.rows`); the sums
that make a step (loss, loss tokens, gradients) are summed over ranks before the update (`Ranks.sum_outputs`),
so every rank applies the same update and the adapters stay identical. The loss is a sum over loss tokens
divided by the global token count, so the result does not depend on the number of ranks (up to the order of
float additions), and the data position is counted in global batches: a run resumes on any number of ranks.
Validation is shared the same way. Only rank 0 writes: the run directory, checkpoints, metrics and W&B.

Start the ranks with MLX's launcher, e.g. `python -m harness.launch -n 2 --backend nccl -- -m harness.train`
(README, "Several GPUs or Macs"). A process that was not launched is a group of one: every function here then
returns its input unchanged, and no distributed backend is initialized.

When one rank fails inside a step, it still joins that step's first collective with a failure flag, so every
rank stops with an error naming the failed rank instead of waiting for it forever; a rank that dies outright
is ended by the launcher, which stops the others.
"""

from __future__ import annotations

import functools
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_map

from harness.step.cpu_streams import split_rows
from models.backend import backend_name

Batch = dict[str, mx.array]

# What launchers put in each process's environment: MLX's launcher (ring, nccl, jaccl) and Open MPI's mpirun.
RANK_VARIABLES = ("MLX_RANK", "OMPI_COMM_WORLD_RANK")


class RankFailedError(RuntimeError):
    """Another rank failed; this one stops with it."""


def launched_rank() -> int | None:
    """This process's rank as a launcher set it in the environment, or None when it was started alone."""
    for name in RANK_VARIABLES:
        if os.environ.get(name, "").strip():
            return int(os.environ[name])
    return None


def backend_from_environment() -> str:
    """The `mx.distributed` backend the launcher prepared (`any` lets MLX try them in its own order)."""
    if os.environ.get("MLX_IBV_DEVICES"):
        return "jaccl"
    if os.environ.get("MLX_HOSTFILE"):
        return "ring"
    if os.environ.get("NCCL_HOST_IP") or os.environ.get("MLX_WORLD_SIZE"):
        return "nccl"
    if os.environ.get("OMPI_COMM_WORLD_RANK"):
        return "mpi"
    return "any"


def communication_stream() -> mx.Stream | None:
    """Where collectives run: Metal has no GPU implementation of them, so the CPU stream there; the default
    stream elsewhere (NCCL on CUDA runs them on the GPU; on the CPU backend the default stream is the CPU's)."""
    return mx.cpu if backend_name() == "metal" else None


@dataclass(frozen=True)
class Ranks:
    """The processes training together: this one is `rank` of `size` (`group` is None for a single process)."""

    group: mx.distributed.Group | None = None
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes files and logs."""
        return self.rank == 0

    def rows(self, batch: Batch) -> Batch:
        """This rank's share of `batch`'s rows (`harness.step.cpu_streams.split_rows`: nearly equal, in order)."""
        if self.size == 1:
            return batch
        count = next(iter(batch.values())).shape[0]
        if count < self.size:
            raise ValueError(
                f"a batch of {count} rows cannot be shared by {self.size} ranks: make trainer.batch_size and "
                f"trainer.eval_batch_size at least {self.size}"
            )
        return split_rows(batch, self.size)[self.rank]

    def _all_sum(self, x: mx.array) -> mx.array:
        return mx.distributed.all_sum(x, group=self.group, stream=communication_stream())

    def sum_arrays(self, arrays: list[mx.array]) -> list[mx.array]:
        """Each array summed over ranks (same shapes on every rank), in one all_sum per dtype: many small
        collectives cost more than one large one."""
        if self.size == 1 or not arrays:
            return list(arrays)
        summed: list[mx.array | None] = [None] * len(arrays)
        by_dtype: dict[Any, list[int]] = {}
        for i, array in enumerate(arrays):
            by_dtype.setdefault(array.dtype, []).append(i)
        for indices in by_dtype.values():
            flat = self._all_sum(mx.concatenate([arrays[i].reshape(-1) for i in indices]))
            bounds = np.cumsum([arrays[i].size for i in indices])[:-1].tolist()
            for i, part in zip(indices, mx.split(flat, bounds) if bounds else [flat]):
                summed[i] = part.reshape(arrays[i].shape)
        return summed  # type: ignore[return-value]

    def sum_tree(self, tree: Any) -> Any:
        """A tree of arrays (e.g. gradients) summed over ranks, in the same structure."""
        if self.size == 1:
            return tree
        summed = iter(self.sum_arrays([v for _, v in tree_flatten(tree)]))
        return tree_map(lambda _: next(summed), tree)

    def _share_failures(
        self, failure: BaseException | None, counts: mx.array | None = None
    ) -> mx.array | None:
        """One all_sum every rank joins, even one whose work raised (`failure`): a failure flag per rank and,
        from ranks that did not fail, integer `counts` to sum. Raises on every rank when any rank failed (the
        failed rank its own error, the others a `RankFailedError` naming it); else returns the summed counts."""
        flags = (mx.arange(self.size) == self.rank) if failure is not None else mx.zeros((self.size,))
        payload = flags.astype(mx.int32)
        if counts is not None:
            payload = mx.concatenate([payload, counts.reshape(-1).astype(mx.int32)])
        summed = self._all_sum(payload)
        failed = [rank for rank, flag in enumerate(summed[: self.size].tolist()) if flag]
        if failed:
            names = ", ".join(map(str, failed))
            message = f"rank {names} of {self.size} failed (its error is in its output); rank {self.rank} stops too"
            print(f"[rank {self.rank}] {message}", file=sys.stderr, flush=True)
            # Every rank has said why it stops before any exits: a launcher stops the rest once one has exited.
            mx.eval(self._all_sum(mx.zeros((1,), dtype=mx.int32)))
            if failure is not None:
                raise failure
            raise RankFailedError(message)
        return summed[self.size :] if counts is not None else None

    def sum_outputs(self, local: Callable[[], tuple]) -> tuple:
        """`(loss_sum, n_tokens, *rest)` of `local()` (this rank's share: rows of a batch) summed over ranks.

        `n_tokens` is summed exactly, as an integer, with the failure flags; `loss_sum` and the arrays of `rest`
        (e.g. the gradient tree) in one float all_sum per dtype. A rank whose `local()` raises tells the others
        in the first, small collective, so every rank stops (see `_share_failures`)."""
        if self.size == 1:
            return local()
        try:
            outputs = local()
        except Exception as err:  # noqa: BLE001 - re-raised by _share_failures, after the others were told
            self._share_failures(err, mx.zeros((1,), dtype=mx.int32))  # the same shape as the others send
            raise
        loss_sum, n_tokens, *rest = outputs
        tokens = self._share_failures(None, n_tokens)
        loss_sum, rest = self.sum_tree((loss_sum, tuple(rest)))
        return (loss_sum, tokens[0].astype(n_tokens.dtype), *rest)

    def on_main(self, work: Callable[[], Any]) -> Any:
        """`work()` on rank 0 only (a side effect: files, logs); every rank waits for it and stops with it if
        it fails. Returns work's result on rank 0, None elsewhere."""
        if self.size == 1:
            return work()
        result = None
        try:
            if self.is_main:
                result = work()
        except Exception as err:  # noqa: BLE001 - re-raised by _share_failures, after the others were told
            self._share_failures(err)
            raise
        self._share_failures(None)
        return result

    def broadcast_text(self, text: str) -> str:
        """Rank 0's `text` on every rank (e.g. its run directory: Hydra names one per process)."""
        return self.broadcast_bytes(text.encode()).decode()

    def broadcast_bytes(self, data: bytes) -> bytes:
        """Rank 0's `data` on every rank (the others' `data` is ignored)."""
        if self.size == 1:
            return data
        mine = np.frombuffer(data, dtype=np.uint8).astype(np.int32) if self.is_main else None
        length = int(self._all_sum(mx.array([len(mine) if mine is not None else 0])).item())
        if length == 0:
            return b""
        payload = mx.array(mine) if mine is not None else mx.zeros((length,), dtype=mx.int32)
        return bytes(np.array(self._all_sum(payload), dtype=np.uint8))

    def decide_on_main(self, decide: Callable[[], Any]) -> Any:
        """`decide()` on rank 0 only (it reads rank 0's files, e.g. the run's plan and config), its result sent
        to every rank (pickled: the ranks are one job); a failure there stops every rank."""
        if self.size == 1:
            return decide()
        import pickle

        decided = self.on_main(decide)
        return pickle.loads(self.broadcast_bytes(pickle.dumps(decided) if self.is_main else b""))

    def agreed(self, ask: Callable[[], bool]) -> Callable[[], bool]:
        """`ask()` answered for all ranks: true on every rank when true on any (e.g. a stop asked for on one
        rank's terminal), so that all stop at the same step. One small collective per call."""
        if self.size == 1:
            return ask

        def any_rank() -> bool:
            return int(self._all_sum(mx.array([int(bool(ask()))])).item()) > 0

        return any_rank

    def stop_signals(self) -> tuple[int, ...]:
        """The signals a run stops cleanly on (`harness.signals`). Under a launcher only SIGINT (Ctrl-C reaches
        every rank): a launcher sends SIGTERM to stop the ranks after one failed, and a rank waiting for the
        failed one in a collective could not act on it, so SIGTERM keeps its default action: end the rank."""
        import signal

        from harness.signals import STOP_SIGNALS

        return STOP_SIGNALS if self.size == 1 else (signal.SIGINT,)

    def broadcast_tree(self, tree: Any) -> Any:
        """Rank 0's arrays on every rank (same shapes everywhere): e.g. freshly built or loaded adapters."""
        if self.size == 1:
            return tree
        mine = [v if self.is_main else mx.zeros_like(v) for _, v in tree_flatten(tree)]
        summed = iter(self.sum_arrays(mine))
        return tree_map(lambda _: next(summed), tree)

    def start_together(self, model: Any, step: int) -> None:
        """Give every rank rank 0's trainable parameters, and check every rank starts at optimizer step `step`
        (a resumed run reads its checkpoint on every rank: the run directory must be readable by all)."""
        if self.size == 1:
            return
        self.check_identical(
            mx.array(step), "starting steps (does every rank read the run directory it resumes from?)"
        )
        model.update(self.broadcast_tree(model.trainable_parameters()))

    def check_identical(self, tree: Any, what: str) -> None:
        """Raise on every rank when the arrays of `tree` differ between ranks (a cheap fingerprint: their sum
        and sum of squares, compared with all_max/all_min)."""
        if self.size == 1:
            return
        leaves = [v.astype(mx.float32) for _, v in tree_flatten(tree)]
        if not leaves:
            return
        fingerprint = mx.stack([sum(v.sum() for v in leaves), sum((v * v).sum() for v in leaves)])
        stream = communication_stream()
        high = mx.distributed.all_max(fingerprint, group=self.group, stream=stream)
        low = mx.distributed.all_min(fingerprint, group=self.group, stream=stream)
        if not mx.array_equal(high, low).item():
            raise RankFailedError(f"the {what} differ between ranks (fingerprints {low.tolist()} .. {high.tolist()})")


_WORLD: Ranks | None = None


def world() -> Ranks:
    """The ranks of this job: `mx.distributed.init` with the backend its launcher prepared (strict: a launched
    process that cannot join its group fails), or a group of one when the process was not launched."""
    global _WORLD
    if _WORLD is None:
        if launched_rank() is None:
            _WORLD = Ranks()
        else:
            group = mx.distributed.init(strict=True, backend=backend_from_environment())
            _WORLD = Ranks(group, group.rank(), group.size())
    return _WORLD


def save_on_main_rank(save_checkpoint: Callable) -> Callable:
    """`save_checkpoint(run_dir, model, ...)` that checks the adapters are the same on every rank, then writes
    on rank 0 only; a failure to write stops every rank."""

    @functools.wraps(save_checkpoint)
    def save(run_dir, model, *args, **kwargs):
        ranks = world()
        ranks.check_identical(model.trainable_parameters(), "adapters")
        return ranks.on_main(lambda: save_checkpoint(run_dir, model, *args, **kwargs))

    return save


class SilentTracker:
    """A `harness.tracking.Tracker` that records nothing: what ranks other than 0 log to."""

    metrics_path = None
    wandb_dir = None
    wandb_run = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def log(self, metrics: dict[str, Any], *, step: int) -> None:
        pass

    def summary(self, values: dict[str, Any]) -> None:
        pass

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]], *, step: int) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


# Overrides a non-zero rank gives Hydra, so that it writes nothing: no output subdirectory, no job log file, and
# an existing directory as its run directory (the rank takes rank 0's run directory from `broadcast_text`).
_SILENT_HYDRA_KEYS = ("hydra.run.dir", "hydra.output_subdir", "hydra/job_logging", "hydra.job_logging")


def hydra_argv(argv: list[str]) -> list[str]:
    """The command line Hydra should see in this process: unchanged unless it was launched as a rank other
    than 0. A sweep (`-m`) cannot run under a launcher: each rank would run its own sweeper."""
    rank = launched_rank()
    if rank is None:
        return argv
    if any(arg in ("-m", "--multirun") for arg in argv[1:]):
        raise SystemExit(
            "harness.train -m under a distributed launcher: every rank would run its own sweep. Start the sweep "
            "normally and let each trial be distributed by the sweep's launcher (README, 'Several GPUs or Macs')."
        )
    if rank == 0:
        return argv
    kept = [a for a in argv[1:] if not a.lstrip("+~").startswith(_SILENT_HYDRA_KEYS)]
    silent = [f"hydra.run.dir={tempfile.gettempdir()}", "hydra.output_subdir=null", "hydra/job_logging=none"]
    return [argv[0], *kept, *silent]
