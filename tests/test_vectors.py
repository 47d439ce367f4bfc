"""docs/test-vectors.json and docs/PROTOCOL.md agree with the code."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

from node import codec
from node.errors import InvalidEvent
from node.events import KINDS, decode_wire, domain_tag, sign_event
from node.testing import sign_raw

ROOT = Path(__file__).resolve().parent.parent
VECTORS: list[dict[str, Any]] = json.loads((ROOT / "docs" / "test-vectors.json").read_text())
PROTOCOL = (ROOT / "docs" / "PROTOCOL.md").read_text()


def _make_vectors() -> Any:
    spec = importlib.util.spec_from_file_location("make_vectors", ROOT / "docs" /
                                                  "make_vectors.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_coverage() -> None:
    valid_kinds = {v["kind"] for v in VECTORS if v["valid"]}
    assert valid_kinds == set(KINDS)
    reasons = {v["reason"] for v in VECTORS if not v["valid"]}
    assert {"bad_signature", "non_canonical", "unknown_kind", "oversized", "bad_schema",
            "malformed"} <= reasons
    assert any(v["signed_with_network"] != v["network"] for v in VECTORS)


@pytest.mark.parametrize("v", VECTORS, ids=[v["description"] for v in VECTORS])
def test_vector(v: dict[str, Any]) -> None:
    seed = bytes.fromhex(v["seed_hex"])
    signed, sig = bytes.fromhex(v["signed_hex"]), bytes.fromhex(v["sig_hex"])
    wire = bytes.fromhex(v["wire_hex"])
    assert bytes.fromhex(v["domain_tag_hex"]) == domain_tag(v["network"])
    assert hashlib.sha256(signed).hexdigest() == v["id_hex"]
    resigned = sign_raw(seed, signed, v["signed_with_network"])
    if "corrupted" in v["description"] or "flipped" in v["description"]:
        assert resigned != sig
    else:
        assert resigned == sig  # deterministic Ed25519 over tag + signed
    if v["valid"]:
        ev = decode_wire(wire, v["network"])
        assert ev.id.hex() == v["id_hex"] and ev.signed == signed and ev.sig == sig
        assert codec.pack([signed, sig]) == wire
        # Signing the decoded content from the seed reproduces every byte.
        again = sign_event(seed, ev.seq, ev.prev, ev.ts_ms, ev.body, v["network"])
        assert (again.signed, again.sig, again.wire) == (signed, sig, wire)
    else:
        with pytest.raises(InvalidEvent) as ei:
            decode_wire(wire, v["network"])
        assert ei.value.reason == v["reason"]


def test_vectors_and_tables_are_fresh() -> None:
    mod = _make_vectors()
    assert mod.make_vectors() == VECTORS, "run docs/make_vectors.py"
    assert mod.render_protocol(PROTOCOL) == PROTOCOL, "run docs/make_vectors.py"


def test_every_field_of_every_kind_is_documented() -> None:
    for kind, cls in KINDS.items():
        assert f"#### `{kind}`" in PROTOCOL
        for name, _ in cls._fields():
            assert f"| `{name}` |" in PROTOCOL, (kind, name)


def test_placeholder_sections_present() -> None:
    import re

    for title in ("Replication protocol", "Query protocol", "Derivation rules"):
        assert re.search(rf"^## \d+\. {title}$", PROTOCOL, re.M), title
