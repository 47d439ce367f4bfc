"""Shared test machinery: the one way to wait for a condition, and the seeded fake
network as a fixture.

Waits poll a condition with a bound and never sleep as synchronisation: under load
(2 cores shared by many processes) a condition may take far longer than on an idle
machine, so the bounds are generous and a timeout names what was awaited.

* `wait_until` (async, trio): in-process hosts and nodes.
* `wait_for` (blocking): node processes driven from the test's thread.
* `fake_net` (fixture): runs `fakenet.run_fake` in the test's tmp_path on trio's
  virtual clock (use with `autojump_clock`).

Modules import the helpers with `from conftest import wait_until` (tests/ is on the
import path, as for the other helper modules here).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from fakenet import FakeNet, run_fake


async def wait_until(cond: Callable[[], object], timeout: float = 30.0, what: str = "") -> None:
    """Return once `cond()` is true; AssertionError after `timeout` seconds (of the
    trio clock: virtual under `autojump_clock`)."""
    deadline = trio.current_time() + timeout
    while not cond():
        if trio.current_time() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for "
                                 f"{what or getattr(cond, '__name__', 'a condition')}")
        await trio.sleep(0.01)


def wait_for(cond: Callable[[], object], timeout: float, what: str) -> None:
    """Blocking `wait_until` for processes: poll `cond()` until true; AssertionError
    after `timeout` wall-clock seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


FakeNetRunner = Callable[..., Awaitable[FakeNet]]


@pytest.fixture
def fake_net(tmp_path: Path) -> FakeNetRunner:
    """`await fake_net(seed, **kw)`: nodes with real ledgers on a seeded lossy network
    (drops, duplicates, delays; see `fakenet.run_fake` for the knobs), run until they
    converge; returns the `FakeNet`. Each call gets its own directory."""
    runs = itertools.count()

    async def run(seed: int, **kw: Any) -> FakeNet:
        return await run_fake(tmp_path / f"net{next(runs)}", seed, **kw)

    return run
