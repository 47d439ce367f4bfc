"""Canonical msgpack: bounded decoding and the canonical-form check.

Canonical means: the bytes are exactly what `packb` produces for the decoded value
(shortest int/str/bin/array/map headers), maps have string keys in ascending UTF-8
byte order, and there are no floats or extension types. Every decoder that reads
peer input goes through `unpack`, so limits live in one place.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

import msgpack

from .errors import InvalidMessage, Reason

# Generous per-item limits; the caller's total size cap is the real bound.
_LIMITS: dict[str, int] = {
    "max_str_len": 1 << 20,
    "max_bin_len": 4 << 20,
    "max_array_len": 1 << 16,
    "max_map_len": 1 << 10,
    "max_ext_len": 0,
}


def _no_ext(code: int, data: bytes) -> Any:
    raise InvalidMessage("msgpack extension types are not allowed", Reason.MALFORMED)


def pack(value: Any) -> bytes:
    """Encode with sorted map keys, bin for bytes, str for text."""
    return msgpack.packb(_sorted(value), use_bin_type=True)  # type: ignore[no-any-return]


def _sorted(value: Any) -> Any:
    # Exact types first (the hot path: every envelope we sign goes through here).
    # Plain `sorted` on str keys is UTF-8 byte order: code points compare as their
    # UTF-8 encodings do.
    t = type(value)
    if t is dict or (t is not list and t is not tuple and isinstance(value, dict)):
        return {k: _sorted(value[k]) for k in sorted(value)}
    if t is list or t is tuple or isinstance(value, (list, tuple)):
        return [v if type(v) in _SCALARS else _sorted(v) for v in value]
    return value


_SCALARS = frozenset({bytes, str, int, bool, type(None)})


def unpack(data: bytes, max_size: int) -> Any:
    """Decode peer bytes with limits; raise InvalidMessage on anything odd."""
    if len(data) > max_size:
        raise InvalidMessage(f"message is {len(data)} bytes, limit {max_size}", Reason.OVERSIZED)
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            ext_hook=_no_ext,
            **_LIMITS,
        )
    except InvalidMessage:
        raise
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        # ExtraData, FormatError, StackError and invalid UTF-8 all land here.
        raise InvalidMessage(f"not valid msgpack: {e}", Reason.MALFORMED) from e


def unpack_canonical(data: bytes, max_size: int) -> Any:
    """Decode and insist the bytes are the one canonical encoding of the value.

    Equivalent to `pack(unpack(data)) == data` after checking for floats, non-string
    map keys and nesting, but cheaper: map keys are checked for ascending order while
    walking (str order is UTF-8 byte order), then the value is re-encoded as decoded,
    which catches non-shortest headers and duplicate keys."""
    value = unpack(data, max_size)
    t = type(value)
    if t is list or t is dict:
        in_order = _walk(value, 0)
    elif t is float:
        raise InvalidMessage("floats are not allowed; use integer units", Reason.MALFORMED)
    else:
        in_order = True
    if not in_order or msgpack.packb(value, use_bin_type=True) != data:
        raise InvalidMessage("encoding is not canonical", Reason.NON_CANONICAL)
    return value


MAX_DEPTH = 16  # the top-level value is at depth 0; no value may sit deeper than 16


def _walk(value: Any, depth: int) -> bool:
    """Check a container (at `depth`) for floats, non-str keys and depth; return whether
    every map's keys are in strictly ascending order."""
    if depth >= MAX_DEPTH and value:
        raise InvalidMessage("nesting too deep", Reason.MALFORMED)
    in_order = True
    if type(value) is dict:
        last = None
        items: Any = value.items()
        for k, v in items:
            if type(k) is not str:
                raise InvalidMessage("map keys must be strings", Reason.MALFORMED)
            if last is not None and k <= last:
                in_order = False
            last = k
            tv = type(v)
            if tv is list or tv is dict:
                in_order = _walk(v, depth + 1) and in_order
            elif tv is float:
                raise InvalidMessage("floats are not allowed; use integer units", Reason.MALFORMED)
    else:
        for v in value:
            tv = type(v)
            if tv is list or tv is dict:
                in_order = _walk(v, depth + 1) and in_order
            elif tv is float:
                raise InvalidMessage("floats are not allowed; use integer units", Reason.MALFORMED)
    return in_order


T = TypeVar("T")


def fast_pickle(cls: type[T]) -> type[T]:
    """Faster pickling for a `slots=True` dataclass (apply above `@dataclass`).

    Python 3.11's generated `__getstate__`/`__setstate__` call `dataclasses.fields()`
    per object; a market snapshot (node/marketview.py) holds hundreds of thousands of
    these records, and that call was ~a quarter of loading one. Same state (the field
    values in order), so snapshots read either way."""
    names = tuple(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]
    set_ = object.__setattr__

    def getstate(self: T) -> list[Any]:
        return [getattr(self, n) for n in names]

    def setstate(self: T, state: list[Any]) -> None:
        for n, v in zip(names, state, strict=True):
            set_(self, n, v)

    setattr(cls, "__getstate__", getstate)  # noqa: B010 (mypy: no method assignment)
    setattr(cls, "__setstate__", setstate)  # noqa: B010
    return cls
