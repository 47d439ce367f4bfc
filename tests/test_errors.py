"""The one exception hierarchy: every exception class bidmesh defines lives in
node/errors.py and descends from `BidmeshError`."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import node
from node import errors


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
