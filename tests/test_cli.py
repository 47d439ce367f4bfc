"""The `bidmesh` command, run as a real subprocess."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from testkit import NETWORK, Chain, fake_id, sample_bodies, seed

from node import paths
from node.events import Bid
from node.keys import Identity
from node.ledger import Ledger

ROOT = Path(__file__).resolve().parent.parent


def bidmesh(*args: str | Path, check: int | None = 0) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "node.cli", *map(str, args)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    if check is not None:
        assert proc.returncode == check, (proc.stdout, proc.stderr)
    return proc


def js(*args: str | Path) -> object:
    return json.loads(bidmesh(*args, "--json").stdout)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ledger with every kind, two authors, and one fork."""
    d = tmp_path_factory.mktemp("node")
    a, b = Chain(seed(1)), Chain(seed(2))
    with Ledger(paths.ledger_path(d), network=NETWORK) as led:
        for body in sample_bodies().values():
            led.append(a.next(body).wire)
        led.append_many([b.next() .wire for _ in range(3)])
        led.append(b.make(3, b.events[1].id, Bid(request=fake_id("x"), price=1)).wire)
    return d


def test_help_and_module_entry() -> None:
    out = bidmesh("--help").stdout
    assert "keygen" in out and "ledger" in out
    out = bidmesh("ledger", "--help").stdout
    for cmd in ("summary", "events", "show", "verify", "digest", "export", "import"):
        assert cmd in out


def test_console_script_installed() -> None:
    exe = ROOT / ".venv" / "bin" / "bidmesh"
    if not exe.exists():
        pytest.skip("no .venv/bin/bidmesh (run python3 dev.py setup)")
    proc = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "bidmesh" in proc.stdout


def test_keygen(tmp_path: Path) -> None:
    out = js("keygen", "--data-dir", tmp_path)
    assert isinstance(out, dict)
    key = paths.key_path(tmp_path)
    assert out["key_file"] == str(key) and len(out["public_key"]) == 64
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    if "peer_id" in out:
        assert out["peer_id"].startswith("12D3KooW")
    proc = bidmesh("keygen", "--data-dir", tmp_path, check=2)
    assert "--force" in proc.stderr and proc.stderr.count("\n") == 1 and not proc.stdout
    again = js("keygen", "--out", key, "--force")
    assert isinstance(again, dict) and again["public_key"] != out["public_key"]
    human = bidmesh("keygen", "--out", tmp_path / "other.key").stdout
    assert "public_key" in human


def test_summary(data_dir: Path) -> None:
    s = js("ledger", "--data-dir", data_dir, "summary")
    assert isinstance(s, dict)
    assert s["network"] == NETWORK  # read from the ledger, no --network needed
    assert s["events"] == 11 + 3 and s["authors"] == 2
    assert s["kinds"]["bid"] == 1 + 3 and s["kinds"]["request"] == 1
    assert s["forked_authors"] == 1 and s["fork_proofs"] == 1 and s["pending"] is None
    with Ledger(paths.ledger_path(data_dir), network=NETWORK, readonly=True) as led:
        assert s["digest"] == led.digest().hex()
    human = bidmesh("ledger", "--data-dir", data_dir, "summary").stdout
    assert "digest" in human and "KIND" in human and "subcontract" in human


def test_events_filters(data_dir: Path) -> None:
    base = ("ledger", "--data-dir", data_dir, "events")
    allev = js(*base)
    assert isinstance(allev, list) and len(allev) == 14
    bids = js(*base, "--kind", "bid")
    assert isinstance(bids, list) and {e["kind"] for e in bids} == {"bid"} and len(bids) == 4
    author = Chain(seed(2)).public.hex()
    mine = js(*base, "--author", author[:10])
    assert isinstance(mine, list) and [e["seq"] for e in mine] == [1, 2, 3]
    ts = Chain(seed(1)).ts_ms + 10  # seq 10 and later of author 1, and none of author 2
    since = js(*base, "--since", str(ts))
    assert isinstance(since, list) and len(since) == 2
    iso = js(*base, "--since", "2023-11-14T22:13:20.010Z")
    assert iso == since
    assert len(js(*base, "--limit", "3")) == 3  # type: ignore[arg-type]
    human = bidmesh(*base, "--kind", "bid").stdout.splitlines()
    assert human[0].split()[:3] == ["#", "TIME", "(UTC)"] and len(human) == 2 + 4
    assert len({line.index("bid") for line in human[2:]}) == 1  # aligned column
    proc = bidmesh(*base, "--since", "yesterday", check=2)
    assert "ISO" in proc.stderr
    proc = bidmesh(*base, "--kind", "nope", check=2)


def test_show(data_dir: Path) -> None:
    with Ledger(paths.ledger_path(data_dir), network=NETWORK, readonly=True) as led:
        (_, ev), = led.events(kind="award")
    out = js("ledger", "--data-dir", data_dir, "show", ev.id.hex())
    assert isinstance(out, dict)
    assert out["id"] == ev.id.hex() and out["kind"] == "award" and out["counts"] is True
    assert out["body"]["winner"] == ev.body.winner.hex()  # type: ignore[attr-defined]
    human = bidmesh("ledger", "--data-dir", data_dir, "show", ev.id.hex()[:12]).stdout
    assert "body.considered_count" in human
    proc = bidmesh("ledger", "--data-dir", data_dir, "show", "00" * 32, check=2)
    assert "no event" in proc.stderr
    bidmesh("ledger", "--data-dir", data_dir, "show", "zz", check=2)


def test_verify_and_digest(data_dir: Path, tmp_path: Path) -> None:
    out = js("ledger", "--data-dir", data_dir, "verify")
    assert isinstance(out, dict) and out["ok"] is True and out["events"] == 14
    assert "ok" in bidmesh("ledger", "--data-dir", data_dir, "verify").stdout
    d = bidmesh("ledger", "--data-dir", data_dir, "digest").stdout.strip()
    assert len(d) == 64
    dj = js("ledger", "--data-dir", data_dir, "digest")
    assert isinstance(dj, dict) and dj["digest"] == d
    # Tamper with a stored record: verify finds it and exits 1.
    bad = tmp_path / "bad"
    bad.mkdir()
    c = Chain(seed(3))
    with Ledger(paths.ledger_path(bad), network=NETWORK) as led:
        led.append_many([c.next().wire for _ in range(3)])
        w = bytearray(led.range(c.public, 2, 1)[0])
        w[-1] ^= 1
        led.db.execute("UPDATE events SET wire=? WHERE seq=2", (bytes(w),))
    proc = bidmesh("ledger", "--data-dir", bad, "verify", check=1)
    assert "bad_signature" in proc.stdout
    out = json.loads(bidmesh("ledger", "--data-dir", bad, "verify", "--json", check=1).stdout)
    assert out["ok"] is False and len(out["problems"]) == 1


def test_export_import_round_trip(data_dir: Path, tmp_path: Path) -> None:
    f = tmp_path / "dump.bin"
    ex = js("ledger", "--data-dir", data_dir, "export", f)
    assert isinstance(ex, dict) and ex["events"] == 14 and ex["fork_proofs"] == 1
    fresh = tmp_path / "fresh"
    im = js("ledger", "--data-dir", fresh, "--network", NETWORK, "import", f)
    assert isinstance(im, dict)
    assert im["accepted"] == 14 and im["rejected"] == 0 and im["fork"] == 1
    d1 = bidmesh("ledger", "--data-dir", data_dir, "digest").stdout
    d2 = bidmesh("ledger", "--data-dir", fresh, "digest").stdout
    assert d1 == d2
    # Importing again: all duplicates (the fork record again reports the fork).
    im = js("ledger", "--data-dir", fresh, "import", f)
    assert isinstance(im, dict) and im["duplicate"] == 14 + 1 and im["accepted"] == 0


def test_import_reports_bad_records(tmp_path: Path) -> None:
    c, o = Chain(seed(4)), Chain(seed(5))
    good = [c.next().wire for _ in range(4)]
    orphan = o.make(3, fake_id("p")).wire  # its predecessor is in no file
    flipped = bytearray(good[2])
    flipped[-1] ^= 0x10  # in the signature
    data = good[0] + good[1] + bytes(flipped) + orphan + good[3] + b"\x92\xc4\x05abc"
    f = tmp_path / "bad.bin"
    f.write_bytes(data)
    d = tmp_path / "n"
    proc = bidmesh("ledger", "--data-dir", d, "--network", NETWORK, "import", f, check=1)
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith("record 3: rejected: bad_signature")
    assert lines[1].startswith("record 4: pending: missing_prev")
    assert lines[2].startswith("record 5: pending: missing_prev")  # seq 4 after the bad 3
    assert lines[3].startswith("record 6: rejected: truncated")
    assert "2 accepted" in proc.stdout and "2 pending" in proc.stdout
    out = json.loads(bidmesh("ledger", "--data-dir", d, "import", f, "--json", check=1).stdout)
    assert out["duplicate"] == 2 and out["still_pending"] == 2
    assert [p["reason"] for p in out["problems"]] == ["bad_signature", "missing_prev",
                                                     "missing_prev", "truncated"]
    # The good records were kept.
    s = js("ledger", "--data-dir", d, "summary")
    assert isinstance(s, dict) and s["events"] == 2


def test_import_wrong_network_hint(data_dir: Path, tmp_path: Path) -> None:
    f = tmp_path / "dump.bin"
    bidmesh("ledger", "--data-dir", data_dir, "export", f)
    proc = bidmesh("ledger", "--data-dir", tmp_path / "x", "import", f, check=1)
    assert "--network" in proc.stderr


def test_errors_are_one_line(tmp_path: Path, data_dir: Path) -> None:
    proc = bidmesh("ledger", "--data-dir", tmp_path / "none", "summary", check=2)
    assert proc.stderr.startswith("bidmesh: error: no ledger") and proc.stderr.count("\n") == 1
    proc = bidmesh("ledger", "--data-dir", data_dir, "--network", "other", "digest", check=2)
    assert "holds network" in proc.stderr and proc.stderr.count("\n") == 1
    proc = bidmesh("ledger", "--data-dir", data_dir, "import", tmp_path / "missing.bin",
                   check=2)
    assert "no such file" in proc.stderr
    proc = bidmesh("ledger", "--data-dir", data_dir, "events", "--author", "abcd", check=2)
    assert "matches 0 authors" in proc.stderr


def test_read_only_commands_do_not_write(data_dir: Path) -> None:
    db = paths.ledger_path(data_dir)
    before = db.stat().st_mtime_ns
    for cmd in ("summary", "digest", "verify", "events"):
        bidmesh("ledger", "--data-dir", data_dir, cmd)
    assert db.stat().st_mtime_ns == before


def test_read_only_commands_work_next_to_a_writer(tmp_path: Path) -> None:
    c = Chain(seed(6))
    with Ledger(paths.ledger_path(tmp_path), network=NETWORK) as led:
        led.append_many([c.next().wire for _ in range(5)])
        # The writer holds its connection open (as the daemon does) while we read.
        s = js("ledger", "--data-dir", tmp_path, "summary")
        assert isinstance(s, dict) and s["events"] == 5 and s["digest"] == led.digest().hex()
        led.append(c.next().wire)
        s = js("ledger", "--data-dir", tmp_path, "summary")
        assert isinstance(s, dict) and s["events"] == 6


def test_failed_import_into_new_dir_leaves_no_ledger(tmp_path: Path) -> None:
    """All records of another network fail; the retry with --network must work."""
    src = tmp_path / "src"
    with Ledger(src / "ledger.db", network="othernet") as led:
        led.publish(Identity.from_seed(bytes(32)), sample_bodies()["offer"], 1000)
    exported = tmp_path / "x.bin"
    with Ledger(src / "ledger.db", network="othernet", readonly=True) as led:
        exported.write_bytes(b"".join(led.iter_wires()))
    dst = tmp_path / "dst"
    r = bidmesh("ledger", "--data-dir", dst, "import", exported, check=None)
    assert r.returncode != 0 and "--network" in r.stderr
    assert not (dst / "ledger.db").exists()
    bidmesh("ledger", "--data-dir", dst, "--network", "othernet", "import", exported)
