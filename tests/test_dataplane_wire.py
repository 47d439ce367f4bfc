"""Dataplane wire formats, the per-lease key, result verification and Subcontract records
(pure: no network)."""

from __future__ import annotations

import hashlib

import pytest

from node import codec
from node.dataplane import Contracts, ProcessRequest, SegmentLimits, StreamHeader, Trailer
from node.dataplane.dispatch import failure_kind
from node.dataplane.wire import (
    SESSION_ERROR_ID,
    SessionResponse,
    decode_outputs,
    encode_outputs,
    encode_session_error,
    encode_session_response,
    lease_key,
    session_response_parts,
)
from node.errors import (
    InvalidMessage,
    OperationError,
    PeerError,
    ProcessingError,
    Reason,
    RemoteError,
    RequestRefused,
    StreamClosed,
    StreamTimeout,
    UsageError,
)
from node.keys import Identity
from node.processors import ProcessContext, load_processors, verify_result
from node.processors.builtin import Exec
from node.segments import Step, encode_lp, new_parser

LEASE = hashlib.sha256(b"lease").digest()
KEY = hashlib.sha256(b"key").digest()
PROCS = load_processors()
DATA = b"hello segment " * 500


def header(**kw: object) -> StreamHeader:
    d: dict[str, object] = dict(lease=LEASE, stream_id=b"s" * 16, protocol="ts",
                                options={"pid_chains": {256: 1}, "default_chain": 0},
                                chains=(("zstd", "aes-gcm"), ("sha256",)),
                                limits=SegmentLimits(8, 4096, 50), delegation=b"t" * 100)
    d.update(kw)
    return StreamHeader(**d)  # type: ignore[arg-type]


def test_header_roundtrip_and_parser_options() -> None:
    h = header()
    back = StreamHeader.decode(h.encode(), 1 << 16)
    assert back == h
    assert back.parser_options() == {"n_chains": 2, "pid_chains": {256: 1}, "default_chain": 0}
    new_parser(back.protocol, **back.parser_options())
    lp = header(protocol="lp", options={"max_packet": 999}, delegation=None,
                limits=SegmentLimits())
    assert StreamHeader.decode(lp.encode(), 1 << 16) == lp


@pytest.mark.parametrize("patch, reason", [
    ({"v": 2}, "bad_version"),
    ({"proto": "rtp"}, "unknown_protocol"),
    ({"chains": []}, "bad_header"),
    ({"chains": [[""]]}, "bad_header"),
    ({"chains": [["x" * 65]]}, "bad_header"),
    ({"lease": b"short"}, "bad_header"),
    ({"stream": b""}, "bad_header"),
    ({"seg": {"max_packets": 0}}, "bad_header"),
    ({"opts": {"pid_chains": [[8192, 0]]}}, "bad_header"),
    ({"opts": {"pid_chains": [[1, 5]]}}, "bad_header"),
    ({"delegation": "text"}, "bad_header"),
])
def test_header_rejects_bad_fields(patch: dict[str, object], reason: str) -> None:
    d = codec.unpack(header().encode(), 1 << 16)
    d.update(patch)
    with pytest.raises(InvalidMessage) as e:
        StreamHeader.decode(codec.pack(d), 1 << 16)
    assert e.value.reason == reason


def test_header_size_bounded_and_not_a_map() -> None:
    with pytest.raises(InvalidMessage):
        StreamHeader.decode(header().encode(), 10)
    with pytest.raises(InvalidMessage):
        StreamHeader.decode(codec.pack([1, 2]), 1 << 16)
    with pytest.raises(UsageError):
        header(protocol="nope")


def test_trailer_roundtrip() -> None:
    t = Trailer(False, "oversized_packet", "too big", segments=3, bytes_in=10)
    assert Trailer.decode(t.encode()) == t
    with pytest.raises(InvalidMessage):
        Trailer.decode(codec.pack({"ok": "yes"}))


def test_process_request_and_outputs_roundtrip() -> None:
    r = ProcessRequest(LEASE, b"sid", 7, 1, ("aes-gcm",), KEY, DATA)
    assert ProcessRequest.decode(r.encode()) == r
    assert ProcessRequest.decode(ProcessRequest(LEASE, b"s", 0, 0, ("x",), None, b"").encode()
                                 ).key is None
    for bad in (b"", b"\x00\x00\x00\xff", r.encode()[:6], b"\x00\x00\x00\x01\x90"):
        with pytest.raises(InvalidMessage):
            ProcessRequest.decode(bad)
    outs = [b"a", b"", b"ccc"]
    assert decode_outputs(encode_outputs(outs), 3) == outs
    for bad in (b"", encode_outputs(outs)[:-1], encode_outputs(outs) + b"x"):
        with pytest.raises(InvalidMessage):
            decode_outputs(bad, 3)
    with pytest.raises(InvalidMessage):
        decode_outputs(encode_outputs(outs), 2)


def test_process_session_frames_roundtrip_and_reject_garbage() -> None:
    r = ProcessRequest(LEASE, b"sid", 7, 1, ("aes-gcm",), KEY, DATA)
    framed = r.encode(42)
    assert framed == r.encode_head(42) + DATA and framed[:8] == (42).to_bytes(8, "big")
    assert ProcessRequest.decode(framed, 8) == r
    for outs in ([b"only"], [b"a", b"", b"ccc"]):
        head, data = session_response_parts(9, outs)
        assert head + data == encode_session_response(9, outs)
        resp = SessionResponse.decode(head + data, len(outs))
        assert (resp.request_id, resp.ok, list(resp.outputs)) == (9, True, outs)
    err = SessionResponse.decode(encode_session_error(SESSION_ERROR_ID, "busy", "full"), None)
    assert (err.request_id, err.ok, err.reason, err.message) == (SESSION_ERROR_ID, False,
                                                                  "busy", "full")
    good = encode_session_response(3, [b"xy"])
    for bad, expected in ((b"", 1), (good[:8], 1), (good[:-1], 1), (good + b"z", 1),
                          (good, 2), (good, None), (good[:8] + b"\x07" + good[9:], 1),
                          (good[:8] + b"\x01\x09ab", None)):
        with pytest.raises(InvalidMessage):
            SessionResponse.decode(bad, expected)


def test_lease_key_is_agreed_by_both_sides_only() -> None:
    member, provider, other = (Identity.from_seed(bytes([i]) * 32) for i in (1, 2, 3))
    k1 = lease_key(member, provider.public, LEASE, member.public, provider.public)
    k2 = lease_key(provider, member.public, LEASE, member.public, provider.public)
    assert k1 == k2 and len(k1) == 32
    assert k1 != lease_key(member, provider.public, KEY, member.public, provider.public)
    k3 = lease_key(other, provider.public, LEASE, other.public, provider.public)
    assert k3 != k1  # another member of the same lease has its own key
    with pytest.raises(UsageError):
        lease_key(other, provider.public, LEASE, member.public, provider.public)
    with pytest.raises(PeerError):  # a low-order point is refused
        lease_key(member, bytes(32), LEASE, member.public, bytes(32))


# ------------------------------------------------------------------------ verify


CTX = ProcessContext(LEASE, b"stream", 3, KEY, step=1)


@pytest.mark.parametrize("service", ["identity", "sha256", "zstd", "zstd-d", "aes-gcm",
                                     "aes-gcm-d"])
def test_verify_accepts_real_results_and_rejects_garbage(service: str) -> None:
    data = DATA
    if service == "zstd-d":
        data = PROCS["zstd"].process(DATA, CTX)
    if service == "aes-gcm-d":
        data = PROCS["aes-gcm"].process(DATA, CTX)
    out = PROCS[service].process(data, CTX)
    assert verify_result(PROCS, service, data, out, CTX) is True
    for garbage in (out[:-1] + bytes([out[-1] ^ 1]), b"", data + b"x"):
        if garbage == out:
            continue
        with pytest.raises(ProcessingError):
            verify_result(PROCS, service, data, garbage, CTX)


def test_verify_catches_wrong_nonce_step_and_other_level() -> None:
    enc = PROCS["aes-gcm"].process(DATA, CTX.at_step(0))  # decrypts fine, wrong position
    with pytest.raises(ProcessingError, match="nonce"):
        verify_result(PROCS, "aes-gcm", DATA, enc, CTX)
    # A different zstd level is still well-formed zstd of the input: accepted.
    lvl = ProcessContext(LEASE, b"stream", 3, params={"zstd_level": 9})
    assert verify_result(PROCS, "zstd", DATA, PROCS["zstd"].process(DATA, lvl), CTX)


def test_unverifiable_services_are_taken_on_trust() -> None:
    procs = dict(PROCS, **{"exec:cat": Exec("exec:cat", ("cat",))})
    assert verify_result(procs, "exec:cat", b"a", b"b", CTX) is False
    assert verify_result(procs, "unknown", b"a", b"b", CTX) is False


def test_contracts_record_per_contractor() -> None:
    c = Contracts()
    b, d = b"\x02" * 32, b"\x01" * 32
    step = Step(("aes-gcm",), False, 1)
    c.add(b, step, 1, b"in1", b"out1")
    c.add(b, step, 0, b"in0", b"out0")
    c.add(d, Step(("sha256",), False, 2), 0, b"x", b"y")
    bodies = c.bodies(LEASE)
    assert [x.contractor for x in bodies] == [d, b] and c.segments == 3
    sub = bodies[1]
    want = hashlib.sha256(hashlib.sha256(b"out0").digest() + hashlib.sha256(b"out1").digest())
    assert sub.segments == 2 and sub.bytes_in == 6 and sub.result_digest == want.digest()
    assert sub.services == ("aes-gcm",)


def test_encode_lp_roundtrips_through_the_parser() -> None:
    from node.segments import Packet

    pkts = [Packet(b"a" * 10, 0), Packet(b"", 1), Packet(b"xyz", 1)]
    parser = new_parser("lp", n_chains=2)
    assert parser.feed(encode_lp(pkts)) + parser.end() == pkts
    assert encode_lp([b"ab"]) == b"\x00\x00\x00\x02\x00ab"


def test_a_contractor_that_went_away_failed_one_that_answered_wrong_sent_garbage() -> None:
    for e in (OperationError("cannot reach"), StreamTimeout("no answer"),
              RemoteError("reset"), StreamClosed("closed before a frame"),
              RequestRefused("busy", Reason.BUSY),
              InvalidMessage("stream ended inside a frame body", Reason.TRUNCATED)):
        assert failure_kind(e) == "failed", e
    for e in (InvalidMessage("not in flight", Reason.BAD_RESPONSE),
              InvalidMessage("too long", Reason.OVERSIZED_RESPONSE),
              ProcessingError("does not verify")):
        assert failure_kind(e) == "garbage", e
