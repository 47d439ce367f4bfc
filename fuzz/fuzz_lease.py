"""atheris: member-device delegation tokens (`Lease.check_delegation`). Only
Unauthorized may escape; nothing but the genuine token admits."""

from __future__ import annotations

import _common

_common.instrument()

from testkit import fake_id, seed  # noqa: E402

from node.auction import Lease, make_delegation  # noqa: E402
from node.errors import Unauthorized  # noqa: E402
from node.keys import Identity  # noqa: E402

RECIPIENT = Identity.from_seed(seed(40))
DEVICE = Identity.from_seed(seed(41)).public
LEASE = Lease(
    id=fake_id("lease"), request=fake_id("req"), bid=fake_id("bid"), provider=fake_id("p"),
    recipient=RECIPIENT.public, service="zstd", chain=(), start_ms=0, end_ms=10,
    max_rate_bps=None, min_rate_bps=None, price=1, currency="EUR", devices=(), phones=(),
    users=("alice",), max_devices=None, group_members=(), payers=(), sponsorships=())
GOOD = make_delegation(RECIPIENT, LEASE.id, DEVICE, "alice")


def test_one(data: bytes) -> None:
    try:
        LEASE.check_delegation(DEVICE, data)
    except Unauthorized:
        return
    if data != GOOD:
        raise AssertionError("a token that was not signed admitted a device")


SEEDS = [GOOD, GOOD[:-1], GOOD[:96] + b"bob"]

if __name__ == "__main__":
    _common.main("lease", test_one, SEEDS)
