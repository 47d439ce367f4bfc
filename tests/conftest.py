"""Shared test machinery: the one way to wait for a condition, and the seeded fake
network as a fixture.

Waits poll a condition with a bound and never sleep as synchronisation: under load
(2 cores shared by many processes) a condition may take far longer than on an idle
machine, so the bounds are generous and a timeout names what was awaited.

* `wait_until` (async, trio): in-process hosts and nodes.
* `wait_for` (blocking): node processes driven from the test's thread.
* Failure reports: an exception from inside nested trio nurseries (a test's hosts,
  upstream's services) arrives wrapped in more ExceptionGroups than Python prints
  ("max_group_depth is 10"); each failed test's report then ends with a "leaf
  exceptions" section holding every innermost exception with its traceback.
* `fake_net` (fixture): the seeded fake networks of tests/fakenet.py in the test's
  tmp_path, on trio's virtual clock (use with `autojump_clock`): `await
  fake_net(seed)` runs `fakenet.run_fake`; `fake_net.mesh(n, seed)` builds a
  `FakeMesh` (nodes driven by their ReplicationPolicy, gossip along a mesh).

Modules import the helpers with `from conftest import wait_until` (tests/ is on the
import path, as for the other helper modules here).
"""

from __future__ import annotations

import itertools
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from fakenet import FakeMesh, FakeNet, run_fake


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


class FakeNetRunner:
    """The `fake_net` fixture: each network gets its own directory under tmp_path."""

    def __init__(self, tmp: Path) -> None:
        self._tmp = tmp
        self._runs = itertools.count()

    def _dir(self) -> Path:
        return self._tmp / f"net{next(self._runs)}"

    async def __call__(self, seed: int, **kw: Any) -> FakeNet:
        """Nodes with real ledgers on a seeded lossy network (drops, duplicates,
        delays; see `fakenet.run_fake` for the knobs), run until they converge."""
        return await run_fake(self._dir(), seed, **kw)

    def mesh(self, n: int, seed: int, **kw: Any) -> FakeMesh:
        """A `FakeMesh` of `n` nodes (knobs: see `FakeMesh`); `await net.run(...)`."""
        return FakeMesh(self._dir(), n, seed, **kw)


@pytest.fixture
def fake_net(tmp_path: Path) -> FakeNetRunner:
    """`await fake_net(seed, **kw)` or `fake_net.mesh(n, seed, **kw)`: see
    `FakeNetRunner`."""
    return FakeNetRunner(tmp_path)


def _leaves(e: BaseException, depth: int = 0) -> Iterator[BaseException]:
    if isinstance(e, BaseExceptionGroup) and depth < 100:
        for sub in e.exceptions:
            yield from _leaves(sub, depth + 1)
    else:
        yield e


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.failed and call.excinfo is not None \
            and isinstance(call.excinfo.value, BaseExceptionGroup):
        text = "\n".join("".join(traceback.format_exception(leaf))
                         for leaf in _leaves(call.excinfo.value))
        report.sections.append(("leaf exceptions", text))
    return report
