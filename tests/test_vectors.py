"""docs/test-vectors.json and docs/PROTOCOL.md agree with the code."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
from testkit import sign_raw

from node import codec, recon, sync
from node.errors import InvalidEvent
from node.events import KINDS, decode_wire, domain_tag, sign_event

ROOT = Path(__file__).resolve().parent.parent
ALL: list[dict[str, Any]] = json.loads((ROOT / "docs" / "test-vectors.json").read_text())
VECTORS = [v for v in ALL if "protocol" not in v]  # event records
SYNC2 = [v for v in ALL if v.get("protocol") == "sync/2"]  # PROTOCOL.md §7.5
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
    assert mod.make_vectors() == ALL, "run docs/make_vectors.py"
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


def _item(v: dict[str, Any]) -> tuple[bytes, recon.Item]:
    id_ = bytes.fromhex(v["id_hex"]) if v["id_hex"] else None
    return bytes.fromhex(v["author_hex"]), recon.Item(v["seq"], id_, v["fork_seq"])


@pytest.mark.parametrize("v", SYNC2, ids=[v["description"] for v in SYNC2])
def test_sync2_vector(v: dict[str, Any]) -> None:
    """Each /sync/2 vector, recomputed from its inputs by the spec's formulas (here the
    code's), and every message decodes to what re-encodes to the same bytes."""
    if "item_hash_hex" in v:
        a, it = _item(v)
        got = hashlib.sha256(recon.ITEM_DOMAIN + a + it.seq.to_bytes(8, "big")
                             + (it.id or bytes(32))
                             + (it.fork_seq or 0).to_bytes(8, "big")).digest()
        assert got.hex() == v["item_hash_hex"]
        assert recon.item_hash(a, it).to_bytes(32, "little") == got
    elif "fingerprint_hex" in v:
        total = sum(recon.item_hash(*_item(i)) for i in v["items"]) % recon.MOD
        assert total.to_bytes(32, "little").hex() == v["sum_hex"]
        salt = bytes.fromhex(v["salt_hex"])
        fp = hashlib.sha256(recon.FP_DOMAIN + salt + total.to_bytes(32, "little")
                            + v["count"].to_bytes(8, "little")).digest()[:recon.FP_BYTES]
        assert fp.hex() == v["fingerprint_hex"]
    elif "prefix_hex" in v:
        assert recon.node_bytes(v["prefix"], v["bits"]).hex() == v["prefix_hex"]
        assert recon.node_from_bytes(bytes.fromhex(v["prefix_hex"]), v["bits"]) == v["prefix"]
    else:
        req = sync.decode_request(bytes.fromhex(v["request_hex"]), 2)
        assert req.encode().hex() == v["request_hex"]
        if "response_hex" in v:
            items = dict(_item(i) for i in v["items"])
            index = recon.ReconIndex(items.get, items.items())
            assert isinstance(req, sync.ReconRequest)
            resp = sync.serve_recon_index(index, req)
            assert resp.encode().hex() == v["response_hex"]
            assert sync.decode_response(bytes.fromhex(v["response_hex"]), 2) == resp
