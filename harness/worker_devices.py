"""One accelerator per sweep worker process: `hydra.sweeper.devices: [0, 1, ...]` with a parallel launcher.

A joblib (loky) worker runs many trials one after another and keeps its CUDA context between them, so the device
is chosen per worker process, not per trial: the first trial a process runs claims the first free entry of
`devices` by holding an exclusive lock on `<lock_dir>/device-<entry>.lock` for the rest of the process's life
(the lock goes away with the process, even a killed one), and sets `CUDA_VISIBLE_DEVICES` to that entry before
anything touches the GPU. Later trials in the same process keep the claim. On Metal and CPU there is one device
and the option stays unset.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from pathlib import Path
from typing import Any

DEVICE_ENV = "CUDA_VISIBLE_DEVICES"
_claimed: tuple[str, Any] | None = None  # (device entry, open lock file) held by this process


def claim_device(devices: list[str], lock_dir: Path) -> str:
    """The entry of `devices` this process holds, claiming the first free one on the first call.

    Raises RuntimeError when every entry is held by another live process (more workers than devices).
    """
    global _claimed
    if _claimed is not None and _claimed[0] in devices:
        return _claimed[0]
    lock_dir.mkdir(parents=True, exist_ok=True)
    for device in devices:
        handle = open(lock_dir / f"device-{device}.lock", "a+")  # noqa: SIM115 - held for the process's life
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            continue
        _claimed = (device, handle)
        return device
    raise RuntimeError(
        f"hydra.sweeper.devices={devices}: every device is held by another worker; "
        "use no more launcher workers (hydra.launcher.n_jobs) than devices"
    )


def claim_worker_device(sweeper_cfg: Any) -> str | None:
    """Claim this worker's device from `sweeper_cfg.devices` (None or empty: do nothing) and expose only that
    device to CUDA. Returns the claimed entry. Locks live under `sweeper_cfg.device_lock_dir`, or a folder in the
    system temp directory named after the study, shared by the workers of one host."""
    devices = [str(d) for d in (sweeper_cfg.get("devices") or [])] if sweeper_cfg is not None else []
    if not devices:
        return None
    lock_dir = sweeper_cfg.get("device_lock_dir") or Path(tempfile.gettempdir()) / (
        f"qlora-devices-{sweeper_cfg.get('study_name') or 'sweep'}"
    )
    device = claim_device(devices, Path(lock_dir))
    os.environ[DEVICE_ENV] = device
    return device
