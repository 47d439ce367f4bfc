"""Fuzzing member-device delegation tokens (`Lease.check_delegation`,
`DeviceAdmission.admit`): a device presents a token on the dataplane, so the bytes
are a peer's. Contract: only Unauthorized escapes; a token that is not exactly one
the recipient (or a group member) signed for this lease and this device never
admits anyone."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from testkit import fake_id, seed

from node.auction import DeviceAdmission, Lease, make_delegation
from node.errors import Unauthorized
from node.keys import Identity

from .mutations import FUZZ, mutated

RECIPIENT = Identity.from_seed(seed(600))
MEMBER = Identity.from_seed(seed(601))
OUTSIDER = Identity.from_seed(seed(602))
DEVICE = Identity.from_seed(seed(603)).public


def _lease(max_devices: int | None = None) -> Lease:
    return Lease(
        id=fake_id("lease"), request=fake_id("req"), bid=fake_id("bid"),
        provider=fake_id("provider"), recipient=RECIPIENT.public, service="zstd", chain=(),
        start_ms=100, end_ms=200, max_rate_bps=None, min_rate_bps=None, price=1,
        currency="EUR", devices=(), phones=("+4915112345678",), users=("alice",),
        max_devices=max_devices, group_members=(MEMBER.public,), payers=(), sponsorships=(),
    )


LEASE = _lease()
GOOD = make_delegation(RECIPIENT, LEASE.id, DEVICE, "alice")
GOOD_MEMBER = make_delegation(MEMBER, LEASE.id, DEVICE, "+4915112345678")


def test_valid_tokens_admit() -> None:
    assert LEASE.check_delegation(DEVICE, GOOD) == "alice"
    assert LEASE.check_delegation(DEVICE, GOOD_MEMBER) == "+4915112345678"


@FUZZ
@given(st.binary(max_size=200), st.binary(max_size=40))
def test_arbitrary_tokens(token: bytes, device: bytes) -> None:
    try:
        LEASE.check_delegation(device, token)
    except Unauthorized:
        return
    raise AssertionError("random bytes must never admit")


@FUZZ
@given(st.sampled_from([GOOD, GOOD_MEMBER]).flatmap(mutated))
def test_mutated_tokens(token: bytes) -> None:
    try:
        label = LEASE.check_delegation(DEVICE, token)
    except Unauthorized:
        return
    assert token in (GOOD, GOOD_MEMBER) and label in ("alice", "+4915112345678")


def test_token_bound_to_lease_device_signer_and_label() -> None:
    cases = [
        (DEVICE, make_delegation(RECIPIENT, fake_id("other lease"), DEVICE, "alice")),
        (fake_id("other device"), GOOD),
        (DEVICE, make_delegation(OUTSIDER, LEASE.id, DEVICE, "alice")),
        (DEVICE, make_delegation(RECIPIENT, LEASE.id, DEVICE, "mallory")),  # not a member
        (DEVICE, OUTSIDER.public + GOOD[32:]),  # signer swapped
        (DEVICE, GOOD[:96] + b"bob"),  # label swapped under the old signature
    ]
    for device, token in cases:
        try:
            LEASE.check_delegation(device, token)
        except Unauthorized:
            continue
        raise AssertionError(f"admitted {token!r}")


def test_max_devices_is_enforced_per_device_and_window() -> None:
    lease = _lease(max_devices=1)
    adm = DeviceAdmission(lease)
    tok = make_delegation(RECIPIENT, lease.id, DEVICE, "phone-1")
    assert adm.admit(DEVICE, 150, tok) == "phone-1"
    assert adm.admit(DEVICE, 151, tok) == "phone-1"  # the same device again is fine
    other = Identity.from_seed(seed(604)).public
    for at, token in ((150, make_delegation(RECIPIENT, lease.id, other, "phone-2")),
                      (99, tok), (200, tok), (150, None)):
        try:
            adm.admit(other if token is not tok else DEVICE, at, token)
        except Unauthorized:
            continue
        raise AssertionError("admitted beyond max_devices, outside the window or unsigned")
