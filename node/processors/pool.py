"""Run processors in worker processes so CPU-bound work uses every core and never blocks
trio.

Workers come from a "forkserver" (default) or "spawn" context, never "fork": the parent
runs trio and libp2p threads, and forking a threaded process can deadlock the child.
Each call ships the (picklable) processor with the data, so workers need no registry
and plugins defined anywhere importable work.

The pool drives its workers itself, from trio, with no helper threads: each worker has a
Unix socket to the pool and answers the jobs sent on it in order, one frame each (a
4-byte length, then a pickle). Segment bytes travel through shared-memory slots, not in
those frames: the pool copies a segment into a free slot, the job names the slot, and
the worker writes its output back into the same slot. The pool's cost per segment is then
two memcpys, two small pickles and a socket round trip (~0.45 ms of CPU per 1 MiB
segment, measured on two cores), little enough that it does not starve two workers. (A
ProcessPoolExecutor pickling 1 MiB segments through its pipes cost the parent ~0.9 ms
per segment, the workers as much again, and transfers did not overlap compute: two
workers reached ~1.2x one core of in-process zstd. With slots, still through the
executor and its threads, ~1.6x; without the threads, ~1.65-1.7x, against ~1.95x for two
bare processes.) A segment or output larger than a slot, or a call that finds no free
slot, travels in the frame instead.

The pool owns every slot: it creates them, and unlinks them on `aclose` (or, for a pool
dropped unclosed, when it is collected); workers only map them. A slot goes back to the
free list only when the job that used it is over; the slots of a worker that dies or is
killed are unlinked, so a worker that outlives its caller never writes into another
call's slot.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import secrets
import signal
import socket
import struct
import weakref
from collections import deque
from collections.abc import Mapping, Sequence
from multiprocessing import get_context
from multiprocessing.context import ForkServerContext, SpawnContext
from multiprocessing.process import BaseProcess
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import trio

from ..errors import BidmeshError, ProcessingError, UsageError
from . import ProcessContext, Processor, load_processors, run_chain

__all__ = ["DEFAULT_SLOT_BYTES", "WorkerPool"]

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 30.0
_CLOSE_GRACE_S = 5.0
_SOCKET_BYTES = 1 << 20  # socket buffers: room for a whole segment sent in a frame
# Holds a 1 MiB segment (the dataplane's largest) and its output even when that grows a
# little (incompressible zstd input, aes-gcm's tag).
DEFAULT_SLOT_BYTES = (1 << 20) + (64 << 10)
SHM_PREFIX = "bidmesh-pool-"
_LEN = struct.Struct(">I")
_MAX_FRAME = (1 << 32) - 1

# ------------------------------------------------------------------------ worker side

# Slots mapped so far, by name. A worker lives no longer than its pool, and a pool's
# slots are few, so this stays small.
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
    """One job. Anything a plugin raises becomes a picklable ProcessingError.

    With `slot`, the input is the slot's first `size` bytes (and `data` is None); an
    output that fits goes back into the slot and the return value is its length.
    """
    try:
        if slot is None:
            return run_chain(procs, services, data or b"", ctx)
        buf = _view(_slot(slot))
        out = run_chain(procs, services, bytes(buf[:size]), ctx)
        if not isinstance(out, bytes) or len(out) > len(buf):
            return out
        buf[:len(out)] = out
        return len(out)
    except ProcessingError:
        raise
    except Exception as e:  # third-party plugin code: report it, don't lose the worker
        raise ProcessingError(f"{'→'.join(services)} failed: {type(e).__name__}: {e}") from None


def _serve(sock: socket.socket) -> None:
    """A worker's main loop: answer each job frame with one result frame, until EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the pool decides when workers stop
    with sock, sock.makefile("rb") as jobs:
        while True:
            head = jobs.read(_LEN.size)
            if len(head) < _LEN.size:
                return  # the pool closed its end
            body = jobs.read(_LEN.unpack(head)[0])
            try:
                job = pickle.loads(body)
                # Anything but a tuple warms the worker up (`WorkerPool.start`): loading
                # it imported the modules of the processors it holds.
                reply: tuple[bool, object] = (True, _work(*job) if isinstance(job, tuple) else 0)
            except ProcessingError as e:
                reply = (False, e)
            except Exception as e:  # e.g. a plugin class this worker cannot import
                reply = (False, ProcessingError(
                    f"job could not run in a worker: {type(e).__name__}: {e}"))
            try:
                frame = pickle.dumps(reply, pickle.HIGHEST_PROTOCOL)
            except Exception as e:  # a plugin returned something unpicklable
                frame = pickle.dumps((False, ProcessingError(
                    f"result could not leave the worker: {type(e).__name__}: {e}")))
            try:
                sock.sendall(_LEN.pack(len(frame)) + frame)
            except OSError:
                return  # the pool is gone


# ------------------------------------------------------------------------ pool side


class _Job:
    """A job sent to a worker; `outcome` is set once its reply is read or it is lost."""

    __slots__ = ("abandoned", "outcome", "slot")

    def __init__(self, slot: SharedMemory | None) -> None:
        self.slot = slot
        self.outcome: tuple[bool, object] | None = None
        self.abandoned = False


class _Worker:
    def __init__(self, proc: BaseProcess, raw: socket.socket) -> None:
        self.proc = proc
        self.raw = raw  # for the GC finalizer, which may run outside trio
        self.sock = trio.socket.from_stdlib_socket(raw)
        self.pending: deque[_Job] = deque()  # sent, reply not read yet: reply order
        self.inbox = bytearray()  # a reply read in part
        self.send_lock = trio.Lock()
        self.read_lock = trio.Lock()
        self.dead = False


_DIED = (False, None)  # outcome of a job whose worker died or was killed
_TIMED_OUT = (False, False)  # what _round_trip returns when the caller's time ran out


def _unlink(shm: SharedMemory) -> None:
    with contextlib.suppress(BufferError):  # a view still exported: the unlink suffices
        shm.close()
    with contextlib.suppress(FileNotFoundError):
        shm.unlink()


def _release(slots: list[SharedMemory], workers: list[_Worker]) -> None:
    """Remove every slot and hang up on every worker (which then exits); safe to call
    twice. `aclose` calls it, and so does the GC for a pool dropped unclosed."""
    while slots:
        _unlink(slots.pop())
    while workers:
        workers.pop().raw.close()


class WorkerPool:
    """`await run(name, data, ctx)` in a worker process.

    At most `max_in_flight` calls (default: `2 * workers`) are in the workers at once,
    each sent to the worker with the fewest queued; more callers wait on a trio
    semaphore, which is the backpressure. Two per worker means a worker's next input is
    already waiting when it finishes one (with one, each worker idles for a round trip
    through trio per job: ~10 % of zstd throughput). A job's timeout counts the job
    queued ahead of it on its worker. A call that exceeds its timeout, or whose worker dies,
    raises ProcessingError. Either way that worker is replaced; other calls queued on it
    then fail with ProcessingError too (retryable: the dataplane re-dispatches). A
    caller that is cancelled abandons its job, which completes unobserved.

    Up to `max_in_flight + workers` shared-memory slots of `slot_bytes` each carry
    segments to and from the workers (see the module docstring; 0 turns them off); they
    are created on first use and removed by `aclose`.
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
        self.slot_bytes = slot_bytes
        self.crashes = 0
        self.timeouts = 0
        self._ctx: ForkServerContext | SpawnContext
        if mp_context == "forkserver":
            self._ctx = get_context("forkserver")
            # Workers fork from a server that already imported zstd and cryptography.
            self._ctx.set_forkserver_preload(["node.processors.builtin",
                                              "node.processors.pool"])
        else:
            self._ctx = get_context("spawn")
        in_flight = max_in_flight or 2 * workers
        self._limit = trio.Semaphore(in_flight)
        self._live: list[_Worker] = []
        self._dying: list[_Worker] = []  # killed or lost, not reaped yet
        self._max_slots = in_flight + workers if slot_bytes else 0
        self._slots: list[SharedMemory] = []  # every slot, for cleanup
        self._free: list[SharedMemory] = []
        self._finalizer = weakref.finalize(self, _release, self._slots, self._live)
        self._closed = False

    @property
    def worker_pids(self) -> tuple[int, ...]:
        """Process ids of the workers in service now."""
        return tuple(w.proc.pid for w in self._live if w.proc.pid is not None)

    @property
    def slot_names(self) -> tuple[str, ...]:
        """Shared-memory slots this pool holds now (empty after `aclose`)."""
        return tuple(shm.name for shm in self._slots)

    # -------------------------------------------------------------------- slots

    def _take_slot(self, size: int) -> SharedMemory | None:
        """A free slot for `size` bytes, creating one if under the cap; else None."""
        if size > self.slot_bytes:
            return None
        if self._free:
            return self._free.pop()
        if len(self._slots) >= self._max_slots:
            return None  # held by abandoned jobs: send the bytes in the frame meanwhile
        name = f"{SHM_PREFIX}{os.getpid()}-{secrets.token_hex(6)}"
        try:
            shm = SharedMemory(name, create=True, size=self.slot_bytes)
        except OSError as e:  # no /dev/shm, or no room in it
            self._no_more_slots(e)
            return None
        # Reserve the pages now: on a full tmpfs a write into a sparse slot would kill
        # this process with SIGBUS instead of raising.
        fd = getattr(shm, "_fd", -1)
        if fd >= 0 and hasattr(os, "posix_fallocate"):
            try:
                os.posix_fallocate(fd, 0, self.slot_bytes)
            except OSError as e:
                _unlink(shm)
                self._no_more_slots(e)
                return None
        self._slots.append(shm)
        return shm

    def _no_more_slots(self, e: OSError) -> None:
        log.warning("worker pool: cannot create a %d-byte shared-memory slot (%s); segments "
                    "go through the worker sockets instead (slower)", self.slot_bytes, e)
        self._max_slots = len(self._slots)

    def _give_back(self, shm: SharedMemory) -> None:
        if shm in self._slots:  # not after aclose, nor once dropped with a dead worker
            self._free.append(shm)

    def _drop_slot(self, shm: SharedMemory) -> None:
        """A slot a lost worker may still write into: nobody gets it again."""
        if shm in self._slots:
            self._slots.remove(shm)
            _unlink(shm)

    # -------------------------------------------------------------------- workers

    def _spawn(self) -> _Worker:
        ours, theirs = socket.socketpair()
        try:
            for s in (ours, theirs):
                for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                    with contextlib.suppress(OSError):  # best effort: keep the default
                        s.setsockopt(socket.SOL_SOCKET, opt, _SOCKET_BYTES)
            proc = self._ctx.Process(target=_serve, args=(theirs,), daemon=True,
                                     name="bidmesh-worker")
            proc.start()
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()  # the worker has its own copy
        ours.setblocking(False)
        worker = _Worker(proc, ours)
        self._live.append(worker)
        return worker

    def _pick(self) -> _Worker:
        """The live worker with the fewest jobs queued, starting workers as needed."""
        while len(self._live) < self.workers:
            self._spawn()
        return min(self._live, key=lambda w: len(w.pending))

    def _lose(self, worker: _Worker) -> None:
        """Take a dead or stuck worker out of service and fail its jobs.

        Kills it (it may be stuck in a job); its slots are unlinked rather than reused
        because it could still be writing into one as the signal lands.
        """
        if worker.dead:
            return
        worker.dead = True
        self._live.remove(worker)
        self._dying.append(worker)
        with contextlib.suppress(ProcessLookupError, ValueError):  # gone, or closed
            worker.proc.kill()
        worker.sock.close()  # wakes any task waiting on it
        while worker.pending:
            job = worker.pending.popleft()
            job.outcome = _DIED
            if job.slot is not None:
                self._drop_slot(job.slot)

    async def _reap(self) -> None:
        """Wait (bounded) for lost workers to exit, so no zombie or stray slot writer."""
        while self._dying:
            worker = self._dying.pop()
            bound = trio.CancelScope(shield=True, deadline=trio.current_time() + _CLOSE_GRACE_S)
            with bound, contextlib.suppress(ValueError):  # ValueError: already closed
                await trio.lowlevel.wait_readable(worker.proc.sentinel)
            with contextlib.suppress(ValueError):
                worker.proc.join(0)
                if worker.proc.exitcode is not None:
                    worker.proc.close()

    async def _send(self, worker: _Worker, job: _Job, frame: bytes) -> None:
        """Queue `job` on `worker` and send its frame; a partial send loses the worker."""
        async with worker.send_lock:
            if worker.dead:
                raise trio.BrokenResourceError("worker lost")
            worker.pending.append(job)
            view = memoryview(frame)
            try:
                # Bounded and shielded: a frame cut in half would garble the stream.
                with trio.CancelScope(shield=True,
                                      deadline=trio.current_time() + self.timeout_s):
                    while view:
                        view = view[await worker.sock.send(view):]
            except (OSError, trio.ClosedResourceError) as e:
                if job not in worker.pending:
                    return  # the worker was lost meanwhile, and the job with it (_DIED)
                # The frame did not arrive whole, so the worker never saw the job and its
                # slot is untouched: the caller may send it elsewhere.
                worker.pending.remove(job)
                if not worker.dead:  # not closed by us: it died
                    self.crashes += 1
                self._lose(worker)
                raise trio.BrokenResourceError("worker lost") from e
            if view and job in worker.pending:  # the worker is stuck in a job
                worker.pending.remove(job)
                self.timeouts += 1
                self._lose(worker)
                raise trio.BrokenResourceError("worker stopped reading")

    async def _read_reply(self, worker: _Worker) -> None:
        """Read one reply frame and settle the oldest pending job with it."""
        while True:
            if len(worker.inbox) >= _LEN.size:
                size = _LEN.unpack_from(worker.inbox)[0] + _LEN.size
                if len(worker.inbox) >= size:
                    body = bytes(memoryview(worker.inbox)[_LEN.size:size])
                    del worker.inbox[:size]
                    break
            try:
                chunk = await worker.sock.recv(_SOCKET_BYTES)
            except (OSError, trio.ClosedResourceError):
                chunk = b""
            if not chunk:
                if not worker.dead:  # not closed by us: it died
                    self.crashes += 1
                    self._lose(worker)
                return
            worker.inbox += chunk
        job = worker.pending.popleft()
        try:
            outcome = pickle.loads(body)
        except Exception as e:  # cannot happen with our worker; say so if it does
            outcome = (False, ProcessingError(f"unreadable reply from a worker: {e}"))
        job.outcome = outcome
        if job.abandoned and job.slot is not None:
            self._give_back(job.slot)

    async def _wait_reply(self, worker: _Worker, job: _Job) -> None:
        while job.outcome is None and not worker.dead:
            async with worker.read_lock:
                if job.outcome is None and not worker.dead:
                    await self._read_reply(worker)

    # -------------------------------------------------------------------- API

    async def start(self) -> None:
        """Start every worker now rather than on first use (first-segment latency), and
        have each load the pool's processors: a job unpickles its processor, which
        imports the processor's module in the worker, and a plugin's imports can cost
        seconds of CPU (far more on a loaded host) that the first segment would pay."""
        if self._closed:
            raise UsageError("WorkerPool is closed")
        for _ in range(self.workers - len(self._live)):
            self._spawn()
        try:
            frame = pickle.dumps(list(self.processors.values()), pickle.HIGHEST_PROTOCOL)
        except Exception:  # an unpicklable processor: run_chain will say so per call
            frame = pickle.dumps(None)
        async with trio.open_nursery() as nursery:
            for worker in list(self._live):
                nursery.start_soon(self._warm, worker, _LEN.pack(len(frame)) + frame)

    async def _warm(self, worker: _Worker, frame: bytes) -> None:
        async with self._limit:
            job = _Job(None)
            with contextlib.suppress(trio.BrokenResourceError):
                await self._send(worker, job, frame)
                await self._wait_reply(worker, job)
        await self._reap()

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
        what = "→".join(services)
        async with self._limit:
            if self._closed:
                raise UsageError("WorkerPool is closed")
            shm = self._take_slot(len(data))
            args: tuple[Any, ...]
            if shm is None:
                args = (procs, tuple(services), data, ctx)
            else:
                _view(shm)[:len(data)] = data
                args = (procs, tuple(services), None, ctx, shm.name, len(data))
            try:
                body = pickle.dumps(args, pickle.HIGHEST_PROTOCOL)
                if len(body) > _MAX_FRAME:
                    raise ValueError(f"job of {len(body)} bytes")
            except Exception as e:  # e.g. an unpicklable processor
                if shm is not None:
                    self._give_back(shm)
                raise ProcessingError(
                    f"{what} could not run in a worker: {type(e).__name__}: {e}") from e
            job = _Job(shm)
            try:
                outcome = await self._round_trip(job, _LEN.pack(len(body)) + body,
                                                 timeout_s or self.timeout_s)
                if outcome is _TIMED_OUT:
                    self.timeouts += 1
                    await self._reap()
                    raise ProcessingError(f"{what} timed out on segment {ctx.seq}")
                if outcome is _DIED:
                    await self._reap()
                    raise ProcessingError(
                        f"worker process died running {what} on segment {ctx.seq}")
                return self._result(outcome, shm, what)
            finally:
                if job.outcome is None:
                    job.abandoned = True  # its slot comes back with the reply
                elif shm is not None:
                    self._give_back(shm)  # a no-op for the slots of a lost worker

    async def _round_trip(self, job: _Job, frame: bytes,
                          timeout_s: float) -> tuple[bool, object]:
        """The job's outcome, or _TIMED_OUT (its worker is then killed)."""
        worker = self._pick()
        with trio.move_on_after(timeout_s):
            try:
                await self._send(worker, job, frame)
            except trio.BrokenResourceError:
                # The worker was lost before it saw the job: one more try on a fresh one.
                await self._reap()
                worker = self._pick()
                try:
                    await self._send(worker, job, frame)
                except trio.BrokenResourceError:
                    return _DIED
            await self._wait_reply(worker, job)
        if job.outcome is None and not worker.dead:
            # Over its time limit and still queued or running: the only way to get the
            # core back is to kill the worker (and with it, the jobs queued behind).
            self._lose(worker)
            return _TIMED_OUT
        return job.outcome or _DIED

    def _result(self, outcome: tuple[bool, object], shm: SharedMemory | None,
                what: str) -> bytes:
        ok, value = outcome
        if not ok:
            if isinstance(value, BidmeshError):
                raise value
            raise ProcessingError(f"{what} failed in a worker: {value!r}")
        if isinstance(value, int) and not isinstance(value, bool):
            if shm is None or not 0 <= value <= shm.size:
                raise ProcessingError(f"{what}: worker returned a bad output length {value}")
            return bytes(_view(shm)[:value])
        if not isinstance(value, bytes):
            raise ProcessingError(
                f"{what} returned {type(value).__name__}, not bytes (a processor bug)")
        return value

    async def aclose(self) -> None:
        """Stop the workers: queued jobs get a short grace period, then are killed."""
        self._closed = True
        workers = list(self._live)
        for worker in workers:
            with contextlib.suppress(OSError):  # EOF: the worker exits after its queue
                worker.sock.shutdown(socket.SHUT_WR)
        with trio.CancelScope(shield=True, deadline=trio.current_time() + _CLOSE_GRACE_S):
            for worker in workers:
                # Read the replies still due (for callers still waiting, or abandoned),
                # then the worker's exit ends its stream.
                while worker.pending and not worker.dead:
                    async with worker.read_lock:
                        if worker.pending and not worker.dead:
                            await self._read_reply(worker)
                with contextlib.suppress(ValueError):
                    await trio.lowlevel.wait_readable(worker.proc.sentinel)
        for worker in workers:
            self._lose(worker)  # kills only the stuck; fails what is still queued
        await self._reap()
        # No worker is left that could write into a slot.
        self._free.clear()
        self._finalizer()

    async def __aenter__(self) -> WorkerPool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
