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


async def test_a_request_records_what_it_waited_for_not_its_own_steps() -> None:
    """While a request is in flight, two other tasks run 20 ms of CPU each: it waited
    for 40 ms (its own steps are not counted); a request ended unrecorded adds no
    figure."""
    steps = LoopSteps()

    async def unrecorded() -> None:
        token = steps.start_request()
        await hog()
        steps.end_request(token, record=False)

    trio.lowlevel.add_instrument(steps)
    try:
        token = steps.start_request()
        await hog()  # the request's own 20 ms
        async with trio.open_nursery() as n:
            n.start_soon(hog)
            n.start_soon(unrecorded)
        steps.end_request(token)
    finally:
        trio.lowlevel.remove_instrument(steps)
    waits = steps.waits()
    assert sum(count for _, _, count in waits) == 1
    longest = max(ms for _, ms, _ in waits)
    assert 40.0 <= longest < 60.0
