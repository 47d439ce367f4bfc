"""Fuzzing the query protocol (light client <-> node): message decoders and the
node's `QueryService.handle`.

Contract (node/query.py): decoders raise only InvalidMessage; `handle` raises only
InvalidMessage or RateLimited (both become a refusal on the wire; anything else
resets the stream and is a bug); answers decode, stay within the page limits and
never change the ledger unless the request was a SUBMIT of valid records."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from market_helpers import World, key
from testkit import fake_id

from node import codec, query
from node.errors import InvalidMessage, RateLimited
from node.ledger import Status

from .mutations import FUZZ, FUZZ_SLOW, TREES, mutated, packb, structurally_mutated
from .test_hostile_market import Base

K = fake_id("k")
REQUESTS: list[query.QueryRequest] = [
    query.GetEvents((K,)), query.FindEvents("bid", K, None, query.Page(0, 10, 2048)),
    query.AuctionBundle(K), query.ReputationBundle((K, fake_id("j"))), query.LeasesOf(K),
    query.GetHeads((K,)), query.GetDigest(), query.Submit((b"\x92\xc4\x00",)),
]
RESPONSES: list[query.QueryResponse] = [
    query.EventsPage((b"abc", b"d"), 7, True),
    query.Heads((query.HeadInfo(K, 2, K, 5, None), query.HeadInfo(K, 0, None, 0, 1))),
    query.Digest("testnet", K, 1, 2, 3),
    query.Submitted((query.SubmitResult("rejected", K, "bad_signature", "x"),
                     query.SubmitResult("accepted", None, None, ""))),
]


def _decode_both(data: bytes) -> None:
    for decode in (query.decode_request, query.decode_response):
        try:
            msg = decode(data)
        except InvalidMessage:
            continue
        assert decode(msg.encode()) == msg


@FUZZ
@given(st.binary(max_size=300))
def test_decoders_arbitrary_bytes(data: bytes) -> None:
    _decode_both(data)


@FUZZ
@given(st.sampled_from(REQUESTS + RESPONSES).flatmap(lambda m: mutated(m.encode())))
def test_decoders_mutations(data: bytes) -> None:
    _decode_both(data)


@FUZZ
@given(st.sampled_from(REQUESTS + RESPONSES).flatmap(
    lambda m: structurally_mutated(codec.unpack(m.encode(), 1 << 22))))
def test_decoders_structural_mutations(value: Any) -> None:
    _decode_both(packb(value))


@FUZZ
@given(st.integers(-2, 10), st.lists(TREES, max_size=5))
def test_decoders_any_tag_any_fields(tag: int, fields: list[Any]) -> None:
    value = [tag, *fields]
    _decode_both(packb(value))


@pytest.mark.parametrize("status", [[], {}])
def test_submitted_with_unhashable_status_is_invalid_message(status: Any) -> None:
    """Regression (found by this fuzzing, fixed in query.py 7c6b04f): a list or map
    status raised TypeError('unhashable type') out of decode_response."""
    with pytest.raises(InvalidMessage):
        query.decode_response(packb([query.Submitted.TAG, [[status, None, None, ""]]]))


# ------------------------------------------------------------------ the node side


def test_handle_raises_only_refusals(tmp_path: Path) -> None:
    w = World(tmp_path)
    b = Base(w)
    wires = [e.wire for e in w.events]
    svc = query.QueryService(w.ledger, None, w.ledger.append, "test", submit_rate=1e9,
                             submit_burst=1e9)
    ids = [e.id for e in w.events]
    real = [
        query.GetEvents(tuple(ids[:5])), query.FindEvents(None, None, None),
        query.AuctionBundle(b.req.id), query.ReputationBundle((key("P1"), key("R"))),
        query.LeasesOf(key("R")), query.GetHeads((key("P1"), K)), query.GetDigest(),
        query.Submit(tuple(wires[:3])),
    ]

    @FUZZ_SLOW
    @given(st.one_of(
        st.binary(max_size=200),
        st.sampled_from(real + REQUESTS).flatmap(lambda m: mutated(m.encode())),
        st.sampled_from(real).flatmap(
            lambda m: structurally_mutated(codec.unpack(m.encode(), 1 << 22))).map(packb),
        st.sampled_from(real).map(lambda m: m.encode()),
    ))
    def inner(payload: bytes) -> None:
        digest, count = w.ledger.digest(), w.ledger.count()
        try:
            out = trio.run(svc.handle, b"p" * 32, payload)
        except (InvalidMessage, RateLimited):
            assert (w.ledger.digest(), w.ledger.count()) == (digest, count)
            return
        resp = query.decode_response(out)
        if isinstance(resp, query.EventsPage):
            assert len(resp.records) <= query.MAX_LIMIT + query.MAX_IDS
        if isinstance(resp, query.Submitted):
            if all(r.status != Status.ACCEPTED.value for r in resp.results):
                assert w.ledger.count() == count
        else:
            assert (w.ledger.digest(), w.ledger.count()) == (digest, count)

    inner()
    assert w.ledger.verify_all() == []


def test_submit_flood_is_rate_limited(tmp_path: Path) -> None:
    w = World(tmp_path)
    Base(w)
    now = [0.0]
    svc = query.QueryService(w.ledger, None, w.ledger.append, "test", submit_rate=1.0,
                             submit_burst=4.0, clock=lambda: now[0])
    junk = query.Submit(tuple(bytes([i + 1]) for i in range(4))).encode()
    trio.run(svc.handle, b"p" * 32, junk)  # the burst
    with pytest.raises(RateLimited):
        trio.run(svc.handle, b"p" * 32, junk)
    trio.run(svc.handle, b"q" * 32, junk)  # per peer: another peer is not starved
    now[0] += 4.0
    trio.run(svc.handle, b"p" * 32, junk)  # refilled with time
    assert svc.stats.rate_limited == 1
