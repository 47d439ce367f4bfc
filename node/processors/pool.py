"""Run processors in worker processes so CPU-bound work uses every core and never blocks
trio.

Workers come from a "forkserver" (default) or "spawn" context, never "fork": the parent
runs trio and libp2p threads, and forking a threaded process can deadlock the child.
Each call ships the (picklable) processor with the data, so workers need no registry
and plugins defined anywhere importable work.
"""

from __future__ import annotations

import contextlib
import fcntl
import multiprocessing
import os
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import CancelledError, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import trio

from ..errors import BidmeshError, ProcessingError, UsageError
from . import ProcessContext, Processor, load_processors, run_chain

__all__ = ["WorkerPool"]

DEFAULT_TIMEOUT_S = 30.0
_CLOSE_GRACE_S = 5.0
_PIPE_BYTES = 1 << 20


def _work(procs: Mapping[str, Processor], services: Sequence[str], data: bytes,
          ctx: ProcessContext) -> bytes:
    """Runs in the worker. Anything a plugin raises becomes a picklable ProcessingError."""
    try:
        return run_chain(procs, services, data, ctx)
    except ProcessingError:
        raise
    except Exception as e:  # third-party plugin code: report it, don't lose the worker
        raise ProcessingError(f"{'→'.join(services)} failed: {type(e).__name__}: {e}") from None


async def _join(thread: threading.Thread, grace_s: float) -> bool:
    """Join a thread without blocking trio, even when cancelled; False if still alive."""
    with trio.CancelScope(shield=True, deadline=trio.current_time() + grace_s):
        # trio_typing's stale stubs shadow trio's own annotations (no abandon_on_cancel).
        await trio.to_thread.run_sync(  # type: ignore[call-arg]
            thread.join, abandon_on_cancel=True
        )
    return not thread.is_alive()


async def _wait(fut: Future[bytes]) -> None:
    """Sleep until a concurrent future is done, without a thread per call."""
    done = trio.Event()
    token = trio.lowlevel.current_trio_token()

    def wake(_: Future[bytes]) -> None:
        with contextlib.suppress(trio.RunFinishedError):  # the run ended: nobody to wake
            token.run_sync_soon(done.set)

    fut.add_done_callback(wake)
    await done.wait()


def _manager_thread(executor: ProcessPoolExecutor) -> threading.Thread | None:
    # typeshed mistypes this private attribute; it is the thread that owns the workers.
    thread: threading.Thread | None = getattr(executor, "_executor_manager_thread", None)
    return thread


def _grow_pipes(executor: ProcessPoolExecutor) -> None:
    """Let a whole segment sit in the job/result pipes (Linux F_SETPIPE_SZ).

    With the default 64 KiB pipes, sending the next input blocks until the worker is
    done with the current one, so transfers never overlap compute; measured here this
    costs 15–45 % of two-worker zstd throughput. Best effort: other OSes, or a lower
    /proc/sys/fs/pipe-max-size, keep the default.
    """
    setsz = getattr(fcntl, "F_SETPIPE_SZ", None)
    if setsz is None:
        return
    for queue in (getattr(executor, "_call_queue", None), executor._result_queue):
        for conn_name in ("_writer", "_reader"):
            conn = getattr(queue, conn_name, None)
            if conn is None:
                continue
            with contextlib.suppress(OSError):  # EPERM above pipe-max-size: keep default
                fcntl.fcntl(conn.fileno(), setsz, _PIPE_BYTES)
            break  # both ends share one pipe buffer


class WorkerPool:
    """`await run(name, data, ctx)` in a worker process.

    At most `max_in_flight` calls (default: `workers`) are submitted at once; more
    callers wait on a trio semaphore, which is the backpressure. A call that exceeds its
    timeout, or whose worker dies, raises ProcessingError. Either way the executor is
    replaced; other calls that were running on it then fail with ProcessingError too
    (retryable: the dataplane re-dispatches). A caller that is cancelled abandons its
    job: a queued one is dropped, a running one completes unobserved.
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
        if mp_context == "forkserver":
            # Workers fork from a server that already imported zstd and cryptography.
            self._ctx.set_forkserver_preload(["node.processors.builtin"])
        self._limit = trio.Semaphore(max_in_flight or workers)
        self._executor: ProcessPoolExecutor | None = None
        self._reaping: list[threading.Thread] = []
        self._closed = False

    def _current(self) -> ProcessPoolExecutor:
        if self._executor is None:
            self._executor = ProcessPoolExecutor(self.workers, mp_context=self._ctx)
            _grow_pipes(self._executor)
        return self._executor

    def _retire(self, executor: ProcessPoolExecutor) -> None:
        """Kill a broken or stuck executor; the next call starts a fresh one."""
        if self._executor is executor:
            self._executor = None
        # The executor has no public way to stop a running job; killing its workers is
        # the only bound on a stuck processor. After shutdown these fields are cleared,
        # so retiring twice is harmless.
        for proc in list((executor._processes or {}).values()):
            with contextlib.suppress(ProcessLookupError):  # already gone
                proc.kill()
        thread = _manager_thread(executor)
        executor.shutdown(wait=False, cancel_futures=True)
        if thread is not None:
            self._reaping.append(thread)

    async def _reap(self) -> None:
        """Join the manager threads of retired executors (workers are dead: quick)."""
        while self._reaping:
            await _join(self._reaping.pop(), _CLOSE_GRACE_S)

    async def start(self) -> None:
        """Start every worker now rather than on first use (first-segment latency)."""
        ctx = ProcessContext(bytes(32), b"warm-up", 0)
        async with trio.open_nursery() as nursery:
            for _ in range(self.workers):
                nursery.start_soon(self._warm, ctx)

    async def _warm(self, ctx: ProcessContext) -> None:
        async with self._limit:
            await _wait(self._current().submit(_work, {}, (), b"", ctx))

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
            try:
                with trio.move_on_after(timeout_s or self.timeout_s) as scope:
                    await _wait(fut)
            finally:
                # Drop a job that has not started. One that has (the caller went away)
                # finishes on its own: processors are bounded, and killing the executor
                # would fail every other caller's job too.
                fut.cancel()
            if scope.cancelled_caught:
                if not fut.done():
                    # Over its time limit and still running: the only way to get the
                    # core back is to kill the worker.
                    self._retire(executor)
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
            procs = list((executor._processes or {}).values())
            thread = _manager_thread(executor)
            executor.shutdown(wait=False, cancel_futures=True)  # workers exit when idle
            if thread is not None and not await _join(thread, _CLOSE_GRACE_S):
                for proc in procs:  # grace expired: a job is stuck
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                self._reaping.append(thread)
        await self._reap()

    async def __aenter__(self) -> WorkerPool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
