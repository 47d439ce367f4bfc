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
