"""Test-only processors. A module of its own so worker processes can import them."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from node.processors import ProcessContext


@dataclass(frozen=True)
class Crash:
    """Kills its worker process, as a segfaulting native plugin would."""

    name: str = "crash"

    def process(self, data: bytes, ctx: ProcessContext) -> bytes:
        os._exit(3)


@dataclass(frozen=True)
class Boom:
    """A buggy plugin raising something other than ProcessingError."""

    name: str = "boom"

    def process(self, data: bytes, ctx: ProcessContext) -> bytes:
        raise KeyError("bug in plugin")


@dataclass(frozen=True)
class Spin:
    """Never finishes (within any test's patience): exercises the pool timeout."""

    name: str = "spin"

    def process(self, data: bytes, ctx: ProcessContext) -> bytes:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            pass
        return data


@dataclass(frozen=True)
class Reverse:
    name: str = "reverse"

    def process(self, data: bytes, ctx: ProcessContext) -> bytes:
        return data[::-1]


@dataclass(frozen=True)
class NotBytes:
    """Returns a str: a plugin bug the pool must report, not pass on."""

    name: str = "not-bytes"

    def process(self, data: bytes, ctx: ProcessContext) -> bytes:
        return "text"  # type: ignore[return-value]


class Unpicklable:
    """Holds a lock, so it cannot be shipped to a worker."""

    name = "unpicklable"

    def __init__(self) -> None:
        import threading

        self.lock = threading.Lock()

    def process(self, data: bytes, ctx: ProcessContext) -> bytes:
        return data


def _loaded(path: str) -> Loaded:
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")
    return Loaded(path)


@dataclass(frozen=True)
class Loaded:
    """Writes the pid of every process that loads (unpickles) it to `path`: a worker
    does so for each job, and when warmed up."""

    path: str
    name: str = "loaded"

    def process(self, data: bytes, ctx: ProcessContext) -> bytes:
        return data

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return _loaded, (self.path,)


@dataclass(frozen=True)
class FlakyAesGcm:
    """aes-gcm that corrupts one byte of every third segment: well-formed, plausible,
    and wrong."""

    name: str = "aes-gcm"

    def process(self, data: bytes, ctx: ProcessContext) -> bytes:
        from node.processors.builtin import AesGcm

        out = AesGcm().process(data, ctx)
        if ctx.seq % 3 == 1:
            out = out[:-1] + bytes([out[-1] ^ 1])
        return out
