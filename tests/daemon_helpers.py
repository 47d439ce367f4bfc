"""Run real node daemon processes on loopback (tests and bench/convergence.py)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conftest import wait_for as wait_for  # re-exported: the process tests import it here

from node import config
from node.control import control_call
from node.errors import OperationError, RemoteError
from node.keys import Identity, save_key
from node.p2p import peer_id_from_pubkey

ROOT = Path(__file__).resolve().parent.parent
NETWORK = "proctest"


_PORT_LOCKS = Path(tempfile.gettempdir()) / "bidmesh-test-ports"
_held_ports: dict[int, int] = {}  # port -> fd of its lock file, held while this process lives
_rng = random.Random(os.urandom(16))


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A TCP port on 127.0.0.1 for a node process to bind later, reserved for this process.

    Not bind(("127.0.0.1", 0)): that gives an ephemeral port, which the kernel may hand
    to any outgoing connection or other bind(0) between our pick and the node's bind
    (a loaded CI run saw "Address already in use"). Ports below the ephemeral range are
    never handed out by the kernel, and a lock file per port keeps parallel test
    processes (xdist workers, other runs) from picking the same one."""
    hi = _ephemeral_low()
    lo = max(10_000, hi - 12_000)
    _PORT_LOCKS.mkdir(exist_ok=True)
    for _ in range(1000):
        port = _rng.randrange(lo, hi) if hi - lo >= 1000 else 0
        if port in _held_ports:
            continue
        if port == 0:  # no room below the ephemeral range: the racy way
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                return int(s.getsockname()[1])
        fd = os.open(_PORT_LOCKS / str(port), os.O_CREAT | os.O_RDWR, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        try:  # and nothing else listens there (or sits in a state a node cannot bind)
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("127.0.0.1", port))
                s.listen(1)
        except OSError:
            os.close(fd)
            continue
        _held_ports[port] = fd
        return port
    raise AssertionError(f"no free port in [{lo}, {hi}) after 1000 tries")


def run_command(cfg_path: Path) -> list[str]:
    """`bidmesh run --config FILE`, via the venv's entry point when installed."""
    exe = Path(sys.executable).parent / "bidmesh"
    if exe.exists() and _cli_has_run(exe):
        return [str(exe), "run", "--config", str(cfg_path)]
    return [sys.executable, "-m", "node.cli", "run", "--config", str(cfg_path)]


_CLI_OK: dict[str, bool] = {}


def _cli_has_run(exe: Path) -> bool:
    if str(exe) not in _CLI_OK:
        try:
            r = subprocess.run([str(exe), "run", "--help"], capture_output=True, timeout=30)
            _CLI_OK[str(exe)] = r.returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            _CLI_OK[str(exe)] = False
    return _CLI_OK[str(exe)]


@dataclass
class Proc:
    index: int
    dir: Path
    port: int
    ident: Identity
    cfg_path: Path
    popen: subprocess.Popen[bytes] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def data_dir(self) -> Path:
        return self.dir / "state"

    @property
    def peer_id(self) -> str:
        return str(peer_id_from_pubkey(self.ident.public))

    @property
    def addr(self) -> str:
        return f"/ip4/127.0.0.1/tcp/{self.port}/p2p/{self.peer_id}"

    def call(self, req: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
        return control_call(self.data_dir, req, timeout)

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None


class Cluster:
    """N node processes with fixed keys and ports; node i bootstraps to all others."""

    def __init__(self, base: Path, n: int, *, overrides: dict[str, dict[str, Any]] | None = None,
                 bootstrap: Callable[[int, list[Proc]], list[Proc]] | None = None) -> None:
        self.base = base
        self.procs: list[Proc] = []
        # CPUs the node processes run on (None: wherever the scheduler puts them);
        # bench/hostile.py keeps its attackers off the nodes' CPU with it.
        self.cpus: set[int] | None = None
        self.cpus_of: dict[int, set[int]] = {}  # per node index, before `cpus`
        for i in range(n):
            d = base / f"n{i}"
            d.mkdir(parents=True, exist_ok=True)
            ident = Identity.from_seed(bytes([200, i]) * 16)
            self.procs.append(Proc(i, d, free_port(), ident, d / "node.toml"))
        for p in self.procs:
            peers = bootstrap(p.index, self.procs) if bootstrap else [
                q for q in self.procs if q is not p]
            sections: dict[str, dict[str, Any]] = {
                "node": {"network": NETWORK, "data_dir": "state", "status_interval_s": 0.5,
                         "log_level": "info"},
                "p2p": {"listen": [f"/ip4/127.0.0.1/tcp/{p.port}"],
                        "bootstrap": [q.addr for q in peers],
                        "reconnect_min_s": 0.2, "reconnect_max_s": 1.0},
                "sync": {"interval_s": 1.0, "request_timeout_s": 5.0},
                # Loopback nodes hire each other: allowed explicitly (default: refused).
                "dataplane": {"contractor_addrs_allow": ["127.0.0.0/8"]},
            }
            for k, v in (overrides or {}).items():
                sections.setdefault(k, {}).update(v)
            cfg = config.from_dict(sections, base=p.dir)
            p.cfg_path.write_text(config.to_toml(cfg))
            p.data_dir.mkdir(exist_ok=True, mode=0o700)
            if not (p.data_dir / "node.key").exists():
                save_key(p.data_dir / "node.key", p.ident)

    def start(self, p: Proc, wait: bool = True) -> None:
        log = open(p.dir / "stderr.log", "ab")  # noqa: SIM115 - lives as long as the process
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        cpus = self.cpus_of.get(p.index, self.cpus)
        # Set in the child before exec, so every thread the node starts inherits it.
        pin = None if cpus is None else (lambda: os.sched_setaffinity(0, cpus))
        p.popen = subprocess.Popen(run_command(p.cfg_path), stdout=subprocess.DEVNULL,
                                   stderr=log, cwd=p.dir, env=env, preexec_fn=pin)
        log.close()
        if wait:
            self.wait_ready(p)

    def start_all(self, procs: list[Proc] | None = None) -> None:
        procs = self.procs if procs is None else procs
        for p in procs:
            self.start(p, wait=False)
        for p in procs:
            self.wait_ready(p)

    def wait_ready(self, p: Proc, timeout: float = 120.0) -> None:
        def ready() -> bool:
            if not p.alive():
                raise AssertionError(f"node {p.index} exited: {self.stderr(p)[-2000:]}")
            try:
                p.call({"op": "status"}, timeout=2)
            except (OperationError, RemoteError):
                return False
            return True
        wait_for(ready, timeout, f"node {p.index} ready")

    def stderr(self, p: Proc) -> str:
        path = p.dir / "stderr.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def status(self, p: Proc) -> dict[str, Any]:
        return p.call({"op": "status"}, timeout=10)

    def digests(self, procs: list[Proc] | None = None) -> list[str]:
        return [self.status(p)["digest"] for p in (procs or self.procs)]

    def wait_converged(self, procs: list[Proc] | None = None, timeout: float = 120.0) -> str:
        procs = procs or self.procs
        wait_for(lambda: len(set(self.digests(procs))) == 1, timeout,
                 f"digests of nodes {[p.index for p in procs]} equal")
        return self.digests(procs)[0]

    def publish(self, p: Proc, n: int, tag: str = "") -> list[bytes]:
        events = [["offer", {"services": [], "currency": "EUR", "addrs": [],
                             "note": f"{tag}{p.index}-{i}"}] for i in range(n)]
        ids: list[bytes] = p.call({"op": "publish", "events": events})["ids"]
        return ids

    def terminate(self, p: Proc, sig: int = signal.SIGTERM, timeout: float = 10.0) -> float:
        """Send `sig` and wait for the exit; return the seconds it took."""
        assert p.popen is not None
        t0 = time.monotonic()
        p.popen.send_signal(sig)
        try:
            p.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            p.popen.kill()
            p.popen.wait(10)
            raise AssertionError(f"node {p.index} did not stop within {timeout} s") from None
        return time.monotonic() - t0

    def stop_all(self) -> None:
        for p in self.procs:
            if p.alive():
                assert p.popen is not None
                p.popen.send_signal(signal.SIGTERM)
        for p in self.procs:
            if p.popen is not None:
                try:
                    p.popen.wait(10)
                except subprocess.TimeoutExpired:
                    p.popen.kill()
                    p.popen.wait(10)




@contextlib.contextmanager
def cluster(base: Path, n: int, **kw: Any) -> Iterator[Cluster]:
    c = Cluster(base, n, **kw)
    try:
        yield c
    finally:
        c.stop_all()


def cleanup(base: Path) -> None:
    shutil.rmtree(base, ignore_errors=True)
