"""atheris: query protocol messages (`query.decode_request`, `decode_response`).
Only InvalidMessage may escape; decoded messages round-trip."""

from __future__ import annotations

import _common

_common.instrument()

from testkit import fake_id  # noqa: E402

from node import query  # noqa: E402
from node.errors import InvalidMessage  # noqa: E402

K = fake_id("k")


def test_one(data: bytes) -> None:
    for decode in (query.decode_request, query.decode_response):
        try:
            msg = decode(data)
        except InvalidMessage:
            continue
        if decode(msg.encode()) != msg:
            raise AssertionError("decoded message does not round-trip")


SEEDS = [m.encode() for m in (
    query.GetEvents((K,)), query.FindEvents("bid", K, None), query.AuctionBundle(K),
    query.ReputationBundle((K,)), query.LeasesOf(K), query.GetHeads((K,)),
    query.GetDigest(), query.Submit((b"x",)), query.EventsPage((b"a",), 1, False),
    query.Heads((query.HeadInfo(K, 1, K, 2, None),)), query.Digest("main", K, 1, 1, 0),
    query.Submitted((query.SubmitResult("accepted", K, None, ""),)))]

if __name__ == "__main__":
    _common.main("query", test_one, SEEDS)
