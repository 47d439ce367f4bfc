"""node/loopstats.py: the longest event-loop step per second, in CPU time, named."""

from __future__ import annotations

import time

import trio

from node.loopstats import LoopSteps


async def hog() -> None:
    t0 = time.thread_time()
    while time.thread_time() - t0 < 0.02:  # 20 ms of CPU in one step, then yield
        pass
    await trio.sleep(0)


async def test_the_longest_step_is_recorded_with_its_task() -> None:
    steps = LoopSteps()
    trio.lowlevel.add_instrument(steps)
    try:
        async with trio.open_nursery() as n:
            n.start_soon(hog, name="the-hog")
    finally:
        trio.lowlevel.remove_instrument(steps)
    recent = steps.recent(min_ms=10.0)
    assert recent and max(recent, key=lambda r: r[1])[2] == "the-hog"
    assert max(ms for _, ms, _ in recent) >= 20.0
    assert steps.steps >= 2
