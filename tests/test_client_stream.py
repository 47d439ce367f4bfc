"""`bidmesh client stream` against a real provider (ledger, query service and dataplane
on a libp2p host over loopback), run as the command a user types: MPEG-TS input,
`--chain`, the output framings, progress counted in bytes the provider acknowledged,
and an interrupted stream whose partial output is kept as OUT.partial, never as OUT."""

from __future__ import annotations

import contextlib
import json
import signal
import struct
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
import zstandard
from test_client import NET, ident, wait_past

from node import query
from node.client import LightClient, now_ms
from node.dataplane import SegmentLimits, split_results
from node.dataplane.client import InputAcks
from node.devnet import make_ts
from node.events import Bid
from node.ledger import Ledger
from node.p2p import open_host
from node.segments import MpegTs, Packet, Segmenter, decode_packets, encode_lp, new_parser

pytestmark = pytest.mark.xdist_group("procs")


# ------------------------------------------------------------------ pure: InputAcks


def _segment_ends(protocol: str, data: bytes, lim: SegmentLimits) -> list[int]:
    """Where each segment the provider cuts ends in `data`, found another way: locate
    every parsed packet in the input, then cut the packet list as the provider does."""
    parser = new_parser(protocol, n_chains=1)
    pkts = parser.feed(data) + parser.end()
    pos, pkt_end = 0, []
    for pk in pkts:
        raw = struct.pack(">IB", len(pk.data), 0) + pk.data if protocol == "lp" else pk.data
        pos = data.index(raw, pos) + len(raw)
        pkt_end.append(pos)
    seg, count, ends = Segmenter(lim.max_packets, lim.max_bytes), 0, []
    for pk in pkts:
        for s in seg.push(pk, 0):
            count += s.packets
            ends.append(pkt_end[count - 1])
    if seg.flush():
        ends.append(len(data))
    return ends


@pytest.mark.parametrize("protocol", ["lp", "ts"])
def test_input_acks_match_the_providers_cuts(protocol: str) -> None:
    lim = SegmentLimits(max_packets=7, max_bytes=3000)
    if protocol == "lp":
        data = encode_lp([bytes([i]) * (i * 37 % 1100) for i in range(60)])
    else:
        data = make_ts(600, 3)  # garbage after packet 500: acks stay honest across it
        assert b"garbage" in data
    want = _segment_ends(protocol, data, lim)
    acks = InputAcks(protocol, lim)
    for i in range(0, len(data), 1000):  # any chunking gives the same cuts
        acks.feed(data[i:i + 1000])
    acks.end()
    got = [acks.ack(k) for k in range(len(want))]
    assert got[-1] == len(data) == acks.fed
    assert got == sorted(got)
    # Never ahead of the provider: each ack is at most where that segment really ends
    # (TS garbage is counted late, with the packets after it).
    assert all(g <= w for g, w in zip(got, want, strict=True))
    if protocol == "lp":
        assert got == want


def test_input_acks_refuse_time_cuts() -> None:
    from node.errors import UsageError

    with pytest.raises(UsageError, match="time cuts"):
        InputAcks("lp", SegmentLimits(max_age_ms=100))


# ------------------------------------------------------------------ on a real provider


@dataclass
class Provider:
    addr: str
    ledger: Ledger
    service: query.QueryService
    clock_offset: list[int]  # ms added to the provider's dataplane clock


@asynccontextmanager
async def provider_node(tmp_path: Path) -> AsyncIterator[Provider]:
    from node.dataplane import DataplaneConfig, DataplaneService
    from node.processors import load_processors
    from node.processors.pool import WorkerPool

    provider = ident(7)
    led = Ledger(tmp_path / "provider.db", network=NET)
    offset = [0]
    try:
        async with WorkerPool(load_processors(), 1) as pool, \
                open_host(provider.seed) as host, trio.open_nursery() as nursery:
            svc = query.QueryService(led, None, led.append, NET)
            svc.register(host)
            dp = DataplaneService(
                host, provider, NET, lambda i: svc.live.market().leases.get(i),
                svc.live.market, pool, lambda b: led.publish(provider, b, now_ms()),
                clock=lambda: now_ms() + offset[0],
                config=DataplaneConfig(services=frozenset({"zstd", "identity"})))
            nursery.start_soon(dp.run)
            yield Provider(host.addrs[0], led, svc, offset)
            nursery.cancel_scope.cancel()
    finally:
        led.close()


async def lease_for(p: Provider, client_dir: Path, **request: object) -> bytes:
    """alice requests, the provider bids, alice awards: the lease id."""
    async with LightClient.open(client_dir, [p.addr], network=NET) as alice:
        req = await alice.request("zstd", duration_ms=120_000, reserve=100, close_in_ms=500,
                                  **request)  # type: ignore[arg-type]
        p.ledger.publish(ident(7), Bid(request=req.id, price=40), now_ms())
        await wait_past(req.body.reveal_ms)  # type: ignore[attr-defined]
        award, _ = await alice.award(req.id)
    return award.id


async def cli(p: Provider, client_dir: Path, *args: str) -> tuple[int, bytes, bytes]:
    cmd = [sys.executable, "-m", "node.cli", "client", "--dir", str(client_dir), "--node",
           p.addr, "--network", NET, *args]
    with trio.fail_after(120):
        r = await trio.run_process(cmd, capture_stdout=True, capture_stderr=True, check=False)
    return r.returncode, r.stdout, r.stderr


async def test_stream_ts_with_chains_and_output_framings(tmp_path: Path) -> None:
    ts = make_ts(1500, 1)  # 1,500 packets (ids 0x100, 0x101) and a run of garbage
    packets = [pk.data for pk in _ts_packets(ts)]
    assert len(packets) == 1500 and len(ts) > 1500 * 188
    (tmp_path / "in.ts").write_bytes(ts)
    alice = tmp_path / "alice"
    async with provider_node(tmp_path) as p:
        lease = await lease_for(p, alice, chain=["zstd"])
        # identity chain, packets out: the TS file again (minus the garbage), byte exact.
        rc, _, err = await cli(p, alice, "stream", "--json", lease.hex()[:16],
                               "--in", str(tmp_path / "in.ts"), "--out",
                               str(tmp_path / "out.ts"), "--format", "ts", "--chain",
                               "identity", "--out-format", "packets", "--progress", "yes")
        assert rc == 0, err.decode()
        assert (tmp_path / "out.ts").read_bytes() == b"".join(packets)
        assert not (tmp_path / "out.ts.partial").exists()
        summary = json.loads(err.decode().strip().splitlines()[-1])
        assert summary["packets"] == 1500 and summary["format"] == "ts"
        assert summary["garbage_bytes"] == len(ts) - 1500 * 188 > 0
        assert b"not MPEG-TS packets and were skipped" in err
        # The progress line counts what the provider acknowledged, up to all of it.
        assert b"] 100% acked" in err and b"lease ends in" in err

        # The lease's chain (zstd): each segment's result is a zstd frame of
        # `u32 length, packet` records; `frames` keeps the seq framing around them.
        rc, _, err = await cli(p, alice, "stream", lease.hex()[:16], "--in",
                               str(tmp_path / "in.ts"), "--out", str(tmp_path / "out.bin"),
                               "--format", "ts", "--out-format", "frames")
        assert rc == 0, err.decode()
        results = split_results((tmp_path / "out.bin").read_bytes())
        assert [s for s, _ in results] == list(range(len(results))) and len(results) > 1
        back = [pk for _, r in results
                for pk in decode_packets(zstandard.ZstdDecompressor().decompress(r))]
        assert back == packets

        # --out-format packets on a chain that does not return packets: a clear error.
        rc, _, err = await cli(p, alice, "stream", lease.hex()[:16], "--in",
                               str(tmp_path / "in.ts"), "--out", str(tmp_path / "bad.ts"),
                               "--format", "ts", "--out-format", "packets")
        assert rc == 2 and b"--out-format packets" in err and b"not packets" in err
        assert not (tmp_path / "bad.ts").exists()

        # Not TS at all: refused clearly, not an empty success.
        (tmp_path / "text.txt").write_bytes(b"hello, not a transport stream\n" * 100)
        rc, _, err = await cli(p, alice, "stream", lease.hex()[:16], "--in",
                               str(tmp_path / "text.txt"), "--out", str(tmp_path / "t.out"),
                               "--format", "ts")
        assert rc == 2 and b"no MPEG-TS packets" in err

        # A chain the lease was not bought for: refused before any data, no output.
        rc, _, err = await cli(p, alice, "stream", lease.hex()[:16], "--in",
                               str(tmp_path / "in.ts"), "--out", str(tmp_path / "w.out"),
                               "--format", "ts", "--chain", "sha256")
        assert rc == 1 and b"wrong_chain" in err and b"no output was written" in err
        assert not (tmp_path / "w.out").exists()
        assert not (tmp_path / "w.out.partial").exists()

        # lp with an explicit chain (zstd), results framing: the default before.
        data = bytes(range(256)) * 900
        (tmp_path / "in.bin").write_bytes(data)
        rc, _, err = await cli(p, alice, "stream", lease.hex(), "--in",
                               str(tmp_path / "in.bin"), "--out", str(tmp_path / "lp.out"),
                               "--packet", "5000", "--chain", "zstd")
        assert rc == 0, err.decode()
        out = zstandard.ZstdDecompressor().decompressobj().decompress(
            (tmp_path / "lp.out").read_bytes())
        assert b"".join(decode_packets(out)) == data


def _ts_packets(ts: bytes) -> list[Packet]:
    parser = MpegTs()
    return [*parser.feed(ts), *parser.end()]


async def test_interrupted_stream_keeps_partial_output_aside(tmp_path: Path) -> None:
    """The input comes from a pipe the test feeds: part of it, then (once output has
    been written) the provider's clock passes the lease's end, then the rest. The
    provider ends the stream (lease_ended); the command says so, OUT is untouched and
    the partial output is OUT.partial."""
    alice = tmp_path / "alice"
    async with provider_node(tmp_path) as p:
        lease = await lease_for(p, alice, chain=["identity"])
        out = tmp_path / "out.bin"
        out.write_bytes(b"an older complete output")
        partial = tmp_path / "out.bin.partial"
        cmd = [sys.executable, "-m", "node.cli", "client", "--dir", str(alice), "--node",
               p.addr, "--network", NET, "stream", lease.hex()[:16], "--out", str(out),
               "--packet", "1024"]
        with open(tmp_path / "stderr", "wb") as err, trio.fail_after(120):
            proc = await trio.lowlevel.open_process(cmd, stdin=subprocess.PIPE, stderr=err,
                                                    stdout=subprocess.DEVNULL)
            assert proc.stdin is not None
            block = bytes(range(256)) * 1200  # 300 KiB: more than one 256-packet segment
            await proc.stdin.send_all(block)
            while not (partial.exists() and partial.stat().st_size > 0):
                await trio.sleep(0.05)
            p.clock_offset[0] = 10 * 60_000  # the provider's clock: the lease is over
            with contextlib.suppress(trio.BrokenResourceError):
                await proc.stdin.send_all(block)
            await proc.stdin.aclose()
            rc = await proc.wait()
        text = (tmp_path / "stderr").read_text()
        assert rc == 1, text
        assert "stream failed (lease_ended)" in text and "acknowledged by the provider" in text
        assert "the partial output" in text and str(partial) in text
        assert out.read_bytes() == b"an older complete output"  # untouched
        assert 0 < partial.stat().st_size < 2 * len(block)


# A Ctrl-C at a terminal reaches a client whose SIGINT is at its default. A test run
# started in the background by a shell without job control (`pytest ... &` in a script,
# nohup'd or CI-launched runs) has SIGINT (and SIGQUIT) ignored, and an ignored signal
# stays ignored across fork and exec: the client would inherit that, Python then installs
# no KeyboardInterrupt handler (nor does trio), and a SIGINT is dropped by the kernel.
# (That is the Unix convention the client keeps, docs/client.md; it made this test fail
# whenever the suite was started in the background, and only then.) So the client starts
# as from a terminal, whatever started the tests.
AS_FROM_A_TERMINAL = ("import signal, sys; "
                      "signal.signal(signal.SIGINT, signal.default_int_handler); "
                      "from node.cli import main; sys.exit(main())")


async def test_ctrl_c_says_so_and_keeps_partial_output(tmp_path: Path) -> None:
    alice = tmp_path / "alice"
    async with provider_node(tmp_path) as p:
        lease = await lease_for(p, alice, chain=["identity"])
        out = tmp_path / "out.bin"
        partial = tmp_path / "out.bin.partial"
        cmd = [sys.executable, "-c", AS_FROM_A_TERMINAL, "client", "--dir", str(alice),
               "--node", p.addr, "--network", NET, "stream", lease.hex()[:16], "--out",
               str(out), "--packet", "1024"]
        with open(tmp_path / "stderr", "wb") as err, trio.fail_after(120):
            proc = await trio.lowlevel.open_process(cmd, stdin=subprocess.PIPE, stderr=err,
                                                    stdout=subprocess.DEVNULL)
            assert proc.stdin is not None
            await proc.stdin.send_all(bytes(range(256)) * 1200)
            while not (partial.exists() and partial.stat().st_size > 0):
                await trio.sleep(0.05)
            # stdin stays open: the read is abandoned. One Ctrl-C: unanswered, the stream
            # would stall on its unfinished last segment until the client's frame timeout
            # (exit 1, "stream failed (timeout)").
            proc.send_signal(signal.SIGINT)
            rc = await proc.wait()
            await proc.stdin.aclose()
        text = (tmp_path / "stderr").read_text()
        assert rc == 130, text
        assert "stream interrupted" in text and str(partial) in text
        assert not out.exists() and partial.stat().st_size > 0
