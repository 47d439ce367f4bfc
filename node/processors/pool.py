"""Run processors in worker processes so CPU-bound work uses every core and never blocks
trio.

Workers come from a "forkserver" (default) or "spawn" context, never "fork": the parent
runs trio and libp2p threads, and forking a threaded process can deadlock the child.
Each call ships the (picklable) processor with the data, so workers need no registry
and plugins defined anywhere importable work.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import CancelledError, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import trio

from ..errors import BidmeshError, ProcessingError, UsageError
from . import ProcessContext, Processor, load_processors, run_chain

__all__ = ["WorkerPool"]

DEFAULT_TIMEOUT_S = 30.0
_CLOSE_GRACE_S = 5.0


def _work(procs: Mapping[str, Processor], services: Sequence[str], data: bytes,
          ctx: ProcessContext) -> bytes:
    """Runs in the worker. Anything a plugin raises becomes a picklable ProcessingError."""
    try:
        return run_chain(procs, services, data, ctx)
    except ProcessingError:
        raise
    except Exception as e:  # third-party plugin code: report it, don't lose the worker
        raise ProcessingError(f"{'→'.join(services)} failed: {type(e).__name__}: {e}") from None


async def _join(executor: ProcessPoolExecutor) -> None:
    # trio_typing's stale stubs shadow trio's own annotations and lack abandon_on_cancel.
    await trio.to_thread.run_sync(  # type: ignore[call-arg]
        executor.shutdown, True, abandon_on_cancel=True
    )


class WorkerPool:
    """`await run(name, data, ctx)` in a worker process.

    At most `max_in_flight` calls (default: `workers`) are submitted at once; more
    callers wait on a trio semaphore, which is the backpressure. A call that exceeds its
    timeout, or whose worker dies, raises ProcessingError. Either way the executor is
    replaced; other calls that were running on it then fail with ProcessingError too
    (retryable: the dataplane re-dispatches).
    """

    def __init__(
        self,
        processors: Mapping[str, Processor] | None = None,
        workers: int | None = None,
        *,
        max_in_flight: int | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        mp_context: str = "forkserver",
    ) -> None:
        workers = workers if workers is not None else (os.cpu_count() or 1)
        if workers < 1:
            raise UsageError(f"WorkerPool needs at least one worker, got {workers}")
        if mp_context not in ("forkserver", "spawn"):
            raise UsageError(f"mp_context must be 'forkserver' or 'spawn', not {mp_context!r}")
        if timeout_s <= 0:
            raise UsageError("WorkerPool timeout_s must be positive")
        self.processors = dict(load_processors() if processors is None else processors)
        self.workers = workers
        self.timeout_s = timeout_s
        self.crashes = 0
        self.timeouts = 0
        self._ctx = multiprocessing.get_context(mp_context)
        self._limit = trio.Semaphore(max_in_flight or workers)
        self._executor: ProcessPoolExecutor | None = None
        self._retired: list[ProcessPoolExecutor] = []
        self._closed = False

    def _current(self) -> ProcessPoolExecutor:
        if self._executor is None:
            self._executor = ProcessPoolExecutor(self.workers, mp_context=self._ctx)
        return self._executor

    def _retire(self, executor: ProcessPoolExecutor) -> None:
        """Kill a broken or stuck executor; the next call starts a fresh one."""
        if self._executor is executor:
            self._executor = None
        if executor in self._retired:
            return
        self._retired.append(executor)
        # The executor has no public way to stop a running job; killing its workers is
        # the only bound on a stuck processor.
        for proc in list((executor._processes or {}).values()):
            with contextlib.suppress(ProcessLookupError):  # already gone
                proc.kill()
        executor.shutdown(wait=False, cancel_futures=True)

    async def _reap(self) -> None:
        """Join retired executors (their workers are dead, so this is quick)."""
        while self._retired:
            executor = self._retired.pop()
            with trio.CancelScope(shield=True, deadline=trio.current_time() + _CLOSE_GRACE_S):
                await _join(executor)

    async def run(
        self, name: str, data: bytes, ctx: ProcessContext, *, timeout_s: float | None = None
    ) -> bytes:
        return await self.run_chain((name,), data, ctx, timeout_s=timeout_s)

    async def run_chain(
        self,
        services: Sequence[str],
        data: bytes,
        ctx: ProcessContext,
        *,
        timeout_s: float | None = None,
    ) -> bytes:
        """Apply several services in one worker round trip (`ctx.step` = first position)."""
        if self._closed:
            raise UsageError("WorkerPool is closed")
        procs = {}
        for name in services:
            if name not in self.processors:
                raise ProcessingError(f"no processor named {name!r} in this pool")
            procs[name] = self.processors[name]
        async with self._limit:
            executor = self._current()
            try:
                fut = executor.submit(_work, procs, tuple(services), data, ctx)
            except BrokenProcessPool:
                self._retire(executor)
                executor = self._current()
                fut = executor.submit(_work, procs, tuple(services), data, ctx)
            done = trio.Event()
            token = trio.lowlevel.current_trio_token()

            def wake(_: Future[bytes]) -> None:
                with contextlib.suppress(trio.RunFinishedError):  # nobody left to wake
                    token.run_sync_soon(done.set)

            fut.add_done_callback(wake)
            try:
                with trio.move_on_after(timeout_s or self.timeout_s) as scope:
                    await done.wait()
            finally:
                if not fut.done() and not fut.cancel():
                    # Cancelled or timed out while running: the worker is busy for an
                    # unknown time, so it is killed rather than left holding a core.
                    self._retire(executor)
            if scope.cancelled_caught:
                self.timeouts += 1
                await self._reap()
                raise ProcessingError(f"{'→'.join(services)} timed out on segment {ctx.seq}")
            try:
                return fut.result()
            except BidmeshError:
                raise
            except (BrokenProcessPool, CancelledError) as e:
                self.crashes += 1
                self._retire(executor)
                await self._reap()
                raise ProcessingError(
                    f"worker process died running {'→'.join(services)} on segment {ctx.seq}"
                ) from e
            except Exception as e:  # e.g. an unpicklable processor or result
                raise ProcessingError(
                    f"{'→'.join(services)} could not run in a worker: {type(e).__name__}: {e}"
                ) from e

    async def aclose(self) -> None:
        """Stop the workers: running jobs get a short grace period, then are killed."""
        self._closed = True
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
            with trio.CancelScope(shield=True, deadline=trio.current_time() + _CLOSE_GRACE_S):
                await _join(executor)
            if executor._processes is not None:  # grace expired: still running
                self._retire(executor)
        await self._reap()

    async def __aenter__(self) -> WorkerPool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
