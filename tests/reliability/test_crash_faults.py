"""Crash faults on real `bidmesh run` processes: SIGKILL during ingest, during a sync
catch-up and mid-stream on the dataplane; kill/restart loops under load; a full disk
and a read-only state directory. After every fault: nothing acknowledged is lost,
`bidmesh ledger verify` is clean, and the digests converge."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from daemon_helpers import Cluster, Proc, cluster, run_command, wait_for

from node.dataplane import SegmentLimits, member_key, stream_through_lease
from node.errors import BidmeshError, OperationError, RemoteError
from node.keys import Identity
from node.ledger import Ledger
from node.p2p import open_host
from node.segments import Packet, encode_lp, local_reference

from .faultnet import (
    NETWORK,
    Publisher,
    assert_verified,
    lease_events,
    reconfigure,
    seed_ledger,
    stored,
    wait_converged,
)

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("procs")]

QUIET = {"dataplane": {"enabled": False}}
# A restarted node catching up a backlog on a loaded host (load 30: a sync request
# timing out, the peer backed off for sync.penalty_s = 60 s, then pages of 16).
CATCH_UP_S = 300.0
IS_ROOT = os.geteuid() == 0


def events_of(c: Cluster, p: Proc) -> int:
    try:
        return int(c.status(p)["events"])
    except (OperationError, RemoteError):
        return -1


def test_sigkill_during_ingest_sync_and_restart_loops(tmp_path: Path) -> None:
    # Small sync pages so that a catch-up takes many requests: the kill lands inside it.
    with cluster(tmp_path, 3, overrides={**QUIET, "sync": {"range_limit": 16}}) as c:
        c.start_all()
        victim, others = c.procs[2], c.procs[:2]
        acked: list[bytes] = []

        # 1. During ingest: batches stream into the victim; SIGKILL between/inside them.
        pub = Publisher([victim], batch=50, interval=0.0, tag="ingest")
        pub.start()
        wait_for(lambda: len(pub.acked) >= 300, 120, "300 events acknowledged")
        c.terminate(victim, signal.SIGKILL)
        pub.stop()
        acked += pub.acked
        assert stored(victim, pub.acked) == len(pub.acked)  # committed before the answer
        assert_verified(victim)
        c.start(victim)
        wait_converged(c, timeout=CATCH_UP_S)
        for p in c.procs:
            assert stored(p, acked) == len(acked)
            assert_verified(p)

        # 2. During sync: the victim comes back to a backlog and dies while fetching it.
        c.terminate(victim, signal.SIGKILL)
        for p in others:
            for _ in range(2):
                acked += c.publish(p, 500, "backlog")
        wait_converged(c, others, timeout=CATCH_UP_S)
        target = events_of(c, others[0])
        before = Ledger(victim.data_dir / "ledger.db", network=NETWORK, readonly=True)
        start_count = before.count()
        before.close()
        c.start(victim)
        wait_for(lambda: events_of(c, victim) > start_count, CATCH_UP_S, "the catch-up to start")
        mid = events_of(c, victim)
        c.terminate(victim, signal.SIGKILL)
        assert_verified(victim)
        c.start(victim)
        wait_converged(c, timeout=CATCH_UP_S)
        assert events_of(c, victim) == target
        print(f"killed mid-sync at {mid} of {target} events")

        # 3. Restart loop: kill -9 / restart three times while all publish, at most 600
        # events a round (unbounded, the minute a restart took at load 30 left the
        # victim 16,000 events to catch up at 16 a request).
        pub = Publisher(c.procs, batch=20, interval=0.02, tag="loop")
        pub.limit = 600
        pub.start()
        try:
            for _ in range(3):
                n = len(pub.acked)
                pub.limit = n + 600
                wait_for(lambda n=n: len(pub.acked) >= n + 60, 120, "progress")
                c.terminate(victim, signal.SIGKILL)
                assert_verified(victim)
                c.start(victim)
        finally:
            pub.stop()
        acked += pub.acked
        wait_converged(c, timeout=CATCH_UP_S)
        for p in c.procs:
            assert stored(p, acked) == len(acked)
            assert_verified(p)


# ------------------------------------------------------------------ disk full / read-only


@contextlib.contextmanager
def tiny_fs(path: Path, size_kib: int) -> Iterator[None]:
    """`path` on its own tmpfs of `size_kib` (root only)."""
    keep = {f.name: f.read_bytes() for f in path.iterdir() if f.is_file()}
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k,mode=0700", "tmpfs",
                    str(path)], check=True)
    try:
        for name, data in keep.items():
            (path / name).write_bytes(data)
            os.chmod(path / name, 0o600)
        yield
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def fill(path: Path) -> Path:
    """Fill the filesystem of `path` to the last byte; returns the filler file."""
    filler = path / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC
    return filler


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[None]:
    if IS_ROOT:  # root ignores permission bits: a read-only bind mount
        subprocess.run(["mount", "--bind", str(path), str(path)], check=True)
        try:
            subprocess.run(["mount", "-o", "remount,ro,bind", str(path)], check=True)
            yield
        finally:
            subprocess.run(["umount", str(path)], check=True)
    else:
        os.chmod(path, 0o500)
        try:
            yield
        finally:
            os.chmod(path, 0o700)


def start_with_fsize(c: Cluster, p: Proc, limit: int) -> None:
    """Start `p` under RLIMIT_FSIZE (writes past `limit` bytes fail with EFBIG)."""
    wrapper = ("import os, resource, sys; "
               f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
               "os.execv(sys.argv[1], sys.argv[1:])")
    cmd = run_command(p.cfg_path)
    log = open(p.dir / "stderr.log", "ab")  # noqa: SIM115 - handed to the child
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    p.popen = subprocess.Popen([sys.executable, "-c", wrapper, *cmd], stdout=subprocess.DEVNULL,
                               stderr=log, cwd=p.dir, env=env)
    log.close()
    c.wait_ready(p)


def publish_until_full(c: Cluster, p: Proc) -> str:
    for i in range(400):
        try:
            c.publish(p, 200, f"fill{i}-")
        except RemoteError as e:
            return str(e)
    raise AssertionError("the disk never filled up")


@pytest.mark.parametrize("mode", ["tmpfs", "rlimit"])
def test_full_disk_and_read_only_state_dir(tmp_path: Path, mode: str) -> None:
    if mode == "tmpfs" and not IS_ROOT:
        pytest.skip("mounting a small tmpfs needs root; the rlimit variant covers this")
    with cluster(tmp_path, 2, overrides=QUIET) as c:
        src, victim = c.procs
        c.start(src)
        mounts = contextlib.ExitStack()
        with mounts:
            if mode == "tmpfs":
                mounts.enter_context(tiny_fs(victim.data_dir, 1024))
                c.start(victim)
                filler = fill(victim.data_dir)
            else:
                c.start(victim)
                c.terminate(victim)
                size = max(f.stat().st_size for f in victim.data_dir.iterdir() if f.is_file())
                start_with_fsize(c, victim, size + 256 * 1024)
            ok = c.publish(victim, 5, "early") if mode == "rlimit" else []
            err = publish_until_full(c, victim)
            # A clear refusal, and the node is still up, serving and syncing.
            assert "could not store the events" in err and "nothing was stored" in err, err
            assert victim.alive()
            acked = c.publish(src, 300, "while-full")
            wait_for(lambda: c.status(victim)["gossip"]["events"].get("store_error", 0) > 0,
                     60, "the full node to fail storing replicated events")
            assert victim.alive() and c.status(victim)["state"] == "running"
            if mode == "tmpfs":
                filler.unlink()  # space again: the node catches up by itself
                wait_converged(c, timeout=CATCH_UP_S)
                assert stored(victim, acked + ok) == len(acked + ok)
            c.terminate(victim)
            assert_verified(victim)
        if mode == "rlimit":
            c.start(victim)  # no limit any more
            wait_converged(c, timeout=CATCH_UP_S)
            assert stored(victim, acked + ok) == len(acked + ok)
            c.terminate(victim)

        # A read-only state directory: a one-line error and a non-zero exit, no traceback.
        with read_only(victim.data_dir):
            c.start(victim, wait=False)
            assert victim.popen is not None
            rc = victim.popen.wait(120)
        assert rc != 0
        last = c.stderr(victim).strip().splitlines()[-1]
        assert last.startswith("bidmesh: "), last
        assert "Read-only file system" in last or "Permission denied" in last, last
        c.start(victim)
        more = c.publish(victim, 10, "after")
        wait_converged(c, timeout=CATCH_UP_S)
        for p in c.procs:
            assert stored(p, acked + more) == len(acked + more)
            assert_verified(p)


# ------------------------------------------------------------------ dataplane


def lp_packets(n: int) -> list[bytes]:
    return [(b"packet %d " % i) * (20 + i % 50) for i in range(n)]


async def test_dataplane_contractor_and_provider_sigkilled_mid_stream(tmp_path: Path) -> None:
    """A (zstd) subcontracts aes-gcm to B or C (processes); the one serving is SIGKILLed
    mid-stream and A re-dispatches: the output is byte-exact. Then A itself is
    SIGKILLed mid-stream: the member's stream fails with a clear error, in bounded time."""
    member = Identity.from_seed(b"crash-member".ljust(32, b"."))
    offers = [{"zstd": {"price": 10, "capacity": 1000}},
              {"aes-gcm": {"price": 1, "capacity": 1000}},
              {"aes-gcm": {"price": 5, "capacity": 1000}}]
    with cluster(tmp_path, 3, overrides={"dataplane": {"workers": 1}}) as c:
        for p, offer in zip(c.procs, offers, strict=True):
            reconfigure(p, "provider", enabled=True, offers=offer, currency="EUR",
                        interval_s=0.25, rate_recipients=False)
        a = c.procs[0]
        events, lease = lease_events(member, a.ident, "zstd", ("zstd", "aes-gcm"))
        seed_ledger(a, [e.wire for e in events])
        await trio.to_thread.run_sync(c.start_all)

        def offers_known() -> bool:
            with Ledger(a.data_dir / "ledger.db", network=NETWORK, readonly=True) as led:
                authors = {ev.author for ev in led.iter_canonical() if ev.kind == "offer"}
            return {p.ident.public for p in c.procs} <= authors

        await trio.to_thread.run_sync(wait_for, offers_known, 30, "A to know every offer")
        pkts = lp_packets(1500)
        limits = SegmentLimits(max_packets=16, max_bytes=64 << 10)
        src = [encode_lp(pkts[i : i + 16]) for i in range(0, len(pkts), 16)]
        killed: list[Proc] = []

        def serving() -> Proc | None:
            for p in c.procs[1:]:
                served = c.status(p)["services"]["dataplane"]["served"]
                if served.get(a.ident.public.hex(), {}).get("segments", 0) > 0:
                    return p
            return None

        async with open_host(member.seed) as host:
            await host.connect(a.addr)
            got: list[bytes] = []

            async def sink(frame: bytes) -> None:
                got.append(frame)
                if len(got) == 5:
                    victim = await trio.to_thread.run_sync(serving)
                    assert victim is not None
                    await trio.to_thread.run_sync(c.terminate, victim, signal.SIGKILL)
                    killed.append(victim)

            # The first segments wait for worker pools that start on first use, in A and
            # in the contractor (process start-up and imports: tens of seconds on a host
            # at load 25), while A's full window holds the member's writes: a 30 s bound
            # per write fired first there (the member reset its own stream).
            with trio.fail_after(300):
                res = await stream_through_lease(
                    host, a.peer_id, lease, member, src, "lp", [("zstd", "aes-gcm")],
                    network=NETWORK, limits=limits, sink=sink, timeout=120.0)
            want = local_reference([Packet(p) for p in pkts], [("zstd", "aes-gcm")],
                                   max_packets=16, max_bytes=64 << 10, lease_id=lease.id,
                                   stream_id=res.stream_id, key=member_key(member, lease))
            assert res.trailer.ok and killed
            assert b"".join(got) == want  # byte-exact despite the dead contractor
            assert res.trailer.redispatched >= 1
            counters = c.status(a)["services"]["dataplane"]["counters"]
            assert counters.get("contractor_failed", 0) >= 1

            # The provider itself dies mid-stream: a clear error, not a hang.
            got.clear()

            async def sink2(frame: bytes) -> None:
                got.append(frame)
                if len(got) == 3:
                    await trio.to_thread.run_sync(c.terminate, a, signal.SIGKILL)

            # Bounded, not timed: a loaded host may take long for the first frames.
            with trio.fail_after(120), pytest.raises(BidmeshError) as e:
                await stream_through_lease(
                    host, a.peer_id, lease, member, src, "lp", [("zstd", "aes-gcm")],
                    network=NETWORK, limits=limits, sink=sink2, timeout=10.0)
            print(f"member saw: {type(e.value).__name__}: {e.value}")
        for p in c.procs:
            assert_verified(p)
