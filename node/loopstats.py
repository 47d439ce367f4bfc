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

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._c0 = time.thread_time()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if self._c0 < 0:
            return
        ms = (time.thread_time() - self._c0) * 1000
        self._c0 = -1.0
        self.steps += 1
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
