"""atheris: node config files (`config.load`). Only ConfigError may escape.

Two escapes are known (strict xfails in tests/reliability/test_fuzz_config.py) and
skipped here: "~user" paths (RuntimeError) and deep nesting (RecursionError)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import _common

_common.instrument()

from node import config  # noqa: E402
from node.errors import ConfigError  # noqa: E402

EXAMPLE = (_common.ROOT / "config" / "node.example.toml").read_bytes()
FD, NAME = tempfile.mkstemp(suffix=".toml", prefix="bidmesh-fuzz-config-")
os.close(FD)
PATH = Path(NAME)


def test_one(data: bytes) -> None:
    if b"~" in data or data.count(b"[") > 200 or data.count(b"{") > 200:
        return  # the known escapes
    PATH.write_bytes(data)
    with contextlib.suppress(ConfigError):
        config.load(PATH)


SEEDS = [EXAMPLE, b"[node]\nnetwork = \"x\"\n", b"[p2p]\nlisten = [\"/ip4/1.2.3.4/tcp/1\"]\n"]

if __name__ == "__main__":
    try:
        _common.main("config", test_one, SEEDS)
    finally:
        PATH.unlink(missing_ok=True)
