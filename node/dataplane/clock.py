"""The dataplane's clocks: `mono_ms` (trio's clock: rates, meters and segment ages,
virtual under trio's MockClock in tests) and `wall_clock_ms` (lease windows, which
are wall-clock times in the ledger)."""

from __future__ import annotations

import time

import trio

__all__ = ["mono_ms", "wall_clock_ms"]


def mono_ms() -> int:
    return int(trio.current_time() * 1000)


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000
