"""Daemon conventions, on real `bidmesh` processes: one node per data dir, start-up
failures as one line and exit 2, systemd readiness, a non-zero watchdog exit, `init`,
`--version`, no abbreviated options, one default data dir, quiet client logs."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_helpers import ROOT, cluster, free_port, run_command, wait_for

from node import cli, config, lifecycle, paths
from node.control import control_call
from node.errors import UsageError
from node.logs import setup_logging

ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def bidmesh(*args: str | Path, env: dict[str, str] | None = None, timeout: float = 60,
            ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "node.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=env or ENV)


def one_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("bidmesh: error: "), stderr
    return lines[0]


# ---------------------------------------------------------------- pure / in-process


def test_lock_names_the_holder_and_frees_on_release(tmp_path: Path) -> None:
    with lifecycle.DataDirLock(tmp_path):
        assert lifecycle.lock_holder(tmp_path) == os.getpid()
        with pytest.raises(UsageError, match=f"pid {os.getpid()}"):
            lifecycle.DataDirLock(tmp_path).acquire()
    assert lifecycle.lock_holder(tmp_path) is None
    with lifecycle.DataDirLock(tmp_path):  # free again
        pass


def test_preflight_reports_each_cause(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(UsageError, match=f"port {port} is already in use"):
            lifecycle.preflight(lifecycle.tcp_binds([f"/ip4/127.0.0.1/tcp/{port}"]))
    with pytest.raises(UsageError, match="not an address of this host"):
        lifecycle.preflight(lifecycle.tcp_binds(["/ip4/192.0.2.77/tcp/4001"]))
    # Two of our own listeners on one port collide too.
    p = free_port()
    binds = [lifecycle.Bind("p2p.listen", "127.0.0.1", p, "a"),
             lifecycle.Bind("http.port", "127.0.0.1", p, "b")]
    with pytest.raises(UsageError, match=r"http\.port b"):
        lifecycle.preflight(binds)
    lifecycle.preflight(binds[:1])  # and everything was released


@pytest.mark.parametrize(("addr", "needle"), [
    ("/ip4/1.2.3.4/tcp/4001", "needs a /p2p/<peer id>"),
    ("/ip4/1.2.3.4/tcp/4001/p2p/12D3KooWnope", "not a libp2p peer id"),
    ("/ip4/1.2.3.400/tcp/4001/p2p/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N",
     "not a valid multiaddr"),
    ("/ip4/1.2.3.4/udp/4001/p2p/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N",
     "dialed over TCP"),
    ("1.2.3.4:4001", "not a multiaddr"),
])
def test_bootstrap_validated_at_load(addr: str, needle: str) -> None:
    with pytest.raises(UsageError, match=r"p2p\.bootstrap") as e:
        config.from_dict({"p2p": {"bootstrap": [addr]}})
    assert needle in str(e.value)


def test_valid_bootstrap_and_listen_accepted() -> None:
    ok = "/dns4/node.example.org/tcp/4001/p2p/12D3KooWBJZKgYr3s7AWAPcu8iXT1cfABb1tUGgAZ7SFt8f8bAVM"
    cfg = config.from_dict({"p2p": {"bootstrap": [ok], "listen": ["/ip6/::/tcp/4001"]}})
    assert cfg.p2p.bootstrap == [ok]
    with pytest.raises(UsageError, match="not supported"):
        config.from_dict({"p2p": {"listen": ["/ip4/0.0.0.0/udp/4001/quic-v1"]}})


def _parsers(p: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield p
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def test_no_parser_accepts_abbreviations() -> None:
    found = list(_parsers(cli.build_parser()))
    assert len(found) > 20
    assert [p.prog for p in found if p.allow_abbrev] == []


def test_one_default_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(paths.DATA_DIR_ENV, str(tmp_path / "d"))
    assert paths.default_data_dir() == tmp_path / "d"
    assert config.Config().node.data_dir == tmp_path / "d"
    assert config.from_dict({}).node.data_dir == tmp_path / "d"


def test_log_file_rotates(tmp_path: Path) -> None:
    cfg = config.from_dict({"node": {"data_dir": str(tmp_path), "log_max_bytes": 65536,
                                     "log_backups": 2}})
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup_logging(cfg)
        for i in range(3000):
            logging.getLogger("bidmesh.test").info("line %d %s", i, "x" * 60)
    finally:
        for h in root.handlers:
            h.close()
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
    files = sorted(p.name for p in tmp_path.glob("node.log*"))
    assert files == ["node.log", "node.log.1", "node.log.2"]
    assert all((tmp_path / f).stat().st_size <= 65536 for f in files)


def test_watchdog_exit_is_not_zero() -> None:
    code = ("import threading; from node.daemon import _start_watchdog; "
            "_start_watchdog(0.1); threading.Event().wait(60)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd=ROOT, env=ENV)
    assert proc.returncode == lifecycle.EXIT_WATCHDOG
    assert "stop overran its budget" in proc.stderr


def test_sd_notify_abstract_socket_and_watchdog_interval(
        monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"bidmesh-test-{os.getpid()}-{id(monkeypatch)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)  # what systemd means by NOTIFY_SOCKET=@name
        s.settimeout(10)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert lifecycle.sd_notify("READY=1")
        assert s.recv(100) == b"READY=1"
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)  # nobody listens now: no raise
    assert not lifecycle.sd_notify("READY=1")
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not lifecycle.sd_notify("READY=1")
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert lifecycle.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert lifecycle.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))  # another process's
    assert lifecycle.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "0")
    monkeypatch.delenv("WATCHDOG_PID")
    assert lifecycle.watchdog_interval() is None


# ---------------------------------------------------------------- commands


def test_version_and_abbreviation_refused() -> None:
    proc = bidmesh("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("bidmesh 0.")
    proc = bidmesh("run", "--conf", "x.toml")
    assert proc.returncode == 2 and "unrecognized arguments: --conf" in proc.stderr


def test_init_writes_config_and_key(tmp_path: Path) -> None:
    d = tmp_path / "node"
    proc = bidmesh("init", "--data-dir", d, "--provider", "--network", "dev-9", "--json")
    assert proc.returncode == 0, proc.stderr
    cfg = config.load(d / "node.toml")
    assert cfg.node.data_dir == d and cfg.node.network == "dev-9"
    assert cfg.provider.enabled and cfg.provider.offers
    assert cfg.p2p.listen == ["/ip4/0.0.0.0/tcp/4001"]
    assert (d / "node.key").stat().st_mode & 0o777 == 0o600
    assert "# " in (d / "node.toml").read_text()  # commented
    key = (d / "node.key").read_bytes()
    assert "already exists" in one_line(bidmesh("init", "--data-dir", d).stderr)
    assert bidmesh("init", "--data-dir", d, "--force").returncode == 0
    assert (d / "node.key").read_bytes() == key  # the identity is kept
    assert not config.load(d / "node.toml").provider.enabled


def test_env_data_dir_is_every_commands_default(tmp_path: Path) -> None:
    d = tmp_path / "envdir"
    env = {**ENV, paths.DATA_DIR_ENV: str(d)}
    assert bidmesh("init", env=env).returncode == 0
    assert (d / "node.toml").exists() and (d / "node.key").exists()
    proc = bidmesh("ledger", "digest", env=env)
    assert proc.returncode == 2 and str(d / "ledger.db") in one_line(proc.stderr)
    proc = bidmesh("keygen", env=env)
    assert proc.returncode == 2 and str(d / "node.key") in one_line(proc.stderr)
    proc = bidmesh("client", "whoami", env=env)  # no --node, and no node runs in d
    assert proc.returncode == 2 and f"no node is running in {d}" in one_line(proc.stderr)
    assert not (d / "client").exists()


def test_client_dials_a_local_node_through_loopback() -> None:
    assert cli.local_dial_addrs(["/ip4/0.0.0.0/tcp/4001/p2p/X", "/ip6/::/tcp/4001/p2p/X",
                                 "/ip4/10.0.0.5/tcp/4001/p2p/X"]) == [
        "/ip4/127.0.0.1/tcp/4001/p2p/X", "/ip6/::1/tcp/4001/p2p/X",
        "/ip4/10.0.0.5/tcp/4001/p2p/X"]


def test_client_cli_keeps_library_logs_off_the_terminal(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there: py-libp2p logs each failed dial
    peer = "12D3KooWBJZKgYr3s7AWAPcu8iXT1cfABb1tUGgAZ7SFt8f8bAVM"
    proc = bidmesh("client", "--dir", tmp_path / "c", "--node",
                   f"/ip4/127.0.0.1/tcp/{port}/p2p/{peer}", "--timeout", "2", "leases")
    assert proc.returncode != 0
    assert "no node reachable" in one_line(proc.stderr)


# ---------------------------------------------------------------- daemons


def _start(cfg_path: Path, env: dict[str, str] | None = None, *, data_dir: Path | None = None,
           ) -> subprocess.Popen[str]:
    cmd = run_command(cfg_path) if data_dir is None else [
        sys.executable, "-m", "node.cli", "run", "--data-dir", str(data_dir)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT, env=env or ENV)


@pytest.mark.slow
@pytest.mark.xdist_group("procs")
def test_second_daemon_refused_and_first_keeps_its_socket(tmp_path: Path) -> None:
    with cluster(tmp_path, 1) as c:
        p = c.procs[0]
        c.start(p)
        assert p.popen is not None
        second = _start(p.cfg_path)
        _, err = second.communicate(timeout=60)
        assert second.returncode == 2
        assert f"pid {p.popen.pid}" in one_line(err)
        assert (p.data_dir / "control.sock").exists()
        assert p.call({"op": "status"})["state"] == "running"
        assert lifecycle.lock_holder(p.data_dir) == p.popen.pid


@pytest.mark.slow
@pytest.mark.xdist_group("procs")
@pytest.mark.parametrize("case", ["p2p_port", "http_port", "not_our_address"])
def test_start_failures_are_one_line_and_exit_2(tmp_path: Path, case: str) -> None:
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    taken = blocker.getsockname()[1]
    listen = {"p2p_port": f"/ip4/127.0.0.1/tcp/{taken}",
              "not_our_address": "/ip4/192.0.2.77/tcp/4001"}.get(
                  case, f"/ip4/127.0.0.1/tcp/{free_port()}")
    sections = {"node": {"data_dir": "state", "network": "t"}, "p2p": {"listen": [listen]},
                "http": {"enabled": case == "http_port", "port": taken}}
    cfg_path = tmp_path / "node.toml"
    cfg_path.write_text(config.to_toml(config.from_dict(sections, base=tmp_path)))
    try:
        proc = _start(cfg_path)
        _, err = proc.communicate(timeout=60)
    finally:
        blocker.close()
    assert proc.returncode == 2
    line = one_line(err)
    assert ("already in use" if case != "not_our_address" else "not an address") in line
    # Nothing else started: no ledger, not even a log file.
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["node.lock"]


@pytest.mark.slow
@pytest.mark.xdist_group("procs")
def test_init_run_notifies_systemd_and_stops_cleanly(tmp_path: Path) -> None:
    d = tmp_path / "n"
    port = free_port()
    assert bidmesh("init", "--data-dir", d, "--network", "t",
                   "--listen", f"/ip4/127.0.0.1/tcp/{port}").returncode == 0
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.settimeout(60)
    # WatchdogSec=1 as systemd would set it: a WATCHDOG=1 every 0.5 s from then on.
    env = {**ENV, "NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "1000000"}
    proc = _start(Path(), env, data_dir=d)
    try:
        msg = notify.recv(4096).decode()
        assert msg.startswith("READY=1\n"), msg
        st = control_call(d, {"op": "status"})  # ready means it answers
        assert st["network"] == "t" and any(f"/tcp/{port}/" in a for a in st["listen_addrs"])
        assert notify.recv(4096) == b"WATCHDOG=1"
        # A client with no --dir, --node or --network: the node of the default data dir.
        proc_c = bidmesh("client", "--timeout", "60", "whoami", "--json",  # a loaded host
                         env={**ENV, paths.DATA_DIR_ENV: str(d)}, timeout=180)
        assert proc_c.returncode == 0, proc_c.stderr
        assert (d / "client" / "client.key").exists()
        proc.send_signal(signal.SIGTERM)
        msgs = [notify.recv(4096)]  # pings still in flight, then STOPPING=1
        while msgs[-1] != b"STOPPING=1" and len(msgs) < 100:
            msgs.append(notify.recv(4096))
        assert msgs[-1] == b"STOPPING=1", msgs
        assert set(msgs[:-1]) <= {b"WATCHDOG=1"}, msgs
        proc.communicate(timeout=30)
        assert proc.returncode == 0
    finally:
        notify.close()
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
    wait_for(lambda: lifecycle.lock_holder(d) is None, 30, "lock released")
    proc_c = bidmesh("client", "whoami", env={**ENV, paths.DATA_DIR_ENV: str(d)})
    assert proc_c.returncode == 2 and "node in" in one_line(proc_c.stderr)
    assert "is stopped" in proc_c.stderr
