"""Event-loop step accounting (opt-in: `[node] loop_stats`).

An honest peer's request waits for whatever else the loop runs first, one task step
at a time, so the longest steps are what fairness between peers is about
(node/ingest.py). `LoopSteps` is a trio instrument that measures the CPU time of
every task step (thread CPU time: independent of how loaded the machine is, unlike
wall-clock lag) and keeps, per second, the longest step and its task's name, for
the last `keep_s` seconds. bench/hostile.py turns it on to report, per attack, the
longest step the attack caused on the victim. Off by default: it costs two clock
reads per task step.
"""

from __future__ import annotations

import time
from collections import deque

import trio

__all__ = ["LoopSteps"]


class LoopSteps(trio.abc.Instrument):
    def __init__(self, keep_s: int = 600) -> None:
        self._c0 = -1.0  # no step started (installed in the middle of one)
        self._seconds: deque[tuple[int, float, str]] = deque(maxlen=keep_s)
        self.steps = 0
        self.cpu_ms = 0.0
        """CPU of every task step so far."""
        self._own: dict[trio.lowlevel.Task, float] = {}  # requests' own steps
        self._waits: deque[tuple[int, float, int]] = deque(maxlen=keep_s)

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._c0 = time.thread_time()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if self._c0 < 0:
            return
        ms = (time.thread_time() - self._c0) * 1000
        self._c0 = -1.0
        self.steps += 1
        self.cpu_ms += ms
        if self._own and task in self._own:
            self._own[task] += ms
        sec = int(time.time())
        s = self._seconds
        if s and s[-1][0] == sec:
            if ms > s[-1][1]:
                s[-1] = (sec, ms, task.name)
        else:
            s.append((sec, ms, task.name))

    def recent(self, min_ms: float = 1.0) -> list[tuple[int, float, str]]:
        """(unix second, longest step's CPU ms, its task) for seconds with a step of at
        least `min_ms` (JSON-ready)."""
        return [(sec, round(ms, 2), name) for sec, ms, name in self._seconds if ms >= min_ms]

    def start_request(self) -> tuple[trio.lowlevel.Task, float]:
        """A request starts in the current task: see `end_request`."""
        task = trio.lowlevel.current_task()
        self._own[task] = 0.0
        return task, self.cpu_ms

    def end_request(self, token: tuple[trio.lowlevel.Task, float], record: bool = True) -> None:
        """The request of `token` ended: the loop CPU that went to *other* tasks while
        it was in flight (what it waited for, whatever the machine's load) joins
        this second's figures (`waits`) when `record`."""
        task, c0 = token
        own = self._own.pop(task, 0.0)
        if not record:
            return
        ms = self.cpu_ms - c0 - own
        sec = int(time.time())
        w = self._waits
        if w and w[-1][0] == sec:
            w[-1] = (sec, max(ms, w[-1][1]), w[-1][2] + 1)
        else:
            w.append((sec, ms, 1))

    def waits(self) -> list[tuple[int, float, int]]:
        """(unix second, the longest wait of a request that ended in it in loop CPU ms,
        how many ended) for the last seconds with requests (JSON-ready)."""
        return [(sec, round(ms, 2), n) for sec, ms, n in self._waits]
