"""Processing services: builtins, exec, the plugin registry and the worker pool."""

from __future__ import annotations

import hashlib
import logging
import os
import random
import shutil
from importlib import metadata
from pathlib import Path

import pytest
import zstandard
from proc_helpers import Boom, Crash, Loaded, Reverse, Spin

from node.errors import ConfigError, ProcessingError, UsageError
from node.processors import ProcessContext, Processor, load_processors, run_chain
from node.processors.builtin import AesGcm, AesGcmDecrypt, Exec, ZstdDecompress, nonce_for
from node.processors.pool import WorkerPool

LEASE = hashlib.sha256(b"lease").digest()
KEY = hashlib.sha256(b"key").digest()
CTX = ProcessContext(LEASE, b"stream-1", 7, KEY)
DATA = b"".join(i.to_bytes(4, "big") + b"payload %d " % i * 3 for i in range(500))
PROCS = load_processors()


def test_context_validation() -> None:
    with pytest.raises(UsageError):
        ProcessContext(b"short", b"s", 0)
    with pytest.raises(UsageError):
        ProcessContext(LEASE, b"", 0)
    with pytest.raises(UsageError):
        ProcessContext(LEASE, b"s", -1)
    with pytest.raises(UsageError):
        ProcessContext(LEASE, b"s", 0, key=b"k" * 16)
    with pytest.raises(UsageError):
        ProcessContext(LEASE, b"s", 0, params={"x": [1]})
    params = {"zstd_level": 5}
    ctx = ProcessContext(LEASE, b"s", 0, params=params)
    params["zstd_level"] = 9  # the context holds a copy
    assert ctx.params == {"zstd_level": 5} and ctx.at_step(2).step == 2


def test_builtins_registered_and_protocol() -> None:
    assert {"identity", "sha256", "zstd", "zstd-d", "aes-gcm", "aes-gcm-d"} <= set(PROCS)
    assert all(isinstance(p, Processor) and p.name == n for n, p in PROCS.items())
    names = {ep.name for ep in metadata.entry_points(group="bidmesh.processors")}
    assert {"identity", "sha256", "zstd", "zstd-d", "aes-gcm", "aes-gcm-d"} <= names


def test_identity_and_sha256() -> None:
    assert PROCS["identity"].process(DATA, CTX) == DATA
    assert PROCS["sha256"].process(DATA, CTX) == hashlib.sha256(DATA).digest()


def test_zstd_roundtrip_and_determinism() -> None:
    packed = PROCS["zstd"].process(DATA, CTX)
    assert len(packed) < len(DATA) and packed == PROCS["zstd"].process(DATA, CTX)
    assert PROCS["zstd-d"].process(packed, CTX) == DATA
    lvl = ProcessContext(LEASE, b"s", 0, params={"zstd_level": 19})
    assert PROCS["zstd-d"].process(PROCS["zstd"].process(DATA, lvl), lvl) == DATA
    with pytest.raises(ProcessingError, match="zstd_level"):
        PROCS["zstd"].process(DATA, ProcessContext(LEASE, b"s", 0, params={"zstd_level": 99}))


def test_zstd_d_rejects_garbage_and_bombs() -> None:
    with pytest.raises(ProcessingError, match="not valid zstd"):
        PROCS["zstd-d"].process(b"definitely not zstd", CTX)
    bomb = zstandard.ZstdCompressor().compress(bytes(10 << 20))
    with pytest.raises(ProcessingError, match="bomb"):
        ZstdDecompress(max_output=1 << 20).process(bomb, CTX)
    small = ProcessContext(LEASE, b"s", 0, params={"max_output_bytes": 1000})
    with pytest.raises(ProcessingError, match="exceeds 1000"):
        PROCS["zstd-d"].process(bomb, small)
    # A frame that omits its content size is bounded too.
    cobj = zstandard.ZstdCompressor(write_content_size=False).compressobj()
    sizeless = cobj.compress(bytes(5 << 20)) + cobj.flush()
    with pytest.raises(ProcessingError, match="bomb"):
        ZstdDecompress(max_output=1 << 20).process(sizeless, CTX)
    exact = zstandard.ZstdCompressor().compress(bytes(1000))
    assert PROCS["zstd-d"].process(exact, small) == bytes(1000)


def test_aes_gcm_roundtrip_nonce_and_tamper() -> None:
    sealed = AesGcm().process(DATA, CTX)
    assert sealed[:12] == nonce_for(b"stream-1", 7, 0)
    assert nonce_for(b"stream-1", 7, 0) == hashlib.sha256(
        b"bidmesh-nonce" + b"stream-1" + (7).to_bytes(8, "big") + (0).to_bytes(2, "big")
    ).digest()[:12]
    assert sealed == AesGcm().process(DATA, CTX)  # reproducible
    assert len(sealed) == len(DATA) + 28
    # Decryption needs only the key: a different seq/stream on the decrypting side is fine.
    other = ProcessContext(LEASE, b"other", 99, KEY)
    assert AesGcmDecrypt().process(sealed, other) == DATA
    # Distinct nonces for distinct seqs and for distinct chain positions.
    assert AesGcm().process(DATA, CTX.at_step(1))[:12] != sealed[:12]
    assert AesGcm().process(DATA, ProcessContext(LEASE, b"stream-1", 8, KEY))[:12] != sealed[:12]
    for i in (0, 20, len(sealed) - 1):
        tampered = bytearray(sealed)
        tampered[i] ^= 1
        with pytest.raises(ProcessingError, match="authentication failed"):
            AesGcmDecrypt().process(bytes(tampered), CTX)
    with pytest.raises(ProcessingError, match="authentication failed"):
        AesGcmDecrypt().process(sealed, ProcessContext(LEASE, b"s", 7, bytes(32)))
    with pytest.raises(ProcessingError, match="too short"):
        AesGcmDecrypt().process(b"x" * 27, CTX)
    with pytest.raises(ProcessingError, match="per-lease key"):
        AesGcm().process(DATA, ProcessContext(LEASE, b"s", 0))


def test_run_chain_zstd_then_aes() -> None:
    out = run_chain(PROCS, ["zstd", "aes-gcm"], DATA, CTX)
    assert run_chain(PROCS, ["aes-gcm-d", "zstd-d"], out, CTX) == DATA
    with pytest.raises(ProcessingError, match="no processor named"):
        run_chain(PROCS, ["nope"], DATA, CTX)


# -------------------------------------------------------------------------- exec


def _exec(name: str, *argv: str, **kw: float) -> Exec:
    if shutil.which(argv[0]) is None:
        pytest.skip(f"{argv[0]} not installed")
    return Exec(name, argv, **kw)  # type: ignore[arg-type]


def test_exec_cat_roundtrip_large() -> None:
    big = os.urandom(3 << 20)  # larger than any pipe buffer: checks for deadlock
    assert _exec("exec:cat", "cat").process(big, CTX) == big
    assert _exec("exec:cat", "cat").process(b"", CTX) == b""


def test_exec_timeout() -> None:
    with pytest.raises(ProcessingError, match="timed out"):
        _exec("exec:sleep", "sleep", "30", timeout_s=0.3).process(b"x", CTX)
    tight = ProcessContext(LEASE, b"s", 0, params={"exec_timeout_s": 0.2})
    with pytest.raises(ProcessingError, match="timed out"):
        _exec("exec:sleep", "sleep", "30").process(b"x", tight)


def test_exec_output_limit() -> None:
    head = _exec("exec:head", "head", "-c", "5000", max_output=4096)
    with pytest.raises(ProcessingError, match="exceeds 4096"):
        head.process(bytes(10_000), CTX)
    assert _exec("exec:head", "head", "-c", "4096", max_output=4096).process(
        bytes(10_000), CTX
    ) == bytes(4096)


def test_exec_failure_and_config() -> None:
    with pytest.raises(ProcessingError, match="status 1"):
        _exec("exec:false", "false").process(b"x", CTX)
    with pytest.raises(ProcessingError, match="cannot start"):
        Exec("exec:nope", ("/nonexistent/bidmesh-tool",)).process(b"x", CTX)
    with pytest.raises(ConfigError):
        Exec("gzip", ("gzip",))
    with pytest.raises(ConfigError):
        Exec("exec:gzip", ())
    procs = load_processors({"exec:gzip": ["gzip", "-c", "-n"]})
    if shutil.which("gzip"):
        import gzip

        assert gzip.decompress(procs["exec:gzip"].process(DATA, CTX)) == DATA


# ---------------------------------------------------------------------- registry


class _FakeEP:
    def __init__(self, name: str, value: str, obj: object = None, exc: Exception | None = None):
        self.name, self.value, self._obj, self._exc = name, value, obj, exc

    def load(self) -> object:
        if self._exc is not None:
            raise self._exc
        return self._obj


def test_broken_plugins_are_skipped(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    eps = [
        _FakeEP("broken", "nowhere:X", exc=ImportError("No module named 'nowhere'")),
        _FakeEP("notproc", "m:obj", obj=object()),
        _FakeEP("misnamed", "m:Reverse", obj=Reverse),
        _FakeEP("zstd", "evil:Zstd", obj=Reverse),
        _FakeEP("reverse", "proc_helpers:Reverse", obj=Reverse),
    ]
    monkeypatch.setattr(metadata, "entry_points", lambda group: eps)
    with caplog.at_level(logging.WARNING, logger="node.processors"):
        procs = load_processors()
    assert isinstance(procs["reverse"], Reverse)
    assert "broken" not in procs and "notproc" not in procs and "misnamed" not in procs
    assert type(procs["zstd"]).__name__ == "Zstd"  # builtins cannot be hijacked
    text = caplog.text
    assert "broken" in text and "notproc" in text and "misnamed" in text and "evil" in text


# -------------------------------------------------------------------------- pool


@pytest.fixture
async def pool():  # type: ignore[no-untyped-def]
    procs = {**PROCS, "crash": Crash(), "boom": Boom(), "spin": Spin(), "reverse": Reverse()}
    p = WorkerPool(procs, workers=2)
    try:
        yield p
    finally:
        await p.aclose()


async def test_pool_runs_cpu_heavy_jobs_in_parallel(pool: WorkerPool) -> None:
    import trio

    inputs = [os.urandom(1 << 16) * 48 + bytes([i]) * 4096 for i in range(4)]
    results: dict[int, bytes] = {}
    params = {"zstd_level": 15}

    async def job(i: int) -> None:
        ctx = ProcessContext(LEASE, b"s", i, params=params)
        results[i] = await pool.run("zstd", inputs[i], ctx)

    async with trio.open_nursery() as nursery:
        for i in range(4):
            nursery.start_soon(job, i)
    for i in range(4):
        ctx = ProcessContext(LEASE, b"s", i, params=params)
        assert results[i] == PROCS["zstd"].process(inputs[i], ctx)
        assert await pool.run("zstd-d", results[i], ctx) == inputs[i]


async def test_pool_run_chain_matches_in_process(pool: WorkerPool) -> None:
    await pool.start()
    out = await pool.run_chain(["zstd", "aes-gcm"], DATA, CTX)
    assert out == run_chain(PROCS, ["zstd", "aes-gcm"], DATA, CTX)


async def test_pool_errors(pool: WorkerPool) -> None:
    with pytest.raises(ProcessingError, match="no processor named"):
        await pool.run("nope", b"x", CTX)
    with pytest.raises(ProcessingError, match="KeyError"):
        await pool.run("boom", b"x", CTX)
    with pytest.raises(ProcessingError, match="authentication failed"):
        await pool.run("aes-gcm-d", b"y" * 40, CTX)
    assert await pool.run("reverse", b"abc", CTX) == b"cba"  # still healthy


async def test_pool_recovers_after_worker_dies(pool: WorkerPool) -> None:
    assert await pool.run("reverse", b"abc", CTX) == b"cba"
    with pytest.raises(ProcessingError, match="worker process died"):
        await pool.run("crash", b"x", CTX)
    assert pool.crashes == 1
    assert await pool.run("reverse", b"abc", CTX) == b"cba"
    assert await pool.run("sha256", DATA, CTX) == hashlib.sha256(DATA).digest()


async def test_pool_timeout_kills_stuck_worker(pool: WorkerPool) -> None:
    with pytest.raises(ProcessingError, match="timed out"):
        await pool.run("spin", b"x", CTX, timeout_s=0.5)
    assert pool.timeouts == 1
    assert await pool.run("reverse", b"abc", CTX) == b"cba"


async def test_pool_closed_is_usage_error() -> None:
    p = WorkerPool({"identity": PROCS["identity"]}, workers=1, mp_context="spawn")
    assert await p.run("identity", b"z", CTX) == b"z"
    await p.aclose()
    with pytest.raises(UsageError):
        await p.run("identity", b"z", CTX)
    with pytest.raises(UsageError):
        WorkerPool(workers=0)


async def test_pool_cancelled_caller_leaves_pool_usable(pool: WorkerPool) -> None:
    import trio
    import trio.testing

    async with trio.open_nursery() as nursery:
        nursery.start_soon(pool.run, "zstd", DATA * 20, CTX)
        await trio.testing.wait_all_tasks_blocked()  # the job is submitted and awaited
        nursery.cancel_scope.cancel()
    assert pool.timeouts == 0 and pool.crashes == 0
    assert await pool.run("reverse", b"abc", CTX) == b"cba"


# ------------------------------------------------------------- shared-memory slots


def _shm_exists(name: str) -> bool:
    return os.path.exists(f"/dev/shm/{name}")


needs_dev_shm = pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm")


@needs_dev_shm
async def test_pool_slots_carry_segments_and_are_removed_on_close() -> None:
    import trio

    p = WorkerPool(PROCS, workers=2, max_in_flight=3)
    inputs = [DATA * (i + 1) for i in range(6)]
    results: dict[int, bytes] = {}

    async def job(i: int) -> None:
        results[i] = await p.run_chain(["zstd", "aes-gcm"], inputs[i], CTX)

    async with trio.open_nursery() as nursery:
        for i in range(6):
            nursery.start_soon(job, i)
    names = p.slot_names
    assert 1 <= len(names) <= 3 + 2 and all(_shm_exists(n) for n in names)
    assert results == {i: run_chain(PROCS, ["zstd", "aes-gcm"], inputs[i], CTX)
                       for i in range(6)}
    await p.aclose()
    assert p.slot_names == () and not any(_shm_exists(n) for n in names)


@needs_dev_shm
async def test_pool_falls_back_to_pipes_when_slots_are_too_small() -> None:
    packed = PROCS["zstd"].process(DATA, CTX)
    assert len(packed) < 4096 < len(DATA)
    async with WorkerPool(PROCS, workers=1, slot_bytes=4096) as p:
        # Input too big for a slot: sent through the pipe; output fits one.
        assert await p.run("zstd", DATA, CTX) == packed
        # Input fits a slot, output (4x larger) does not: returned through the pipe.
        assert await p.run("zstd-d", packed, CTX) == DATA
        names = p.slot_names
        assert len(names) == 1
    assert not any(_shm_exists(n) for n in names)
    async with WorkerPool(PROCS, workers=1, slot_bytes=0) as p:
        assert await p.run("zstd", DATA, CTX) == packed and p.slot_names == ()


@needs_dev_shm
async def test_pool_slots_survive_crash_and_timeout_without_leaking(pool: WorkerPool) -> None:
    big = DATA * 8
    assert await pool.run("reverse", big, CTX) == big[::-1]
    with pytest.raises(ProcessingError, match="worker process died"):
        await pool.run("crash", big, CTX)  # dies with its input in a slot
    with pytest.raises(ProcessingError, match="timed out"):
        await pool.run("spin", big, CTX, timeout_s=0.5)  # killed with a slot in use
    assert pool.crashes == 1 and pool.timeouts == 1
    # Slots come back: the pool never holds more than its cap, and they still work.
    for i in range(6):
        data = big + bytes([i])
        assert await pool.run("reverse", data, CTX) == data[::-1]
    names = pool.slot_names
    assert 1 <= len(names) <= 2 + 2
    await pool.aclose()
    assert not any(_shm_exists(n) for n in names)


@needs_dev_shm
async def test_pool_cancelled_job_keeps_its_slot_until_it_finishes() -> None:
    """A running job abandoned by its caller must not write into a later call's slot."""
    import trio
    import trio.testing

    slow_ctx = ProcessContext(LEASE, b"s", 1, params={"zstd_level": 19})
    rng = random.Random(5)  # ~1 MB of varied text: level 19 takes ~0.5 s, its caller less
    slow_in = b" ".join(rng.choice([b"alpha", b"beta", b"gamma", b"delta"])
                        + b"%d" % rng.randrange(1000) for _ in range(120_000))
    async with WorkerPool({**PROCS, "reverse": Reverse()}, workers=2, max_in_flight=1) as p:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(p.run, "zstd", slow_in, slow_ctx)
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
        assert len(p.slot_names) == 1  # still held by the abandoned job
        # Meanwhile other calls get another slot (or the pipes) and correct results.
        for i in range(8):
            data = DATA + bytes([i]) * 1000
            assert await p.run("reverse", data, CTX) == data[::-1]
        assert len(p.slot_names) <= 1 + 2
        # Slots still carry the right bytes once the abandoned job is done with its own.
        assert await p.run("zstd", slow_in, slow_ctx) == PROCS["zstd"].process(slow_in, slow_ctx)
        names = p.slot_names
    assert not any(_shm_exists(n) for n in names)


@needs_dev_shm
async def test_pool_dropped_without_close_removes_its_slots() -> None:
    import gc

    p = WorkerPool(PROCS, workers=1, mp_context="spawn")
    assert await p.run("sha256", DATA, CTX) == hashlib.sha256(DATA).digest()
    names = p.slot_names
    assert names and all(_shm_exists(n) for n in names)
    del p  # never closed: its executor shuts down when collected, and so do the slots
    gc.collect()
    assert not any(_shm_exists(n) for n in names)


async def test_pool_jobs_queued_behind_a_crash_fail_and_the_pool_recovers() -> None:
    import trio
    import trio.testing

    procs = {**PROCS, "crash": Crash(), "reverse": Reverse()}
    outcomes: dict[str, object] = {}

    async def call(name: str, data: bytes) -> None:
        try:
            outcomes[name] = await p.run(name, data, CTX)
        except ProcessingError as e:
            outcomes[name] = e

    # One worker, two jobs in it: the second waits behind the one that kills the worker.
    async with WorkerPool(procs, workers=1, max_in_flight=2) as p:
        await p.start()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(call, "crash", DATA)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(call, "reverse", DATA)
        assert isinstance(outcomes["crash"], ProcessingError)
        assert outcomes["reverse"] == DATA[::-1] or isinstance(outcomes["reverse"],
                                                               ProcessingError)
        assert p.crashes == 1
        assert await p.run("reverse", DATA, CTX) == DATA[::-1]
        names = p.slot_names
    assert not any(_shm_exists(n) for n in names)


async def test_pool_start_loads_the_processors_in_every_worker(tmp_path: Path) -> None:
    """A processor's module is imported where it is unpickled: start() has every worker
    load them, so the first segment does not pay a plugin's imports (seconds of CPU,
    on a loaded host longer than a contractor's timeout)."""
    loads = tmp_path / "loads"
    async with WorkerPool({"loaded": Loaded(str(loads))}, workers=2) as p:
        await p.start()
        assert sorted(int(x) for x in loads.read_text().split()) == sorted(p.worker_pids)
        assert await p.run("loaded", b"abc", CTX) == b"abc"


async def test_pool_replaces_a_worker_killed_while_idle() -> None:
    import signal

    async with WorkerPool({**PROCS, "reverse": Reverse()}, workers=1) as p:
        await p.start()
        (pid,) = p.worker_pids
        os.kill(pid, signal.SIGKILL)
        # The pool finds out when it next uses the worker: if the worker is gone by then,
        # the call goes to a fresh one; if it dies after taking the job, the call fails
        # retryably. Either way the next call works.
        try:
            assert await p.run("reverse", b"abc", CTX) == b"cba"
        except ProcessingError as e:
            assert "died" in str(e)
        assert await p.run("reverse", b"abc", CTX) == b"cba"
        assert pid not in p.worker_pids and p.crashes == 1


async def test_pool_reports_plugin_bugs_that_cross_processes() -> None:
    from proc_helpers import NotBytes, Unpicklable

    procs = {"not-bytes": NotBytes(), "unpicklable": Unpicklable(), "reverse": Reverse()}
    async with WorkerPool(procs, workers=1) as p:  # type: ignore[arg-type]
        with pytest.raises(ProcessingError, match="not bytes"):
            await p.run("not-bytes", b"x", CTX)
        with pytest.raises(ProcessingError, match="could not run in a worker"):
            await p.run("unpicklable", b"x", CTX)
        assert await p.run("reverse", b"abc", CTX) == b"cba" and p.crashes == 0


async def test_pool_close_lets_queued_jobs_finish() -> None:
    import trio
    import trio.testing

    results: list[bytes] = []
    p = WorkerPool({**PROCS, "reverse": Reverse()}, workers=2, max_in_flight=4)

    async def call(i: int) -> None:
        results.append(await p.run("zstd", DATA * 20 + bytes([i]), CTX))

    async with trio.open_nursery() as nursery:
        for i in range(4):
            nursery.start_soon(call, i)
        await trio.testing.wait_all_tasks_blocked()
        names = p.slot_names
        await p.aclose()  # the four jobs are in the workers: they finish first
    assert sorted(results) == sorted(PROCS["zstd"].process(DATA * 20 + bytes([i]), CTX)
                                     for i in range(4))
    assert p.worker_pids == () and not any(_shm_exists(n) for n in names)


async def test_pool_without_shared_memory_still_works(monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    import node.processors.pool as pool_module

    def no_room(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pool_module, "SharedMemory", no_room)
    async with WorkerPool(PROCS, workers=1) as p:
        assert await p.run("zstd", DATA, CTX) == PROCS["zstd"].process(DATA, CTX)
        assert await p.run("sha256", DATA, CTX) == hashlib.sha256(DATA).digest()
        assert p.slot_names == ()
    assert "shared-memory slot" in caplog.text


@needs_dev_shm
async def test_pool_slots_stay_correct_under_cancels_and_crashes() -> None:
    """Many overlapping calls, some abandoned at random moments, some killing their
    worker: every call that returns has the right bytes, and nothing leaks."""
    import trio

    rng = random.Random(7)
    procs = {**PROCS, "crash": Crash(), "reverse": Reverse()}
    seen: set[str] = set()
    returned = 0

    async def call(i: int, p: WorkerPool) -> None:
        nonlocal returned
        name = "crash" if i % 17 == 5 else rng.choice(["reverse", "zstd", "sha256"])
        data = DATA * rng.randint(1, 40) + i.to_bytes(4, "big")
        ctx = ProcessContext(LEASE, b"s", i)
        # One call in three gives up after a random moment (queued, sent, or running).
        patience = rng.random() * 0.2 if i % 3 == 0 and name != "crash" else 60.0
        with trio.move_on_after(patience):
            try:
                out = await p.run(name, data, ctx)
            except ProcessingError:
                return
            assert out == procs[name].process(data, ctx), (i, name)
            returned += 1

    async with WorkerPool(procs, workers=2, max_in_flight=3) as p:
        async with trio.open_nursery() as nursery:
            for i in range(150):
                nursery.start_soon(call, i, p)
        seen.update(p.slot_names)
        assert len(p.slot_names) <= 3 + 2
        for i in range(5):  # healthy afterwards
            data = DATA + bytes([i])
            assert await p.run("reverse", data, CTX) == data[::-1]
        seen.update(p.slot_names)
    assert returned > 0 and p.crashes >= 1
    assert not any(_shm_exists(n) for n in seen)
