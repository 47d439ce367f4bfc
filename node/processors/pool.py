"""Run processors in worker processes so CPU-bound work uses every core and never blocks
trio.

Workers come from a "forkserver" (default) or "spawn" context, never "fork": the parent
runs trio and libp2p threads, and forking a threaded process can deadlock the child.
Each call ships the (picklable) processor with the data, so workers need no registry
and plugins defined anywhere importable work.

Segment bytes travel through shared-memory slots, not through pickles in the job and
result pipes: the parent copies a segment into a free slot, the job names the slot, and
the worker writes its output back into the same slot. The parent's cost per segment is
then two memcpys and a small pickle, small enough that it does not starve two workers
of CPU on a two-core machine (pickling 1 MiB segments through the executor's pipes cost
the parent ~1 ms per segment and kept two workers at ~1.2x one core). A segment or output
larger than a slot, or a call that finds no free slot, falls back to the pipes. The
pool owns every slot: it creates them, and unlinks them on `aclose` (or, if the pool is
dropped unclosed, when it is collected); workers only map them. A slot goes back to the
free list only when the job that used it is over (done, dropped, or its worker dead), so
a worker that outlives its caller never writes into another call's slot.
"""

from __future__ import annotations

import contextlib
import fcntl
import multiprocessing
import os
import secrets
import threading
import weakref
from collections.abc import Mapping, Sequence
from concurrent.futures import CancelledError, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.shared_memory import SharedMemory

import trio

from ..errors import BidmeshError, ProcessingError, UsageError
from . import ProcessContext, Processor, load_processors, run_chain

__all__ = ["WorkerPool"]

DEFAULT_TIMEOUT_S = 30.0
_CLOSE_GRACE_S = 5.0
_PIPE_BYTES = 1 << 20
# Holds a 1 MiB segment (the dataplane's largest) and its output even when that grows a
# little (incompressible zstd input, aes-gcm's tag).
DEFAULT_SLOT_BYTES = (1 << 20) + (64 << 10)
SHM_PREFIX = "bidmesh-pool-"

# Worker side: slots mapped so far, by name. A worker lives no longer than its pool, and
# a pool's slots are fixed, so this stays small.
_mapped: dict[str, SharedMemory] = {}


def _slot(name: str) -> SharedMemory:
    shm = _mapped.get(name)
    if shm is None:
        # Mapping registers the name with the resource tracker that the worker shares
        # with the pool's process; the set there ignores the duplicate, and the pool's
        # unlink unregisters it.
        shm = _mapped[name] = SharedMemory(name)
    return shm


def _view(shm: SharedMemory) -> memoryview:
    buf = shm.buf
    if buf is None:
        raise ProcessingError("shared-memory slot already released (the pool was closed)")
    return buf


def _work(procs: Mapping[str, Processor], services: Sequence[str], data: bytes | None,
          ctx: ProcessContext, slot: str | None = None, size: int = 0) -> bytes | int:
    """Runs in the worker. Anything a plugin raises becomes a picklable ProcessingError.

    With `slot`, the input is the slot's first `size` bytes (and `data` is None); an
    output that fits goes back into the slot and the return value is its length.
    """
    try:
        if slot is None:
            return run_chain(procs, services, data or b"", ctx)
        buf = _view(_slot(slot))
        out = run_chain(procs, services, bytes(buf[:size]), ctx)
        if len(out) > len(buf):
            return out
        buf[:len(out)] = out
        return len(out)
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


async def _wait(fut: Future[bytes | int]) -> None:
    """Sleep until a concurrent future is done, without a thread per call."""
    done = trio.Event()
    token = trio.lowlevel.current_trio_token()

    def wake(_: Future[bytes | int]) -> None:
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


def _unlink_all(slots: list[SharedMemory]) -> None:
    """Unmap and remove every slot; safe to call twice (also a GC finalizer)."""
    while slots:
        shm = slots.pop()
        with contextlib.suppress(BufferError):  # a view still exported: the unlink suffices
            shm.close()
        with contextlib.suppress(FileNotFoundError):
            shm.unlink()


class WorkerPool:
    """`await run(name, data, ctx)` in a worker process.

    At most `max_in_flight` calls (default: `workers`) are submitted at once; more
    callers wait on a trio semaphore, which is the backpressure. A call that exceeds its
    timeout, or whose worker dies, raises ProcessingError. Either way the executor is
    replaced; other calls that were running on it then fail with ProcessingError too
    (retryable: the dataplane re-dispatches). A caller that is cancelled abandons its
    job: a queued one is dropped, a running one completes unobserved.

    Up to `max_in_flight + workers` shared-memory slots of `slot_bytes` each carry
    segments to and from the workers (see the module docstring); they are created on
    first use and removed by `aclose`.
    """

    def __init__(
        self,
        processors: Mapping[str, Processor] | None = None,
        workers: int | None = None,
        *,
        max_in_flight: int | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        mp_context: str = "forkserver",
        slot_bytes: int = DEFAULT_SLOT_BYTES,
    ) -> None:
        workers = workers if workers is not None else (os.cpu_count() or 1)
        if workers < 1:
            raise UsageError(f"WorkerPool needs at least one worker, got {workers}")
        if mp_context not in ("forkserver", "spawn"):
            raise UsageError(f"mp_context must be 'forkserver' or 'spawn', not {mp_context!r}")
        if timeout_s <= 0:
            raise UsageError("WorkerPool timeout_s must be positive")
        if slot_bytes < 0:
            raise UsageError("WorkerPool slot_bytes must be >= 0 (0: no shared memory)")
        self.processors = dict(load_processors() if processors is None else processors)
        self.workers = workers
        self.timeout_s = timeout_s
        self.crashes = 0
        self.timeouts = 0
        self._ctx = multiprocessing.get_context(mp_context)
        if mp_context == "forkserver":
            # Workers fork from a server that already imported zstd and cryptography.
            self._ctx.set_forkserver_preload(["node.processors.builtin",
                                              "node.processors.pool"])
        self._limit = trio.Semaphore(max_in_flight or workers)
        self.slot_bytes = slot_bytes
        self._max_slots = (max_in_flight or workers) + workers if slot_bytes else 0
        self._slots: list[SharedMemory] = []  # every slot, for cleanup
        self._free: list[SharedMemory] = []
        self._finalizer = weakref.finalize(self, _unlink_all, self._slots)
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

    @property
    def slot_names(self) -> tuple[str, ...]:
        """Shared-memory slots this pool holds now (empty after `aclose`)."""
        return tuple(shm.name for shm in self._slots)

    def _take_slot(self, size: int) -> SharedMemory | None:
        """A free slot for `size` bytes, creating one if under the cap; else None."""
        if size > self.slot_bytes:
            return None
        if self._free:
            return self._free.pop()
        if len(self._slots) >= self._max_slots:
            return None  # held by abandoned jobs: use the pipes meanwhile
        shm = SharedMemory(f"{SHM_PREFIX}{os.getpid()}-{secrets.token_hex(6)}", create=True,
                           size=self.slot_bytes)
        self._slots.append(shm)
        return shm

    def _give_back(self, shm: SharedMemory) -> None:
        if shm in self._slots:  # not after aclose
            self._free.append(shm)

    def _give_back_when_done(self, fut: Future[bytes | int], shm: SharedMemory) -> None:
        """Return the slot once its job can no longer touch it."""
        if fut.done():
            self._give_back(shm)
            return
        token = trio.lowlevel.current_trio_token()

        def done(_: Future[bytes | int]) -> None:
            with contextlib.suppress(trio.RunFinishedError):  # run over: aclose is too
                token.run_sync_soon(self._give_back, shm)

        fut.add_done_callback(done)

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
            shm = self._take_slot(len(data))
            if shm is None:
                job: tuple[object, ...] = (_work, procs, tuple(services), data, ctx)
            else:
                _view(shm)[:len(data)] = data
                job = (_work, procs, tuple(services), None, ctx, shm.name, len(data))
            executor = self._current()
            fut: Future[bytes | int] | None = None
            try:
                try:
                    fut = executor.submit(*job)  # type: ignore[arg-type]
                except BrokenProcessPool:
                    self._retire(executor)
                    executor = self._current()
                    fut = executor.submit(*job)  # type: ignore[arg-type]
                return await self._outcome(executor, fut, services, ctx, shm, timeout_s)
            finally:
                if shm is not None:
                    if fut is None:
                        self._give_back(shm)
                    else:
                        self._give_back_when_done(fut, shm)

    async def _outcome(
        self,
        executor: ProcessPoolExecutor,
        fut: Future[bytes | int],
        services: Sequence[str],
        ctx: ProcessContext,
        shm: SharedMemory | None,
        timeout_s: float | None,
    ) -> bytes:
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
            out = fut.result()
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
        if isinstance(out, int):
            if shm is None or not 0 <= out <= shm.size:
                raise ProcessingError(f"worker returned a bad output length {out}")
            return bytes(_view(shm)[:out])
        return out

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
        # The workers are gone (or killed and past caring): nothing maps a slot any more
        # that could write into one.
        self._free.clear()
        self._finalizer()

    async def __aenter__(self) -> WorkerPool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
