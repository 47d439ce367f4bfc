"""Fuzzing node config loading (TOML): arbitrary bytes, mutations of the example
file, and well-formed TOML with arbitrary keys and values.

Contract (node/config.py): `load` raises only ConfigError, naming the file and the
key; whatever it accepts is usable. The three bugs found here (a "~user" path, deep
nesting, a NUL in a path) are fixed; their tests stay as regressions."""

from __future__ import annotations

import dataclasses
import datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from node import config
from node.errors import ConfigError

from .mutations import FUZZ, mutated

EXAMPLE = (Path(__file__).parents[2] / "config" / "node.example.toml").read_bytes()
KEYS = {name: [f.name for f in dataclasses.fields(cls)] for name, cls in config.SECTIONS.items()}


def _load(tmp: Path, data: bytes) -> config.Config | None:
    path = tmp / "node.toml"
    path.write_bytes(data)
    try:
        cfg = config.load(path)
    except ConfigError as e:
        assert str(path) in str(e), "the error names the file"
        return None
    assert cfg.source == path
    return cfg


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, datetime.date):
        return v.isoformat()
    if isinstance(v, float) and v != v:
        return "nan"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + "".join(c if c.isalnum() or c in "/._-: " else f"\\u{ord(c):04x}"
                             for c in v) + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return "{" + ", ".join(f'"{k}" = {_toml(x)}' for k, x in v.items()) + "}"


SCALARS = st.one_of(
    st.booleans(), st.integers(-(1 << 63), (1 << 63) - 1),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30),
    st.sampled_from(["main", "/ip4/1.2.3.4/tcp/1", "/ip4/1.2.3.4/tcp/1/p2p/x", "debug", "",
                     "relative/dir", "/abs/dir", "-net", "UPPER"]),
    st.dates(),
)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3), max_leaves=6)


@st.composite
def toml_docs(draw: st.DrawFn) -> bytes:
    lines = []
    for section in draw(st.lists(st.sampled_from([*KEYS, "nodes", "extra"]), max_size=4,
                                 unique=True)):
        lines.append(f"[{section}]")
        known = KEYS.get(section, ["x"])
        for key in draw(st.lists(st.sampled_from([*known, "typo"]), max_size=5, unique=True)):
            value = draw(VALUES)
            lines.append(f"{key} = {_toml(value)}")
    return "\n".join(lines).encode()


def test_example_config_loads(tmp_path: Path) -> None:
    cfg = _load(tmp_path, EXAMPLE)
    assert cfg is not None and cfg.node.network == "main"


def test_arbitrary_bytes(tmp_path: Path) -> None:
    @FUZZ
    @given(st.binary(max_size=200))
    def inner(data: bytes) -> None:
        _load(tmp_path, data)

    inner()


def test_mutated_example(tmp_path: Path) -> None:
    @FUZZ
    @given(mutated(EXAMPLE, max_ops=3))
    def inner(data: bytes) -> None:
        _load(tmp_path, data)

    inner()


def test_well_formed_toml_with_arbitrary_keys_and_values(tmp_path: Path) -> None:
    @FUZZ
    @given(toml_docs())
    def inner(data: bytes) -> None:
        cfg = _load(tmp_path, data)
        if cfg is not None:
            assert cfg.p2p.reconnect_min_s <= cfg.p2p.reconnect_max_s
            assert cfg.node.data_dir.is_absolute()

    inner()


def test_unreadable_paths_are_config_errors(tmp_path: Path) -> None:
    for path in (tmp_path / "missing.toml", tmp_path):
        with pytest.raises(ConfigError):
            config.load(path)


# ------------------------------------------------------------------ found bugs (config.py), fixed


def test_tilde_of_unknown_user_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data_dir"):
        _load_strict(tmp_path, b'[node]\ndata_dir = "~no_such_user_bidmesh/x"\n')


def test_deeply_nested_toml_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        _load_strict(tmp_path, b"[node]\nnetwork = " + b"[" * 3000 + b"]" * 3000 + b"\n")


def test_nul_in_path_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data_dir"):
        _load_strict(tmp_path, b'[node]\ndata_dir = "/tmp/a\\u0000b"\n')


def _load_strict(tmp: Path, data: bytes) -> config.Config:
    path = tmp / "node.toml"
    path.write_bytes(data)
    return config.load(path)
