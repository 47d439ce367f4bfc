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
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # umask cannot widen it, but an existing tmp might be wider
        os.write(fd, KEY_MAGIC + ident.seed.hex().encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


MAX_KEY_FILE = 4096  # a key file is ~90 bytes; never read more than this


def load_key(path: Path) -> Identity:
    """Load a key file; refuse one that group or others can read or write, and
    anything that is not a small regular file (a FIFO would block forever)."""
    path = Path(path)
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer. The checks below
        # look at the opened file itself, so what is checked is what is read.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise KeyFileError(f"no key file at {path}; create one with `bidmesh keygen`") from None
    except OSError as e:
        raise KeyFileError(f"cannot read key file {path}: {e.strerror}") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(f"key file {path} is not a regular file")
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise KeyFileError(
                f"key file {path} is accessible by group/others "
                f"(mode {stat.S_IMODE(st.st_mode):o}); run `chmod 600 {path}`"
            )
        chunks = []
        size = 0
        while size <= MAX_KEY_FILE:
            chunk = os.read(fd, MAX_KEY_FILE + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        data = b"".join(chunks)
    except OSError as e:
        raise KeyFileError(f"cannot read key file {path}: {e.strerror}") from e
    finally:
        os.close(fd)
    if len(data) > MAX_KEY_FILE:
        raise KeyFileError(f"{path} is too large to be a bidmesh key file")
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
