"""A tiny declarative schema for event bodies.

Each body kind is a frozen dataclass whose fields carry a `Spec` in their metadata.
`Spec.check` validates one decoded msgpack value and returns the Python value to
store (lists become tuples, nested maps become nested dataclasses); `Spec.dump` turns
it back. Validation failures raise `InvalidEvent(reason="bad_schema")` naming the
field, so a peer's mistake is reported precisely.
"""

from __future__ import annotations

import abc
import dataclasses
import re
import sys
from typing import Any, Self

from .errors import InvalidEvent

INT_MIN, INT_MAX = -(1 << 63), (1 << 63) - 1


def _bad(path: str, what: str) -> InvalidEvent:
    return InvalidEvent(f"field {path!r}: {what}", "bad_schema")


class Spec(abc.ABC):
    @abc.abstractmethod
    def check(self, v: Any, path: str) -> Any:
        """Validate a decoded wire value; return the Python value to store."""

    def dump(self, v: Any) -> Any:
        return v


class Int(Spec):
    def __init__(self, lo: int = INT_MIN, hi: int = INT_MAX) -> None:
        self.lo, self.hi = lo, hi

    def check(self, v: Any, path: str) -> int:
        if type(v) is not int:
            raise _bad(path, f"expected integer, got {type(v).__name__}")
        if not self.lo <= v <= self.hi:
            raise _bad(path, f"{v} outside [{self.lo}, {self.hi}]")
        return v


class Bool(Spec):
    def check(self, v: Any, path: str) -> bool:
        if type(v) is not bool:
            raise _bad(path, "expected boolean")
        return v


class Bytes(Spec):
    def __init__(self, lo: int, hi: int | None = None) -> None:
        self.lo, self.hi = lo, lo if hi is None else hi

    def check(self, v: Any, path: str) -> bytes:
        if type(v) is not bytes:
            raise _bad(path, "expected bytes")
        if not self.lo <= len(v) <= self.hi:
            raise _bad(path, f"length {len(v)} outside [{self.lo}, {self.hi}]")
        return v


class Str(Spec):
    def __init__(self, hi: int, lo: int = 0, pattern: str | None = None) -> None:
        self.lo, self.hi = lo, hi
        self.pattern = re.compile(pattern) if pattern else None

    def check(self, v: Any, path: str) -> str:
        if type(v) is not str:
            raise _bad(path, "expected string")
        if not self.lo <= len(v) <= self.hi:
            raise _bad(path, f"length {len(v)} outside [{self.lo}, {self.hi}]")
        if self.pattern is not None:
            if not self.pattern.fullmatch(v):
                raise _bad(path, f"{v!r} does not match {self.pattern.pattern}")
            # Patterned strings are names (services, currencies, methods) that recur in
            # every event: one object each in the derived state, not one per event.
            return sys.intern(v)
        return v


class Enum(Spec):
    def __init__(self, *values: str) -> None:
        self.values = values

    def check(self, v: Any, path: str) -> str:
        if type(v) is not str or v not in self.values:
            raise _bad(path, f"expected one of {', '.join(self.values)}")
        return self.values[self.values.index(v)]  # the shared constant, not a copy


class Opt(Spec):
    def __init__(self, inner: Spec) -> None:
        self.inner = inner

    def check(self, v: Any, path: str) -> Any:
        return None if v is None else self.inner.check(v, path)

    def dump(self, v: Any) -> Any:
        return None if v is None else self.inner.dump(v)


class List(Spec):
    def __init__(self, inner: Spec, hi: int, unique: bool = False) -> None:
        self.inner, self.hi, self.unique = inner, hi, unique

    def check(self, v: Any, path: str) -> tuple[Any, ...]:
        if type(v) is not list:
            raise _bad(path, "expected list")
        if len(v) > self.hi:
            raise _bad(path, f"{len(v)} items, limit {self.hi}")
        out = tuple(self.inner.check(x, f"{path}[{i}]") for i, x in enumerate(v))
        if self.unique and len(set(out)) != len(out):
            raise _bad(path, "duplicate items")
        return out

    def dump(self, v: Any) -> Any:
        return [self.inner.dump(x) for x in v]


class Nested(Spec):
    def __init__(self, cls: type[Struct]) -> None:
        self.cls = cls

    def check(self, v: Any, path: str) -> Struct:
        return self.cls.from_map(v, path)

    def dump(self, v: Any) -> Any:
        return v.to_map()


def f(spec: Spec, **kw: Any) -> Any:
    """Declare a dataclass field with its wire spec."""
    return dataclasses.field(metadata={"spec": spec}, **kw)


class Struct:
    """Base for frozen dataclasses that map 1:1 to msgpack maps (all keys present)."""

    @classmethod
    def _fields(cls) -> tuple[tuple[str, Spec], ...]:
        specs: tuple[tuple[str, Spec], ...] | None = cls.__dict__.get("_specs_cache")
        if specs is None:
            fields = dataclasses.fields(cls)  # type: ignore[arg-type]  # subclasses are dataclasses
            specs = tuple((fl.name, fl.metadata["spec"]) for fl in fields)
            setattr(cls, "_specs_cache", specs)  # noqa: B010 — cached per class
        return specs

    @classmethod
    def from_map(cls, m: Any, path: str = "body") -> Self:
        if type(m) is not dict:
            raise _bad(path, "expected map")
        fields = cls._fields()
        if len(m) != len(fields) or any(name not in m for name, _ in fields):
            want = sorted(n for n, _ in fields)
            raise _bad(path, f"keys must be exactly {want}, got {sorted(m)}")
        # Bypass __post_init__: the specs below already check every value once.
        obj = cls.__new__(cls)
        for name, spec in fields:
            object.__setattr__(obj, name, spec.check(m[name], f"{path}.{name}"))
        obj.validate()
        return obj

    def to_map(self) -> dict[str, Any]:
        return {name: spec.dump(getattr(self, name)) for name, spec in self._fields()}

    def __post_init__(self) -> None:
        # Validate values given from Python too, so a bad body is never constructed.
        for name, spec in self._fields():
            v = getattr(self, name)
            if isinstance(v, list):
                v = tuple(v)
                object.__setattr__(self, name, v)
            spec.check(spec.dump(v), f"{self.__class__.__name__}.{name}")
        self.validate()

    def validate(self) -> None:
        """Cross-field rules; override and raise via `bad()`."""


def bad(field: str, what: str) -> InvalidEvent:
    return _bad(field, what)

