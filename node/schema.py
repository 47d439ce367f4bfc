"""A tiny declarative schema for event bodies and wire messages.

Each body kind, and each sync or query message, is a frozen dataclass whose fields
carry a `Spec` in their metadata. `Spec.check` validates one decoded msgpack value
and returns the Python value to store (lists become tuples, nested maps and arrays
become nested dataclasses); `Spec.dump` turns it back.

Two shapes: a `Struct` is a msgpack map with exactly its field names as keys (event
bodies); a `Row` is a msgpack array of its fields in declaration order (the parts of
a wire message), and a `Message` is a `Row` sent as `[TAG, field...]`. A failure names
the field: in a `Struct`, `InvalidEvent(reason="bad_schema")`; in a `Row`,
`InvalidMessage(reason="malformed")` (the class's `invalid`), so a peer's mistake is
reported precisely and counted under the protocol's own reason.
"""

from __future__ import annotations

import abc
import dataclasses
import re
import sys
from collections.abc import Callable
from typing import Any, ClassVar, Self

from . import codec
from .errors import InvalidEvent, InvalidMessage, PeerError, Reason

INT_MIN, INT_MAX = -(1 << 63), (1 << 63) - 1

Invalid = Callable[[str, str], PeerError]
"""Makes the error for a value at `path` that is wrong in the way `what` says."""


def _bad(path: str, what: str) -> InvalidEvent:
    return InvalidEvent(f"field {path!r}: {what}", Reason.BAD_SCHEMA)


def _bad_message(path: str, what: str) -> InvalidMessage:
    return InvalidMessage(f"field {path!r}: {what}", Reason.MALFORMED)


class Spec(abc.ABC):
    @abc.abstractmethod
    def check(self, v: Any, path: str, bad: Invalid = _bad) -> Any:
        """Validate a decoded wire value; return the Python value to store. `bad` makes
        the error (the enclosing `Struct` or `Row` decides which)."""

    def dump(self, v: Any) -> Any:
        return v


class Int(Spec):
    def __init__(self, lo: int = INT_MIN, hi: int = INT_MAX) -> None:
        self.lo, self.hi = lo, hi

    def check(self, v: Any, path: str, bad: Invalid = _bad) -> int:
        if type(v) is not int:
            raise bad(path, f"expected integer, got {type(v).__name__}")
        if not self.lo <= v <= self.hi:
            raise bad(path, f"{v} outside [{self.lo}, {self.hi}]")
        return v


class Bool(Spec):
    def check(self, v: Any, path: str, bad: Invalid = _bad) -> bool:
        if type(v) is not bool:
            raise bad(path, "expected boolean")
        return v


class Bytes(Spec):
    def __init__(self, lo: int, hi: int | None = None) -> None:
        self.lo, self.hi = lo, lo if hi is None else hi

    def check(self, v: Any, path: str, bad: Invalid = _bad) -> bytes:
        if type(v) is not bytes:
            raise bad(path, "expected bytes")
        if not self.lo <= len(v) <= self.hi:
            raise bad(path, f"length {len(v)} outside [{self.lo}, {self.hi}]")
        return v


class Str(Spec):
    def __init__(self, hi: int, lo: int = 0, pattern: str | None = None) -> None:
        self.lo, self.hi = lo, hi
        self.pattern = re.compile(pattern) if pattern else None

    def check(self, v: Any, path: str, bad: Invalid = _bad) -> str:
        if type(v) is not str:
            raise bad(path, "expected string")
        if not self.lo <= len(v) <= self.hi:
            raise bad(path, f"length {len(v)} outside [{self.lo}, {self.hi}]")
        if self.pattern is not None:
            if not self.pattern.fullmatch(v):
                raise bad(path, f"{v!r} does not match {self.pattern.pattern}")
            # Patterned strings are names (services, currencies, methods) that recur in
            # every event: one object each in the derived state, not one per event.
            return sys.intern(v)
        return v


class Enum(Spec):
    def __init__(self, *values: str) -> None:
        self.values = values

    def check(self, v: Any, path: str, bad: Invalid = _bad) -> str:
        if type(v) is not str or v not in self.values:
            raise bad(path, f"expected one of {', '.join(self.values)}")
        return self.values[self.values.index(v)]  # the shared constant, not a copy


class Opt(Spec):
    def __init__(self, inner: Spec) -> None:
        self.inner = inner

    def check(self, v: Any, path: str, bad: Invalid = _bad) -> Any:
        return None if v is None else self.inner.check(v, path, bad)

    def dump(self, v: Any) -> Any:
        return None if v is None else self.inner.dump(v)


class List(Spec):
    def __init__(self, inner: Spec, hi: int, unique: bool = False, lo: int = 0) -> None:
        self.inner, self.hi, self.unique, self.lo = inner, hi, unique, lo

    def check(self, v: Any, path: str, bad: Invalid = _bad) -> tuple[Any, ...]:
        if type(v) is not list:
            raise bad(path, "expected list")
        if len(v) > self.hi:
            raise bad(path, f"{len(v)} items, limit {self.hi}")
        if len(v) < self.lo:
            raise bad(path, f"{len(v)} items, at least {self.lo} needed")
        out = tuple(self.inner.check(x, f"{path}[{i}]", bad) for i, x in enumerate(v))
        if self.unique and len(set(out)) != len(out):
            raise bad(path, "duplicate items")
        return out

    def dump(self, v: Any) -> Any:
        return [self.inner.dump(x) for x in v]


class Fixed(Spec):
    """An array of exactly one value per spec (e.g. a pair); a tuple in Python."""

    def __init__(self, *items: Spec) -> None:
        self.items = items

    def check(self, v: Any, path: str, bad: Invalid = _bad) -> tuple[Any, ...]:
        if type(v) is not list or len(v) != len(self.items):
            raise bad(path, f"expected an array of {len(self.items)} items")
        return tuple(s.check(x, f"{path}[{i}]", bad) for i, (s, x) in enumerate(zip(
            self.items, v, strict=True)))

    def dump(self, v: Any) -> Any:
        return [s.dump(x) for s, x in zip(self.items, v, strict=True)]


class Nested(Spec):
    """A `Struct` (map) or `Row` (array) inside another; it reports with its own class's
    error."""

    def __init__(self, cls: type[Struct] | type[Row]) -> None:
        self.cls = cls

    def check(self, v: Any, path: str, bad: Invalid = _bad) -> Struct | Row:
        return self.cls.from_wire(v, path)

    def dump(self, v: Any) -> Any:
        return v.to_wire()


def f(spec: Spec, **kw: Any) -> Any:
    """Declare a dataclass field with its wire spec."""
    return dataclasses.field(metadata={"spec": spec}, **kw)


class _Declared(abc.ABC):
    """Frozen dataclasses whose fields are declared with `f(spec)`. Abstract: a shape
    (`Struct`, `Row`) says how it maps to msgpack with `from_wire`/`to_wire`, and
    mypy (and Python, at instantiation) rejects a class that does not."""

    @staticmethod
    def invalid(path: str, what: str) -> PeerError:
        """The error for a value of this class that is wrong (`validate` raises it)."""
        return _bad(path, what)

    @classmethod
    def _fields(cls) -> tuple[tuple[str, Spec], ...]:
        specs: tuple[tuple[str, Spec], ...] | None = cls.__dict__.get("_specs_cache")
        if specs is None:
            fields = dataclasses.fields(cls)  # type: ignore[arg-type]  # subclasses are dataclasses
            specs = tuple((fl.name, fl.metadata["spec"]) for fl in fields)
            setattr(cls, "_specs_cache", specs)  # noqa: B010 — cached per class
        return specs

    @classmethod
    @abc.abstractmethod
    def from_wire(cls, v: Any, path: str) -> Self:
        """Validate a decoded msgpack value (`path` names it in errors)."""

    @abc.abstractmethod
    def to_wire(self) -> Any:
        """The msgpack value this object encodes as."""

    def __post_init__(self) -> None:
        # Validate values given from Python too, so a bad value is never constructed.
        bad = self.invalid
        for name, spec in self._fields():
            v = getattr(self, name)
            if isinstance(v, list):
                v = tuple(v)
                object.__setattr__(self, name, v)
            spec.check(spec.dump(v), f"{self.__class__.__name__}.{name}", bad)
        self.validate()

    def validate(self) -> None:  # noqa: B027 (an optional hook, not abstract)
        """Cross-field rules; override and raise `self.reject(field, what)`."""

    def reject(self, field: str, what: str) -> PeerError:
        """The error for a cross-field rule broken at `field`."""
        return self.invalid(f"{type(self).__name__}.{field}", what)


class Struct(_Declared):
    """Base for frozen dataclasses that map 1:1 to msgpack maps (all keys present)."""

    @classmethod
    def from_map(cls, m: Any, path: str = "body") -> Self:
        if type(m) is not dict:
            raise cls.invalid(path, "expected map")
        fields = cls._fields()
        if len(m) != len(fields) or any(name not in m for name, _ in fields):
            want = sorted(n for n, _ in fields)
            raise cls.invalid(path, f"keys must be exactly {want}, got {sorted(m)}")
        # Bypass __post_init__: the specs below already check every value once.
        obj = cls.__new__(cls)
        bad = cls.invalid
        for name, spec in fields:
            object.__setattr__(obj, name, spec.check(m[name], f"{path}.{name}", bad))
        obj.validate()
        return obj

    def to_map(self) -> dict[str, Any]:
        return {name: spec.dump(getattr(self, name)) for name, spec in self._fields()}

    @classmethod
    def from_wire(cls, v: Any, path: str) -> Self:
        return cls.from_map(v, path)

    def to_wire(self) -> Any:
        return self.to_map()


class Row(_Declared):
    """Base for frozen dataclasses that map 1:1 to msgpack arrays, fields in order (the
    parts of sync and query messages)."""

    invalid = staticmethod(_bad_message)

    @classmethod
    def from_list(cls, v: Any, path: str | None = None) -> Self:
        path = cls.__name__ if path is None else path
        fields = cls._fields()
        if type(v) is not list or len(v) != len(fields):
            got = len(v) if type(v) is list else type(v).__name__
            raise cls.invalid(path, f"takes {len(fields)} fields, got {got}")
        obj = cls.__new__(cls)
        bad = cls.invalid
        for (name, spec), x in zip(fields, v, strict=True):
            object.__setattr__(obj, name, spec.check(x, f"{path}.{name}", bad))
        obj.validate()
        return obj

    def to_list(self) -> list[Any]:
        return [spec.dump(getattr(self, name)) for name, spec in self._fields()]

    @classmethod
    def from_wire(cls, v: Any, path: str) -> Self:
        return cls.from_list(v, path)

    def to_wire(self) -> Any:
        return self.to_list()


class Message(Row):
    """A protocol message encoded as `[TAG, field...]` (the sync and query protocols)."""

    TAG: ClassVar[int]

    def encode(self) -> bytes:
        return codec.pack([self.TAG, *self.to_list()])


class Messages:
    """The decoder of one direction of a protocol (e.g. sync requests): bounded
    decoding, then dispatch on the tag to the message class."""

    def __init__(self, protocol: str, kind: str, max_size: int, *classes: type[Message]) -> None:
        self.protocol, self.kind, self.max_size = protocol, kind, max_size
        self.by_tag = {c.TAG: c for c in classes}
        if len(self.by_tag) != len(classes):
            raise ValueError(f"{protocol} {kind}s: duplicate tags")

    def decode(self, data: bytes) -> Message:
        v = codec.unpack(data, self.max_size)
        if type(v) is not list or not v or type(v[0]) is not int:
            raise InvalidMessage(f"{self.protocol} message: must be an array starting with an "
                                 "integer tag", Reason.MALFORMED)
        cls = self.by_tag.get(v[0])
        if cls is None:
            raise InvalidMessage(f"unknown {self.protocol} {self.kind} tag {v[0]}",
                                 f"unknown_{self.kind}")
        return cls.from_list(v[1:], f"{self.protocol}.{cls.__name__}")


def bad(field: str, what: str) -> InvalidEvent:
    return _bad(field, what)
