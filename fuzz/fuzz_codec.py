"""atheris: the canonical msgpack codec (`codec.unpack`, `codec.unpack_canonical`).

Only InvalidMessage may escape; accepted bytes are the canonical encoding."""

from __future__ import annotations

import contextlib

import _common

_common.instrument()

from testkit import Chain, sample_bodies, seed  # noqa: E402

from node import codec  # noqa: E402
from node.errors import InvalidMessage  # noqa: E402

LIMIT = 1 << 16


def test_one(data: bytes) -> None:
    with contextlib.suppress(InvalidMessage):
        codec.unpack(data, LIMIT)
    try:
        value = codec.unpack_canonical(data, LIMIT)
    except InvalidMessage:
        return
    if codec.pack(value) != data:
        raise AssertionError("unpack_canonical accepted a non-canonical encoding")


SEEDS = [Chain(seed(1)).next(b).signed for b in sample_bodies().values()] + [
    codec.pack({"a": [1, -1, None, True, b"x", "y", {"b": 1 << 40}]})]

if __name__ == "__main__":
    _common.main("codec", test_one, SEEDS)
