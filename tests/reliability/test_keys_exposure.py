"""Keys and exposure: key files are 0600 and refused otherwise; `bidmesh keygen`
writes 0600 and never clobbers; no secret (the seed, in hex) appears in CLI output
(`--json` or not), error messages, logs or the HTTP API; the HTTP API is read-only
and bound to localhost by default."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from node.errors import KeyFileError
from node.keys import KEY_MAGIC, Identity, load_key, load_or_create_key, save_key
from node.testing import seed

from .mutations import FUZZ

ROOT = Path(__file__).resolve().parents[2]
SEED = seed(700)
IDENT = Identity.from_seed(SEED)
SECRETS = (SEED.hex(), SEED.hex().upper())


def assert_no_secret(text: str, where: str) -> None:
    for s in SECRETS:
        assert s not in text, f"the key seed appears in {where}"


def _key_file(path: Path, content: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(content)
    path.chmod(mode)
    return path


GOOD = KEY_MAGIC + SEED.hex().encode() + b"\n"


# ------------------------------------------------------------------ key files


@pytest.mark.parametrize("bit", [0o040, 0o020, 0o010, 0o004, 0o002, 0o001])
def test_any_group_or_other_permission_is_refused(tmp_path: Path, bit: int) -> None:
    path = _key_file(tmp_path / "k", GOOD, 0o600 | bit)
    with pytest.raises(KeyFileError, match="chmod 600") as ei:
        load_key(path)
    assert_no_secret(str(ei.value), "the error")


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o700])
def test_owner_only_modes_load(tmp_path: Path, mode: int) -> None:
    assert load_key(_key_file(tmp_path / "k", GOOD, mode)) == IDENT


@pytest.mark.parametrize("content", [
    b"", b"\n", KEY_MAGIC, KEY_MAGIC + b"\n", SEED.hex().encode(),  # no magic line
    KEY_MAGIC + SEED.hex()[:-2].encode(), KEY_MAGIC + (SEED + b"\x00").hex().encode(),
    KEY_MAGIC + SEED.hex()[:-1].encode(), KEY_MAGIC + SEED.hex().encode() + b"zz",
    KEY_MAGIC + b"\xff" * 64, KEY_MAGIC + SEED.hex().encode() + b"\n" + b"0" * 10_000,
])
def test_wrong_format_or_length_is_refused_without_echoing(tmp_path: Path,
                                                           content: bytes) -> None:
    with pytest.raises(KeyFileError) as ei:
        load_key(_key_file(tmp_path / "k", content))
    assert_no_secret(str(ei.value), "the error")
    assert SEED.hex()[:-2] not in str(ei.value)


@FUZZ
@given(st.one_of(st.binary(max_size=120),
                 st.binary(max_size=80).map(lambda b: KEY_MAGIC + b),
                 st.text("0123456789abcdefABCDEF \n\t", max_size=80).map(
                     lambda t: KEY_MAGIC + t.encode())))
def test_arbitrary_key_file_content(content: bytes) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = _key_file(Path(d) / "k", content)
        try:
            ident = load_key(path)
        except KeyFileError:
            return
    rest = content[len(KEY_MAGIC):].decode()
    assert content.startswith(KEY_MAGIC) and bytes.fromhex(rest.strip()) == ident.seed


def test_not_a_regular_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir(mode=0o700)
    with pytest.raises(KeyFileError):
        load_key(tmp_path / "dir")
    with pytest.raises(KeyFileError, match="keygen"):
        load_key(tmp_path / "missing")


def test_fifo_is_refused_not_waited_on(tmp_path: Path) -> None:
    """Regression: load_key used to block forever reading a FIFO (no writer)."""
    fifo = tmp_path / "node.key"
    os.mkfifo(fifo, 0o600)
    code = ("import sys; from node.keys import load_key; from node.errors import KeyFileError\n"
            "try:\n    load_key(sys.argv[1])\nexcept KeyFileError as e:\n    print(e)\n")
    try:
        r = subprocess.run([sys.executable, "-c", code, str(fifo)], capture_output=True,
                           text=True, timeout=30, cwd=ROOT)
    except subprocess.TimeoutExpired:
        pytest.fail("load_key blocked on a FIFO")
    assert r.returncode == 0 and "not a regular file" in r.stdout, r.stderr


def test_symlink_to_a_readable_file_is_refused(tmp_path: Path) -> None:
    target = _key_file(tmp_path / "target", GOOD, 0o644)
    link = tmp_path / "node.key"
    link.symlink_to(target)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_key(link)


def test_oversized_key_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="too large"):
        load_key(_key_file(tmp_path / "k", GOOD + b" " * (1 << 20)))


@pytest.fixture
def umask_zero() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def test_save_key_is_0600_whatever_the_umask(tmp_path: Path, umask_zero: None) -> None:
    # A leftover temp file with wide permissions must not widen the new key.
    _key_file(tmp_path / "node.key.tmp", b"old", 0o666)
    save_key(tmp_path / "node.key", IDENT)
    assert stat.S_IMODE((tmp_path / "node.key").stat().st_mode) == 0o600
    assert not (tmp_path / "node.key.tmp").exists()
    created = load_or_create_key(tmp_path / "new" / "node.key")
    assert stat.S_IMODE((tmp_path / "new" / "node.key").stat().st_mode) == 0o600
    assert_no_secret(repr(created) + str(created), "the identity's repr")


def test_save_key_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    save_key(path, IDENT)
    before = path.read_bytes()
    with pytest.raises(KeyFileError, match="refusing"):
        save_key(path, Identity.from_seed(seed(701)))
    assert path.read_bytes() == before
