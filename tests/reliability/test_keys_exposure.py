"""Keys and exposure: key files are 0600 and refused otherwise; `bidmesh keygen`
writes 0600 and never clobbers; no secret (the seed, in hex) appears in CLI output
(`--json` or not), error messages, logs or the HTTP API; the HTTP API is read-only
and bound to localhost by default."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from testkit import seed

from node.errors import KeyFileError, RemoteError
from node.keys import KEY_MAGIC, Identity, load_key, load_or_create_key, save_key

from .mutations import FUZZ

ROOT = Path(__file__).resolve().parents[2]
SEED = seed(700)
IDENT = Identity.from_seed(SEED)
SECRETS = (SEED.hex(), SEED.hex().upper())


def assert_no_secret(text: str, where: str) -> None:
    for s in SECRETS:
        assert s not in text, f"the key seed appears in {where}"


def _key_file(path: Path, content: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(content)
    path.chmod(mode)
    return path


GOOD = KEY_MAGIC + SEED.hex().encode() + b"\n"


# ------------------------------------------------------------------ key files


@pytest.mark.parametrize("bit", [0o040, 0o020, 0o010, 0o004, 0o002, 0o001])
def test_any_group_or_other_permission_is_refused(tmp_path: Path, bit: int) -> None:
    path = _key_file(tmp_path / "k", GOOD, 0o600 | bit)
    with pytest.raises(KeyFileError, match="chmod 600") as ei:
        load_key(path)
    assert_no_secret(str(ei.value), "the error")


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o700])
def test_owner_only_modes_load(tmp_path: Path, mode: int) -> None:
    assert load_key(_key_file(tmp_path / "k", GOOD, mode)) == IDENT


@pytest.mark.parametrize("content", [
    b"", b"\n", KEY_MAGIC, KEY_MAGIC + b"\n", SEED.hex().encode(),  # no magic line
    KEY_MAGIC + SEED.hex()[:-2].encode(), KEY_MAGIC + (SEED + b"\x00").hex().encode(),
    KEY_MAGIC + SEED.hex()[:-1].encode(), KEY_MAGIC + SEED.hex().encode() + b"zz",
    KEY_MAGIC + b"\xff" * 64, KEY_MAGIC + SEED.hex().encode() + b"\n" + b"0" * 10_000,
])
def test_wrong_format_or_length_is_refused_without_echoing(tmp_path: Path,
                                                           content: bytes) -> None:
    with pytest.raises(KeyFileError) as ei:
        load_key(_key_file(tmp_path / "k", content))
    assert_no_secret(str(ei.value), "the error")
    assert SEED.hex()[:-2] not in str(ei.value)


@FUZZ
@given(st.one_of(st.binary(max_size=120),
                 st.binary(max_size=80).map(lambda b: KEY_MAGIC + b),
                 st.text("0123456789abcdefABCDEF \n\t", max_size=80).map(
                     lambda t: KEY_MAGIC + t.encode())))
def test_arbitrary_key_file_content(content: bytes) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = _key_file(Path(d) / "k", content)
        try:
            ident = load_key(path)
        except KeyFileError:
            return
    rest = content[len(KEY_MAGIC):].decode()
    assert content.startswith(KEY_MAGIC) and bytes.fromhex(rest.strip()) == ident.seed


def test_not_a_regular_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir(mode=0o700)
    with pytest.raises(KeyFileError):
        load_key(tmp_path / "dir")
    with pytest.raises(KeyFileError, match="keygen"):
        load_key(tmp_path / "missing")


def test_fifo_is_refused_not_waited_on(tmp_path: Path) -> None:
    """Regression: load_key used to block forever reading a FIFO (no writer)."""
    fifo = tmp_path / "node.key"
    os.mkfifo(fifo, 0o600)
    code = ("import sys; from node.keys import load_key; from node.errors import KeyFileError\n"
            "try:\n    load_key(sys.argv[1])\nexcept KeyFileError as e:\n    print(e)\n")
    try:
        r = subprocess.run([sys.executable, "-c", code, str(fifo)], capture_output=True,
                           text=True, timeout=30, cwd=ROOT)
    except subprocess.TimeoutExpired:
        pytest.fail("load_key blocked on a FIFO")
    assert r.returncode == 0 and "not a regular file" in r.stdout, r.stderr


def test_symlink_to_a_readable_file_is_refused(tmp_path: Path) -> None:
    target = _key_file(tmp_path / "target", GOOD, 0o644)
    link = tmp_path / "node.key"
    link.symlink_to(target)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_key(link)


def test_oversized_key_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="too large"):
        load_key(_key_file(tmp_path / "k", GOOD + b" " * (1 << 20)))


@pytest.fixture
def umask_zero() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def test_save_key_is_0600_whatever_the_umask(tmp_path: Path, umask_zero: None) -> None:
    # A leftover temp file with wide permissions must not widen the new key.
    _key_file(tmp_path / "node.key.tmp", b"old", 0o666)
    save_key(tmp_path / "node.key", IDENT)
    assert stat.S_IMODE((tmp_path / "node.key").stat().st_mode) == 0o600
    assert not (tmp_path / "node.key.tmp").exists()
    created = load_or_create_key(tmp_path / "new" / "node.key")
    assert stat.S_IMODE((tmp_path / "new" / "node.key").stat().st_mode) == 0o600
    assert_no_secret(repr(created) + str(created), "the identity's repr")


def test_save_key_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    save_key(path, IDENT)
    before = path.read_bytes()
    with pytest.raises(KeyFileError, match="refusing"):
        save_key(path, Identity.from_seed(seed(701)))
    assert path.read_bytes() == before


# ------------------------------------------------------------------ CLI output


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    from node import cli

    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out + out.err


def test_keygen_writes_0600_and_refuses_to_overwrite(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], umask_zero: None) -> None:
    path = tmp_path / "sub" / "node.key"
    code, out = _cli(capsys, "keygen", "--out", str(path), "--json")
    assert code == 0, out
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    made = load_key(path)
    assert json.loads(out)["public_key"] == made.public.hex()
    assert made.seed.hex() not in out.lower()
    before = path.read_bytes()
    for flags in ((), ("--json",)):
        code, out = _cli(capsys, "keygen", "--out", str(path), *flags)
        assert code == 2 and "already exists" in out
        assert path.read_bytes() == before
        assert made.seed.hex() not in out.lower()
    code, out = _cli(capsys, "keygen", "--out", str(path), "--force")  # human output
    assert code == 0 and load_key(path) != made
    assert load_key(path).seed.hex() not in out.lower()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def _data_dir(tmp_path: Path) -> tuple[Path, list[Any]]:
    """A node data dir whose key is IDENT and whose ledger holds IDENT's events."""
    from market_helpers import award, payment, rating, request

    from node.events import Bid
    from node.ledger import Ledger

    data = tmp_path / "state"
    data.mkdir(mode=0o700)
    save_key(data / "node.key", IDENT)
    events = []
    other = Identity.from_seed(seed(702))
    with Ledger(data / "ledger.db", network="test") as led:
        req = led.publish(IDENT, request(), 10)
        bid = led.publish(other, Bid(request=req.id, price=500), 20)
        aw = led.publish(IDENT, award(req.id, bid.id, 500, [bid.id]), 200)
        events = [req, bid, aw, led.publish(IDENT, payment(aw.id, 500), 201),
                  led.publish(IDENT, rating(aw.id, other.public, "provider"), 400)]
    return data, events


def test_no_secret_in_any_ledger_command_output(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from node import cli

    data, events = _data_dir(tmp_path)
    cli.build_parser()  # registers the ledger plugins
    req_id, aw_id = events[0].id.hex(), events[2].id.hex()
    export = tmp_path / "export.bin"
    args: dict[str, list[str]] = {
        "show": [aw_id], "auction": [req_id], "export": [str(export)],
        "import": [str(export)], "reputation": [IDENT.public.hex()],
        "watch": ["--from-start", "--count", "3", "--interval", "0.01"],
    }
    (data / "status.json").write_text(json.dumps({"state": "stopped", "peers": [],
                                                  "peer_id": "x", "sync": {}}))
    ran = []
    for name in sorted(cli._LEDGER_COMMANDS):
        for flags in ((), ("--json",)):
            code, out = _cli(capsys, "ledger", "--data-dir", str(data), name,
                             *args.get(name, []), *flags)
            assert_no_secret(out, f"`bidmesh ledger {name} {' '.join(flags)}`")
            ran.append((name, code))
    assert {n for n, _ in ran} >= {"summary", "events", "show", "verify", "digest", "export",
                                   "import", "forks", "auctions", "auction", "leases",
                                   "reputation", "ignored", "watch"}
    failed = [(n, c) for n, c in ran if c != 0]
    assert not failed, f"commands failed (add their arguments to `args` above): {failed}"
    assert_no_secret(export.read_bytes().hex(), "the export file")


# ------------------------------------------------------------------ daemon logs


@pytest.mark.slow
@pytest.mark.xdist_group("procs")
def test_daemon_logs_status_and_control_hold_no_secret(tmp_path: Path) -> None:
    from daemon_helpers import cluster, wait_for

    with cluster(tmp_path, 1, overrides={"node": {"log_level": "debug"}}) as c:
        p = c.procs[0]
        secrets = (p.ident.seed.hex(), p.ident.seed.hex().upper())
        c.start(p)
        assert stat.S_IMODE(p.data_dir.stat().st_mode) == 0o700
        assert stat.S_IMODE((p.data_dir / "node.key").stat().st_mode) == 0o600
        assert stat.S_IMODE((p.data_dir / "control.sock").stat().st_mode) == 0o600
        c.publish(p, 3)
        answers: list[Any] = [p.call({"op": "status"})]
        with pytest.raises(RemoteError) as ei:
            p.call({"op": "nonsense"})
        answers.append(str(ei.value))
        wait_for(lambda: (p.data_dir / "status.json").exists(), 10, "status.json")
        c.terminate(p)
        texts = {"stderr": c.stderr(p), "answers": json.dumps(answers, default=str),
                 "status.json": (p.data_dir / "status.json").read_text()}
        for f in p.data_dir.glob("*.log"):
            texts[f.name] = f.read_text(errors="replace")
        assert any("node started" in t for t in texts.values()), texts["stderr"][-2000:]
        for where, text in texts.items():
            for s in secrets:
                assert s not in text, f"the node seed appears in {where}"


@pytest.mark.slow
@pytest.mark.xdist_group("procs")
def test_daemon_refuses_a_readable_key(tmp_path: Path) -> None:
    from daemon_helpers import cluster

    with cluster(tmp_path, 1) as c:
        p = c.procs[0]
        (p.data_dir / "node.key").chmod(0o644)
        c.start(p, wait=False)
        assert p.popen is not None
        assert p.popen.wait(60) != 0
        err = c.stderr(p)
        assert "chmod 600" in err
        assert p.ident.seed.hex() not in err
        assert not (p.data_dir / "control.sock").exists()


# ------------------------------------------------------------------ HTTP API


def test_http_defaults_are_off_and_localhost() -> None:
    from node.http import HttpSettings

    s = HttpSettings()
    assert s.enabled is False and s.listen == "127.0.0.1"
    assert HttpSettings.from_config(None) == s


def test_http_api_is_read_only_and_leaks_nothing(tmp_path: Path) -> None:
    from node.http import HttpApi
    from node.ledger import Ledger
    from node.query import LiveMarket

    data, events = _data_dir(tmp_path)
    led = Ledger(data / "ledger.db", network="test")
    status = {"state": "running", "peer_id": "12D3Koo-test", "public_key": IDENT.public.hex(),
              "peers": [], "blocked": {}, "sync": {}, "services": {}}
    api = HttpApi(led, LiveMarket(led), lambda: status)
    digest, count = led.digest(), led.count()
    ids = [e.id.hex() for e in events]
    paths = ["/", "/index.html", "/app.js", "/style.css", "/metrics", "/api/health",
             "/api/digest", "/api/events", "/api/auctions", f"/api/auctions/{ids[0]}",
             "/api/leases", "/api/reputation", f"/api/reputation?key={IDENT.public.hex()}",
             "/api/peers", "/api/growth", f"/api/events?author={IDENT.public.hex()}&limit=5",
             "/api/nothing", "/../etc/passwd", "/api/auctions/zz", "/api/events?limit=x"]
    for method in ("POST", "PUT", "DELETE", "PATCH", "CONNECT", "get"):
        for path in [*paths[:4], "/api/events"]:
            assert api.handle(method, path).status == 405
    try:
        @FUZZ
        @given(st.one_of(st.sampled_from(paths),
                         st.tuples(st.sampled_from(paths), st.text(max_size=30)).map(
                             lambda t: t[0] + ("&" if "?" in t[0] else "?") + t[1]),
                         st.text(max_size=60).map(lambda t: "/api/" + t)))
        def inner(target: str) -> None:
            resp = api.handle("GET", target)
            assert resp.status in (200, 400, 404), (target, resp.status)
            assert_no_secret(resp.body.decode("utf-8", "replace"), f"GET {target}")

        inner()
    finally:
        led.close()
    with Ledger(data / "ledger.db", network="test", readonly=True) as again:
        assert (again.digest(), again.count()) == (digest, count)
