"""Node and client identity: a 32-byte Ed25519 seed in a 0600 key file.

The same key signs ledger events and is the libp2p identity (peer id derives from
the public key), so a node's events and its connections are attributable alike.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import nacl.bindings

from .errors import KeyFileError

KEY_MAGIC = b"bidmesh-ed25519-seed-v1\n"


@dataclass(frozen=True)
class Identity:
    seed: bytes = field(repr=False)
    public: bytes

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        if len(seed) != 32:
            raise KeyFileError("an Ed25519 seed is exactly 32 bytes")
        pk, _ = nacl.bindings.crypto_sign_seed_keypair(seed)
        return cls(seed, pk)

    @classmethod
    def generate(cls) -> Identity:
        return cls.from_seed(os.urandom(32))

    def sign(self, msg: bytes) -> bytes:
        _, sk = nacl.bindings.crypto_sign_seed_keypair(self.seed)
        return nacl.bindings.crypto_sign(msg, sk)[:64]


def save_key(path: Path, ident: Identity, *, overwrite: bool = False) -> None:
    """Write the seed with mode 0600, atomically; refuse to clobber an existing key."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise KeyFileError(f"{path} already exists; refusing to overwrite a key")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # umask cannot widen it, but an existing tmp might be wider
        os.write(fd, KEY_MAGIC + ident.seed.hex().encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def load_key(path: Path) -> Identity:
    """Load a key file; refuse one that group or others can read or write."""
    path = Path(path)
    try:
        st = path.stat()
        data = path.read_bytes()
    except FileNotFoundError:
        raise KeyFileError(f"no key file at {path}; create one with `bidmesh keygen`") from None
    except OSError as e:
        raise KeyFileError(f"cannot read key file {path}: {e.strerror}") from e
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(
            f"key file {path} is accessible by group/others (mode {stat.S_IMODE(st.st_mode):o}); "
            f"run `chmod 600 {path}`"
        )
    if not data.startswith(KEY_MAGIC):
        raise KeyFileError(f"{path} is not a bidmesh key file")
    try:
        seed = bytes.fromhex(data[len(KEY_MAGIC):].decode().strip())
    except (UnicodeDecodeError, ValueError):
        raise KeyFileError(f"{path}: the seed is not valid hex") from None
    return Identity.from_seed(seed)


def load_or_create_key(path: Path) -> Identity:
    path = Path(path)
    if not path.exists():
        save_key(path, Identity.generate())
    return load_key(path)
