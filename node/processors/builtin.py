"""Built-in processors: identity, sha256, zstd(-d), aes-gcm(-d) and provider-configured exec.

All are frozen dataclasses at module level so they pickle into worker processes, and
all are deterministic (see docs/dataplane.md for the aes-gcm nonce rule).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import selectors
import signal
import subprocess
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..errors import ConfigError, ProcessingError
from .base import ProcessContext, Processor

DEFAULT_MAX_OUTPUT = 64 << 20  # bytes; bounds decompression bombs and exec output
DEFAULT_EXEC_TIMEOUT_S = 30.0
NONCE_TAG = b"bidmesh-nonce"
AAD = b"bidmesh/aes-gcm/v1"
NONCE_LEN = 12
TAG_LEN = 16


def _limit(ctx: ProcessContext, cap: int) -> int:
    """`max_output_bytes` from params may lower a limit, never raise it."""
    v = ctx.params.get("max_output_bytes", cap)
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ProcessingError(f"params.max_output_bytes must be a positive int, got {v!r}")
    return min(v, cap)


def _timeout(ctx: ProcessContext, cap: float) -> float:
    v = ctx.params.get("exec_timeout_s", cap)
    if not isinstance(v, int | float) or isinstance(v, bool) or v <= 0:
        raise ProcessingError(f"params.exec_timeout_s must be a positive number, got {v!r}")
    return float(v)


@dataclass(frozen=True)
class Identity:
    name: str = "identity"
    # Costs nothing: the dataplane runs it in-process instead of paying a worker round trip.
    inline: ClassVar[bool] = True

    def output_bound(self, n: int) -> int:
        return n

    def process(self, data: bytes, ctx: ProcessContext) -> bytes:
        return data

    def verify(self, data: bytes, output: bytes, ctx: ProcessContext) -> None:
        if output != data:
            raise ProcessingError("identity: output differs from the input")


@dataclass(frozen=True)
class Sha256:
    """Output is the 32-byte digest of the segment."""

    name: str = "sha256"

    def output_bound(self, n: int) -> int:
        return 32

    def process(self, data: bytes, ctx: ProcessContext) -> bytes:
        return hashlib.sha256(data).digest()

    def verify(self, data: bytes, output: bytes, ctx: ProcessContext) -> None:
        if output != hashlib.sha256(data).digest():
            raise ProcessingError("sha256: output is not the digest of the input")


@dataclass(frozen=True)
class Zstd:
    """Single-threaded so the output is a pure function of (input, level)."""

    name: str = "zstd"

    def output_bound(self, n: int) -> int:
        # ZSTD_compressBound (n + n/256 + a small constant) and the frame header, rounded up.
        return n + (n >> 7) + 1024

    def process(self, data: bytes, ctx: ProcessContext) -> bytes:
        level = ctx.params.get("zstd_level", 3)
        if not isinstance(level, int) or isinstance(level, bool) or not 1 <= level <= 22:
            raise ProcessingError(f"params.zstd_level must be 1..22, got {level!r}")
        return zstandard.ZstdCompressor(level=level, write_content_size=True).compress(data)

    def verify(self, data: bytes, output: bytes, ctx: ProcessContext) -> None:
        """Well-formed: one frame that declares the input's size and decompresses to it."""
        try:
            params = zstandard.get_frame_parameters(output)
        except zstandard.ZstdError as e:
            raise ProcessingError(f"zstd: output is not a zstd frame: {e}") from e
        if params.content_size != len(data):
            raise ProcessingError(
                f"zstd: frame declares {params.content_size} bytes, input has {len(data)}"
            )
        if _unzstd(output, len(data), "zstd") != data:
            raise ProcessingError("zstd: output does not decompress to the input")


@dataclass(frozen=True)
class ZstdDecompress:
    name: str = "zstd-d"
    max_output: int = DEFAULT_MAX_OUTPUT

    def output_bound(self, n: int) -> int:
        return self.max_output  # any ratio up to the bomb cap

    def process(self, data: bytes, ctx: ProcessContext) -> bytes:
        limit = _limit(ctx, self.max_output)
        # A streaming reader bounds memory even when the frame header lies or omits the
        # size; reading one byte past the limit tells a bomb from an exact fit.
        out = bytearray()
        try:
            reader = zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=True)
            with reader:
                while len(out) <= limit:
                    chunk = reader.read(min(1 << 20, limit + 1 - len(out)))
                    if not chunk:
                        break
                    out += chunk
        except zstandard.ZstdError as e:
            raise ProcessingError(f"zstd-d: input is not valid zstd: {e}") from e
        if len(out) > limit:
            raise ProcessingError(f"zstd-d: output exceeds {limit} bytes (decompression bomb?)")
        if not out and data:
            raise ProcessingError("zstd-d: input holds no complete zstd frame")
        return bytes(out)

    def verify(self, data: bytes, output: bytes, ctx: ProcessContext) -> None:
        if len(output) > _limit(ctx, self.max_output) or (
            _unzstd(data, len(output), "zstd-d") != output
        ):
            raise ProcessingError("zstd-d: output is not the decompressed input")


def _unzstd(data: bytes, expected: int, name: str) -> bytes:
    """Decompress at most `expected + 1` bytes (enough to tell a mismatch)."""
    out = bytearray()
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=True)
        with reader:
            while len(out) <= expected:
                chunk = reader.read(min(1 << 20, expected + 1 - len(out)))
                if not chunk:
                    break
                out += chunk
    except zstandard.ZstdError as e:
        raise ProcessingError(f"{name}: not valid zstd: {e}") from e
    return bytes(out)


def nonce_for(stream_id: bytes, seq: int, step: int) -> bytes:
    """Deterministic and unique per (stream, seq, chain step) under one lease key."""
    h = hashlib.sha256(NONCE_TAG + stream_id + seq.to_bytes(8, "big") + step.to_bytes(2, "big"))
    return h.digest()[:NONCE_LEN]


def _aead(ctx: ProcessContext, name: str) -> AESGCM:
    if ctx.key is None:
        raise ProcessingError(f"{name} needs the per-lease key; none was agreed for this lease")
    return AESGCM(ctx.key)


@dataclass(frozen=True)
class AesGcm:
    """AES-256-GCM. Output: nonce (12) || ciphertext || tag (16).

    Carrying the nonce lets aes-gcm-d decrypt without knowing how the encrypting side
    segmented or numbered the stream.
    """

    name: str = "aes-gcm"

    def output_bound(self, n: int) -> int:
        return n + NONCE_LEN + TAG_LEN

    def process(self, data: bytes, ctx: ProcessContext) -> bytes:
        nonce = nonce_for(ctx.stream_id, ctx.seq, ctx.step)
        return nonce + _aead(ctx, self.name).encrypt(nonce, data, AAD)

    def verify(self, data: bytes, output: bytes, ctx: ProcessContext) -> None:
        """The nonce must be the deterministic one and the ciphertext must open to the input."""
        if output[:NONCE_LEN] != nonce_for(ctx.stream_id, ctx.seq, ctx.step):
            raise ProcessingError("aes-gcm: output does not carry the expected nonce")
        if AesGcmDecrypt().process(output, ctx) != data:
            raise ProcessingError("aes-gcm: output does not decrypt to the input")


@dataclass(frozen=True)
class AesGcmDecrypt:
    name: str = "aes-gcm-d"

    def output_bound(self, n: int) -> int:
        return max(0, n - NONCE_LEN - TAG_LEN)

    def process(self, data: bytes, ctx: ProcessContext) -> bytes:
        if len(data) < NONCE_LEN + TAG_LEN:
            raise ProcessingError(f"aes-gcm-d: input of {len(data)} bytes is too short")
        aead = _aead(ctx, self.name)
        try:
            return aead.decrypt(data[:NONCE_LEN], data[NONCE_LEN:], AAD)
        except InvalidTag as e:
            raise ProcessingError("aes-gcm-d: authentication failed (wrong key or tampered)") from e

    def verify(self, data: bytes, output: bytes, ctx: ProcessContext) -> None:
        if len(data) < NONCE_LEN + TAG_LEN:
            raise ProcessingError("aes-gcm-d: input is too short to decrypt")
        nonce = data[:NONCE_LEN]
        if nonce + _aead(ctx, self.name).encrypt(nonce, output, AAD) != data:
            raise ProcessingError("aes-gcm-d: output is not the plaintext of the input")


@dataclass(frozen=True)
class Exec:
    """Pipe the segment through a provider-configured command (stdin → stdout).

    Nonzero exit, exceeding `timeout_s` or `max_output` bytes of stdout is a
    ProcessingError. The command runs in its own session so the whole process group
    is killed, including anything a shell started.
    """

    name: str
    argv: tuple[str, ...]
    timeout_s: float = DEFAULT_EXEC_TIMEOUT_S
    max_output: int = DEFAULT_MAX_OUTPUT

    def __post_init__(self) -> None:
        name = self.name
        if not isinstance(name, str) or not name.startswith("exec:") or len(name) < 6:
            raise ConfigError(f"exec processor names look like 'exec:gzip', got {self.name!r}")
        if not self.argv or not all(isinstance(a, str) and a for a in self.argv):
            raise ConfigError(f"{self.name}: argv must be a non-empty list of non-empty strings")
        if self.timeout_s <= 0 or self.max_output <= 0:
            raise ConfigError(f"{self.name}: timeout_s and max_output must be positive")

    def output_bound(self, n: int) -> int:
        return self.max_output

    def process(self, data: bytes, ctx: ProcessContext) -> bytes:
        limit = _limit(ctx, self.max_output)
        try:
            proc = subprocess.Popen(
                self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, start_new_session=True,
            )
        except OSError as e:
            raise ProcessingError(f"{self.name}: cannot start {self.argv[0]!r}: {e}") from e
        try:
            deadline = time.monotonic() + min(self.timeout_s, _timeout(ctx, self.timeout_s))
            out, err = _pump(proc, data, limit, deadline, self.name)
            rc = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired as e:
            raise ProcessingError(f"{self.name}: closed stdout but did not exit") from e
        finally:
            _kill(proc)
        if rc != 0:
            tail = err[-200:].decode("utf-8", "replace").strip()
            raise ProcessingError(f"{self.name}: exited with status {rc}: {tail}")
        return out


def _pump(
    proc: subprocess.Popen[bytes], data: bytes, limit: int, deadline: float, name: str
) -> tuple[bytes, bytes]:
    """Feed stdin and drain stdout/stderr without deadlock, within limit and deadline."""
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    out, err = bytearray(), bytearray()
    view, pos = memoryview(data), 0
    with selectors.DefaultSelector() as sel:
        if data:
            os.set_blocking(proc.stdin.fileno(), False)
            sel.register(proc.stdin, selectors.EVENT_WRITE)
        else:
            proc.stdin.close()
        sel.register(proc.stdout, selectors.EVENT_READ)
        sel.register(proc.stderr, selectors.EVENT_READ)
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                raise ProcessingError(f"{name}: timed out")
            for key, _ in sel.select(left):
                if key.fileobj is proc.stdin:
                    try:
                        pos += os.write(proc.stdin.fileno(), view[pos : pos + (1 << 16)])
                    except BrokenPipeError:
                        pos = len(data)  # the command stopped reading; judge it by its exit
                    if pos >= len(data):
                        sel.unregister(proc.stdin)
                        proc.stdin.close()
                    continue
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    sel.unregister(key.fileobj)
                elif key.fileobj is proc.stdout:
                    out += chunk
                    if len(out) > limit:
                        raise ProcessingError(f"{name}: output exceeds {limit} bytes")
                else:
                    err += chunk
                    del err[:-4096]  # keep only the tail for the error message
    return bytes(out), bytes(err)


def _kill(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):  # it exited in between: fine
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    for f in (proc.stdin, proc.stdout, proc.stderr):
        if f is not None and not f.closed:
            f.close()


BUILTINS: tuple[Processor, ...] = (
    Identity(), Sha256(), Zstd(), ZstdDecompress(), AesGcm(), AesGcmDecrypt(),
)
