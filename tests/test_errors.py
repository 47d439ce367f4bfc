"""The one exception hierarchy: every exception class bidmesh defines lives in
node/errors.py and descends from `BidmeshError`."""

from __future__ import annotations

import importlib
import inspect
import json
import pkgutil
from pathlib import Path

import node
from node import codec, errors


def _modules() -> list[str]:
    return [m.name for m in pkgutil.walk_packages(node.__path__, "node.")
            if not m.name.endswith("__main__")]


def test_every_exception_class_is_in_errors() -> None:
    outside = []
    for name in _modules():
        mod = importlib.import_module(name)
        for attr, obj in vars(mod).items():
            if (inspect.isclass(obj) and issubclass(obj, BaseException)
                    and obj.__module__ == name and name != "node.errors"):
                outside.append(f"{name}.{attr}")
    assert outside == []


def test_every_error_descends_from_the_root() -> None:
    for obj in vars(errors).values():
        if (inspect.isclass(obj) and issubclass(obj, BaseException)
                and obj.__module__ == "node.errors"):
            assert issubclass(obj, errors.BidmeshError), obj


def test_reason_codes_are_their_strings_everywhere() -> None:
    """A StrEnum member is its string: on the wire, in JSON and as a counter key."""
    assert errors.Reason.MALFORMED == "malformed"
    assert json.dumps({errors.Reason.BAD_SCHEMA: errors.Reason.EOF}) == '{"bad_schema": "eof"}'
    assert codec.pack([errors.Reason.OVERSIZED]) == codec.pack(["oversized"])
    assert errors.InvalidMessage("x", errors.Reason.TRUNCATED).reason == "truncated"


def test_every_test_vector_reason_is_a_reason_code() -> None:
    vectors = json.loads((Path(__file__).parents[1] / "docs/test-vectors.json").read_text())
    reasons = {v["reason"] for v in vectors if "reason" in v}
    assert reasons and reasons <= set(errors.Reason)
