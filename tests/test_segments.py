"""Pure dataplane core: parsers, segment encoding, segmenter, plan, reorder, rates."""

from __future__ import annotations

import hashlib
import itertools
import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.errors import PeerError, UsageError
from node.processors import ProcessContext, load_processors
from node.segments import (
    PROTOCOLS,
    FrameReader,
    LengthPrefixed,
    MpegTs,
    Packet,
    RateMeter,
    ReorderBuffer,
    Segment,
    Segmenter,
    Step,
    TokenBucket,
    decode_packets,
    encode_frame,
    encode_packets,
    local_reference,
    new_parser,
    plan,
)

LEASE = bytes(range(32))
KEY = bytes(32 - i for i in range(32))


def lp(payload: bytes, chain: int = 0) -> bytes:
    return struct.pack(">IB", len(payload), chain) + payload


def ts(pid: int, fill: int) -> bytes:
    return bytes([0x47, (pid >> 8) & 0x1F, pid & 0xFF, 0x10]) + bytes([fill]) * 184


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def parse_all(parser: LengthPrefixed | MpegTs, chunks: list[bytes]) -> list[Packet]:
    out: list[Packet] = []
    for c in chunks:
        out += parser.feed(c)
    return out + parser.end()


# ------------------------------------------------------------------------- parsers

payloads = st.lists(st.tuples(st.binary(max_size=300), st.integers(0, 3)), max_size=20)


@settings(deadline=None)  # CI machines are shared; timing is not under test
@given(payloads, st.lists(st.integers(0, 10_000), max_size=30))
def test_lp_any_chunking_same_packets(items: list[tuple[bytes, int]], cuts: list[int]) -> None:
    stream = b"".join(lp(p, c) for p, c in items)
    parser = LengthPrefixed(n_chains=4)
    got = parse_all(parser, chunked(stream, cuts))
    assert got == [Packet(p, c) for p, c in items]
    assert parser.packets == len(items) and parser.bytes == len(stream)
    assert parser.garbage_bytes == 0


def test_lp_oversized_is_fatal() -> None:
    parser = LengthPrefixed(max_packet=100)
    assert parser.feed(lp(b"x" * 100)) == [Packet(b"x" * 100)]
    with pytest.raises(PeerError) as e:
        parser.feed(lp(b"y" * 101)[:5])  # the header alone is enough to refuse
    assert e.value.reason == "oversized_packet"
    assert parser.oversized == 1
    with pytest.raises(UsageError):
        parser.feed(b"more")


def test_lp_default_limit_is_one_mib() -> None:
    parser = LengthPrefixed()
    assert parser.feed(lp(b"\0" * (1 << 20)))[0].data == b"\0" * (1 << 20)
    with pytest.raises(PeerError, match="exceeds"):
        parser.feed(struct.pack(">IB", (1 << 20) + 1, 0))


def test_lp_truncated_and_unknown_chain() -> None:
    parser = LengthPrefixed()
    parser.feed(lp(b"abc")[:-1])
    with pytest.raises(PeerError) as e:
        parser.end()
    assert e.value.reason == "truncated_packet"
    with pytest.raises(PeerError) as e:
        LengthPrefixed(n_chains=2).feed(lp(b"abc", 2))
    assert e.value.reason == "unknown_chain"


ts_items = st.lists(
    st.tuples(st.booleans(), st.integers(0, 3), st.binary(max_size=400)), max_size=12
)


@settings(deadline=None)  # CI machines are shared; timing is not under test
@given(ts_items, st.lists(st.integers(0, 10_000), max_size=30))
def test_ts_any_chunking_same_packets(
    items: list[tuple[bool, int, bytes]], cuts: list[int]
) -> None:
    stream = b"".join(ts(pid, i) if pkt else junk for i, (pkt, pid, junk) in enumerate(items))
    ref = parse_all(MpegTs(pid_chains={1: 1, 2: 2}), [stream])
    assert all(len(p.data) == 188 and p.data[0] == 0x47 for p in ref)
    if all(pkt for pkt, _, _ in items):  # clean streams lose nothing
        assert [p.data for p in ref] == [ts(pid, i) for i, (_, pid, _) in enumerate(items)]
    parser = MpegTs(pid_chains={1: 1, 2: 2})
    assert parse_all(parser, chunked(stream, cuts)) == ref
    assert parser.bytes == len(stream)
    assert parser.garbage_bytes + 188 * len(ref) == len(stream)


def test_ts_resync_after_garbage() -> None:
    # Garbage holding false sync bytes, including one 188 bytes before a real packet's
    # middle: only a 0x47 followed by 0x47 at +188 (or the stream end) locks.
    garbage = b"\x47\x00\x01" + b"\x47" * 5 + bytes(50)
    pkts = [ts(0x100, i) for i in range(4)]
    stream = pkts[0] + garbage + pkts[1] + pkts[2] + b"\xff" * 7 + pkts[3]
    parser = MpegTs(pid_chains={0x100: 1})
    out = parse_all(parser, [stream[i : i + 13] for i in range(0, len(stream), 13)])
    assert [p.data for p in out] == pkts
    assert {p.chain for p in out} == {1}
    assert parser.garbage_bytes == len(garbage) + 7
    assert parser.packets == 4


def test_ts_single_packet_locks_at_end_of_stream() -> None:
    parser = MpegTs()
    assert parser.feed(ts(5, 1)) == []  # cannot confirm the lock yet
    assert parser.end() == [Packet(ts(5, 1), 0)]


def test_ts_pid_map_and_default() -> None:
    parser = MpegTs(pid_chains={17: 2}, default_chain=1, n_chains=3)
    out = parse_all(parser, [ts(17, 0) + ts(18, 0) + ts(17, 0)])
    assert [p.chain for p in out] == [2, 1, 2]
    with pytest.raises(UsageError):
        MpegTs(pid_chains={17: 5}, n_chains=3)


def test_protocol_registry() -> None:
    assert set(PROTOCOLS) == {"lp", "ts"}
    assert isinstance(new_parser("ts", pid_chains={1: 1}), MpegTs)
    assert new_parser("lp", max_packet=10).max_packet == 10  # type: ignore[attr-defined]
    with pytest.raises(PeerError) as e:
        new_parser("rtp")
    assert e.value.reason == "unknown_protocol"


# ---------------------------------------------------------------- segment encoding


@settings(deadline=None)  # CI machines are shared; timing is not under test
@given(st.lists(st.binary(max_size=100), max_size=20))
def test_encode_decode_roundtrip(packets: list[bytes]) -> None:
    assert decode_packets(encode_packets(packets)) == packets


@pytest.mark.parametrize(
    "data", [b"\x00\x00\x00", b"\x00\x00\x00\x05abc", b"\x00\x00\x00\x01a\x00"]
)
def test_decode_malformed(data: bytes) -> None:
    with pytest.raises(PeerError) as e:
        decode_packets(data)
    assert e.value.reason == "malformed_segment"


def test_decode_bounded_count() -> None:
    with pytest.raises(PeerError, match="more than 3"):
        decode_packets(encode_packets([b""] * 4), max_packets=3)


# ---------------------------------------------------------------------- segmenter


def test_segment_digest_and_validation() -> None:
    s = Segment(0, 0, encode_packets([b"a"]), 1)
    assert s.digest == hashlib.sha256(s.data).digest()
    with pytest.raises(UsageError):
        Segment(-1, 0, s.data, 1)
    with pytest.raises(UsageError):
        Segment(0, 0, b"", 1)


def test_segmenter_cuts_by_count() -> None:
    seg = Segmenter(max_packets=3, max_bytes=1 << 20)
    out = [s for i in range(7) for s in seg.push(Packet(bytes([i])), 0)] + seg.flush()
    assert [s.packets for s in out] == [3, 3, 1]
    assert [s.seq for s in out] == [0, 1, 2]
    assert decode_packets(out[1].data) == [b"\3", b"\4", b"\5"]
    assert seg.flush() == []


def test_segmenter_cuts_by_bytes() -> None:
    seg = Segmenter(max_packets=100, max_bytes=30)  # encoded: 4 + 10 per packet
    out = [s for _ in range(5) for s in seg.push(Packet(b"x" * 10), 0)] + seg.flush()
    assert [s.packets for s in out] == [2, 2, 1]
    assert all(len(s.data) <= 30 for s in out)
    big = Segmenter(max_packets=100, max_bytes=30)
    assert big.push(Packet(b"a"), 0) == []
    cut = big.push(Packet(b"y" * 50), 0)  # would overflow: closes the open one, then itself
    assert [s.packets for s in cut] == [1, 1] and len(cut[1].data) == 54


def test_segmenter_cuts_by_time() -> None:
    seg = Segmenter(max_packets=100, max_bytes=1 << 20, max_age_ms=50)
    assert seg.deadline_ms is None
    assert seg.push(Packet(b"a"), 1000) == []
    assert seg.deadline_ms == 1050
    assert seg.tick(1049) == []
    assert seg.push(Packet(b"b"), 1049) == []
    [s] = seg.tick(1050)
    assert s.packets == 2 and seg.deadline_ms is None
    seg.push(Packet(b"c"), 2000)
    [late] = seg.push(Packet(b"d"), 2100)  # overdue segment closes before d joins
    assert decode_packets(late.data) == [b"c"]
    assert seg.flush()[0].seq == 2


def test_segmenter_chain_change_closes() -> None:
    seg = Segmenter(max_packets=100, max_bytes=1 << 20)
    out: list[Segment] = []
    for chain in [0, 0, 1, 1, 1, 0]:
        out += seg.push(Packet(b"p", chain), 0)
    out += seg.flush()
    assert [(s.chain, s.packets) for s in out] == [(0, 2), (1, 3), (0, 1)]


# --------------------------------------------------------------------------- plan


def test_plan_groups_runs() -> None:
    got = plan(["zstd", "aes-gcm", "sha256", "identity", "exec:x"], {"zstd", "identity"})
    assert got == [
        Step(("zstd",), True, 0),
        Step(("aes-gcm", "sha256"), False, 1),
        Step(("identity",), True, 3),
        Step(("exec:x",), False, 4),
    ]
    assert plan([], {"zstd"}) == []
    assert plan(["a", "b"], set()) == [Step(("a", "b"), False, 0)]
    with pytest.raises(PeerError):
        plan(["zstd", ""], {"zstd"})


# ------------------------------------------------------------------------ reorder


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 8), st.data())
def test_reorder_any_permutation_within_window(window: int, data: st.DataObject) -> None:
    n = data.draw(st.integers(0, 40))
    buf = ReorderBuffer(window)
    pending = list(range(min(window, n)))
    dispatched = len(pending)
    released: list[int] = []
    seen: list[int] = []
    dups = 0
    while pending:
        seq = pending.pop(data.draw(st.integers(0, len(pending) - 1)))
        seen.append(seq)
        for s, r in buf.put(seq, f"r{seq}".encode()):
            assert r == f"r{s}".encode()
            released.append(s)
        if data.draw(st.booleans()):  # a late duplicate of something already put
            assert buf.put(data.draw(st.sampled_from(seen)), b"dup") == []
            dups += 1
        while dispatched < n and buf.accepts(dispatched):
            pending.append(dispatched)
            dispatched += 1
    assert released == list(range(n))
    assert buf.duplicates == dups
    assert buf.pending == 0 and buf.next_seq == n


def test_reorder_window_and_duplicates() -> None:
    buf = ReorderBuffer(3)
    assert buf.put(1, b"b") == [] and buf.pending == 1
    assert buf.put(1, b"b2") == [] and buf.duplicates == 1
    with pytest.raises(UsageError, match="beyond the reorder window"):
        buf.put(3, b"d")
    assert buf.put(0, b"a") == [(0, b"a"), (1, b"b")]
    assert buf.put(0, b"again") == [] and buf.duplicates == 2
    assert buf.window_end == 5 and buf.put(4, b"e") == []


# ------------------------------------------------------------------------- rates


def test_token_bucket_basic() -> None:
    tb = TokenBucket(rate_bps=1000, burst_bytes=500)
    assert tb.take(500, 0) == 0
    assert tb.take(100, 0) == 100  # 100 bytes at 1000 B/s
    assert tb.take(100, 100) == 0
    assert tb.take(1, 100) == 1
    tb.take(0, 50)  # a clock going backwards neither refills nor breaks anything
    assert tb.available(100) == 0
    assert tb.available(10_000) == 500  # capped at burst
    with pytest.raises(UsageError):
        tb.take(501, 20_000)


def test_token_bucket_two_members_share_the_rate() -> None:
    rate, burst = 10_000, 2_000
    tb = TokenBucket(rate, burst)
    rng = random.Random(7)
    ready = {"a": 0, "b": 0}
    sent = {"a": 0, "b": 0}
    log: list[tuple[int, int]] = []
    now = 0
    while now < 10_000:  # 10 simulated seconds, both members always want to send
        member = min(ready, key=lambda m: (ready[m], m))
        now = max(now, ready[member])
        n = rng.randint(100, 1500)
        wait = tb.take(n, now)
        if wait == 0:
            sent[member] += n
            log.append((now, n))
        else:
            ready[member] = now + wait
    total = sum(sent.values())
    assert total <= burst + rate * now // 1000
    assert total >= rate * now // 1000 * 9 // 10  # the limiter does not starve them
    assert min(sent.values()) > total // 4  # neither member is shut out
    for i, (t0, _) in enumerate(log):  # no window exceeds rate·window + burst
        in_window = sum(n for t, n in log[i:] if t < t0 + 1000)
        assert in_window <= burst + rate


def test_rate_meter_shortfalls() -> None:
    m = RateMeter(min_rate_bps=1000, window_ms=1000, start_ms=0)
    assert m.record(1500, 100) == []
    assert m.record(200, 1500) == []  # closes window 0 (1500 ≥ 1000): fine
    [s] = m.advance(2000)  # window 1 got 200 < 1000
    assert (s.start_ms, s.end_ms, s.bytes, s.expected) == (1000, 2000, 200, 1000)
    [merged] = m.advance(5000)  # three empty windows merge with the previous span
    assert (merged.start_ms, merged.end_ms, merged.ms) == (1000, 5000, 4000)
    assert m.shortfall_ms == 4000 and len(m.shortfalls) == 1
    m.record(5000, 5100)
    assert m.advance(6000) == []
    [tail] = m.close(6500)  # a partial last window is judged pro rata
    assert (tail.start_ms, tail.end_ms, tail.expected) == (6000, 6500, 500)
    assert m.total_bytes == 6700 and m.shortfall_ms == 4500


# ----------------------------------------------------------------- output stream


def test_frames_roundtrip_any_chunking() -> None:
    frames = [(i, bytes([i]) * i * 7) for i in range(20)]
    stream = b"".join(encode_frame(s, r) for s, r in frames)
    assert stream[:12] == struct.pack(">IQ", 8, 0)
    reader = FrameReader()
    got = [f for i in range(0, len(stream), 5) for f in reader.feed(stream[i : i + 5])]
    reader.end()
    assert got == frames
    bad = FrameReader(max_frame=100)
    with pytest.raises(PeerError):
        bad.feed(struct.pack(">IQ", 101, 0))
    short = FrameReader()
    short.feed(stream[:20])
    with pytest.raises(PeerError):
        short.end()


def test_local_reference_matches_manual_processing() -> None:
    packets = [Packet(bytes([i]) * (i * 37 % 500), i // 6 % 2) for i in range(30)]
    chains = [["zstd", "aes-gcm"], ["sha256"]]
    out = local_reference(
        packets, chains, max_packets=4, max_bytes=1000, lease_id=LEASE, stream_id=b"s1", key=KEY
    )
    procs = load_processors()
    seg = Segmenter(4, 1000)
    segments = [s for p in packets for s in seg.push(p, 0)] + seg.flush()
    frames = FrameReader().feed(out)
    assert [s for s, _ in frames] == list(range(len(segments)))
    for s, (_, result) in zip(segments, frames, strict=True):
        ctx = ProcessContext(LEASE, b"s1", s.seq, KEY)
        if s.chain == 1:
            assert result == hashlib.sha256(s.data).digest()
        else:
            plain = procs["zstd-d"].process(procs["aes-gcm-d"].process(result, ctx.at_step(1)), ctx)
            assert plain == s.data
    # Deterministic: the same input gives the same bytes.
    assert out == local_reference(
        packets, chains, max_packets=4, max_bytes=1000, lease_id=LEASE, stream_id=b"s1", key=KEY
    )
    with pytest.raises(UsageError):
        local_reference(packets, chains[:1], max_packets=4, max_bytes=1000,
                        lease_id=LEASE, stream_id=b"s1", key=KEY)
