"""Key files: 0600, atomic, refuse unsafe or malformed files."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import nacl.bindings
import pytest
from testkit import seed

from node.errors import KeyFileError
from node.keys import KEY_MAGIC, Identity, load_key, load_or_create_key, save_key


def test_save_and_load(tmp_path: Path) -> None:
    ident = Identity.from_seed(seed(1))
    path = tmp_path / "sub" / "node.key"
    save_key(path, ident)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_key(path) == ident
    assert not (tmp_path / "sub" / "node.key.tmp").exists()
    assert seed(1).hex() not in repr(ident)


def test_sign_verifies() -> None:
    ident = Identity.from_seed(seed(2))
    sig = ident.sign(b"hello")
    nacl.bindings.crypto_sign_open(sig + b"hello", ident.public)


def test_generate_is_random() -> None:
    assert Identity.generate().public != Identity.generate().public


def test_refuses_overwrite_unless_asked(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    save_key(path, Identity.from_seed(seed(1)))
    with pytest.raises(KeyFileError, match="refusing"):
        save_key(path, Identity.from_seed(seed(2)))
    save_key(path, Identity.from_seed(seed(2)), overwrite=True)
    assert load_key(path).seed == seed(2)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620])
def test_refuses_group_or_world_access(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "node.key"
    save_key(path, Identity.from_seed(seed(1)))
    os.chmod(path, mode)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_key(path)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"not a key", "not a bidmesh key"),
        (KEY_MAGIC + b"zz\n", "not valid hex"),
        (KEY_MAGIC + b"00" * 31 + b"\n", "32 bytes"),
    ],
)
def test_refuses_malformed(tmp_path: Path, content: bytes, match: str) -> None:
    path = tmp_path / "node.key"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(KeyFileError, match=match):
        load_key(path)


def test_missing_file_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="bidmesh keygen"):
        load_key(tmp_path / "none.key")


def test_load_or_create(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    a = load_or_create_key(path)
    assert load_or_create_key(path) == a
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
