"""The devnet's network: provider specs, node processes, the narrator, light clients
and the polling helpers every scene uses."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import trio

from .. import config
from ..auction import Market
from ..auction.lease import Lease
from ..client import LightClient, fold, now_ms
from ..control import control_call
from ..errors import BidmeshError, StepFailed
from ..keys import Identity, save_key
from ..output import Output, table
from ..p2p import peer_id_from_pubkey
from ..segments import MpegTs, local_reference
from ..status_file import read_status

NETWORK = "devnet"
T = TypeVar("T")


@dataclass(frozen=True)
class ProviderSpec:
    name: str
    offers: dict[str, dict[str, int]]  # service -> price per hour (cents), capacity KiB/s
    # [provider] recipient policy (docs/provider-guide.md): whom it bids for, at what
    policy: dict[str, Any] = field(default_factory=dict)


PROVIDERS = (
    ProviderSpec("atlas", {"bandwidth": {"price": 3000, "capacity": 20_000},
                           "zstd": {"price": 4800, "capacity": 50_000}},
                 {"risk_premium_pct": 50}),
    ProviderSpec("borealis", {"bandwidth": {"price": 2500, "capacity": 20_000},
                              "zstd": {"price": 5000, "capacity": 50_000}},
                 {"min_recipient_score": 50}),
    ProviderSpec("cirrus", {"zstd": {"price": 6000, "capacity": 40_000},
                            "aes-gcm": {"price": 300, "capacity": 80_000}}),
    ProviderSpec("delta", {"bandwidth": {"price": 3500, "capacity": 10_000},
                           "aes-gcm": {"price": 200, "capacity": 80_000}}),
    ProviderSpec("eiger", {"bandwidth": {"price": 2800, "capacity": 10_000},
                           "sha256": {"price": 100, "capacity": 80_000}}),
)
LEASE_MS = 20_000
CLOSE_MS = 2_500


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ProviderProc:
    spec: ProviderSpec
    dir: Path
    ident: Identity
    port: int
    http_port: int | None = None
    popen: subprocess.Popen[bytes] | None = None

    @property
    def data_dir(self) -> Path:
        return self.dir / "state"

    @property
    def addr(self) -> str:
        return f"/ip4/127.0.0.1/tcp/{self.port}/p2p/{peer_id_from_pubkey(self.ident.public)}"


@dataclass
class Narrator:
    out: Output
    t0: float = field(default_factory=time.monotonic)
    steps: list[tuple[str, bool]] = field(default_factory=list)

    def say(self, text: str) -> None:
        if not self.out.json_mode:
            print(f"[{time.monotonic() - self.t0:6.1f}s] {text}", flush=True)

    def done(self, step: str, detail: str = "") -> None:
        self.steps.append((step, True))
        self.say(f"✓ {step}" + (f": {detail}" if detail else ""))


class Devnet:
    # Where the round's HTTP server (the tunnel's destination) listens: this host's
    # loopback, which the providers reach on a devnet. bench/netns_testnet.py runs
    # the round on another host than the providers and sets the client host's address.
    tunnel_host = "127.0.0.1"

    def __init__(self, base: Path, n_providers: int, narrator: Narrator) -> None:
        self.base = base
        self.n = narrator
        self.providers: list[ProviderProc] = []
        for i, spec in enumerate(PROVIDERS[:n_providers]):
            d = base / spec.name
            d.mkdir(parents=True, exist_ok=True)
            ident = Identity.from_seed(os.urandom(32))
            (d / "state").mkdir(exist_ok=True, mode=0o700)
            save_key(d / "state" / "node.key", ident, overwrite=True)
            self.providers.append(ProviderProc(spec, d, ident, _free_port(),
                                               _free_port() if i == 0 else None))
        self.summary: dict[str, Any] = {}

    # ---------------------------------------------------------------- processes

    def write_configs(self) -> None:
        for p in self.providers:
            cfg = config.from_dict({
                "node": {"network": NETWORK, "data_dir": str(p.data_dir),
                         "status_interval_s": 0.5, "log_level": "info"},
                "p2p": {"listen": [f"/ip4/127.0.0.1/tcp/{p.port}"],
                        "bootstrap": [q.addr for q in self.providers if q is not p],
                        "reconnect_min_s": 0.2, "reconnect_max_s": 2.0},
                "sync": {"interval_s": 1.0},
                "provider": {"enabled": True, "offers": p.spec.offers, "currency": "EUR",
                             "interval_s": 0.25, "note": f"{p.spec.name} (devnet)",
                             **p.spec.policy},
                # Every node is on loopback: subcontractors' addresses are too.
                "dataplane": {"workers": 1, "contractor_addrs_allow": ["127.0.0.0/8"]},
                # Tunnels of bandwidth leases may reach the devnet's own HTTP server.
                "bandwidth": {"allow": ["127.0.0.1/32"]},
                "http": {"enabled": p.http_port is not None, "port": p.http_port or 0,
                         "growth_interval_s": 1.0},
            })
            (p.dir / "node.toml").write_text(config.to_toml(cfg))

    def start(self) -> None:
        for p in self.providers:
            with open(p.dir / "stderr.log", "ab") as log:
                p.popen = subprocess.Popen(
                    [sys.executable, "-m", "node.cli", "run", "--config", str(p.dir / "node.toml")],
                    stdout=subprocess.DEVNULL, stderr=log, cwd=p.dir,
                    start_new_session=True)  # our Ctrl-C is handled here, not by each child

    def stop(self) -> None:
        for p in self.providers:
            if p.popen is not None and p.popen.poll() is None:
                p.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 8
        for p in self.providers:
            if p.popen is None:
                continue
            try:
                p.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.popen.kill()
                p.popen.wait()

    def check_alive(self) -> None:
        for p in self.providers:
            if p.popen is not None and p.popen.poll() is not None:
                tail = (p.dir / "stderr.log").read_text(errors="replace")[-600:]
                raise StepFailed(f"node {p.spec.name} exited with {p.popen.returncode}: {tail}")

    async def wait_ready(self, timeout: float = 120.0) -> None:
        want = len(self.providers) - 1
        with trio.fail_after(timeout):
            while True:
                self.check_alive()
                ok = 0
                for p in self.providers:
                    with contextlib.suppress(BidmeshError, OSError, ValueError):
                        st = read_status(p.data_dir)
                        if st.get("state") == "running" and len(st.get("peers", [])) >= want:
                            ok += 1
                if ok == len(self.providers):
                    return
                await trio.sleep(0.2)

    def digests(self) -> dict[str, str]:
        return {p.spec.name: str(control_call(p.data_dir, {"op": "status"}, 10)["digest"])
                for p in self.providers}

    async def wait_converged(self, timeout: float = 120.0) -> dict[str, str]:
        with trio.fail_after(timeout):
            while True:
                self.check_alive()
                d = await trio.to_thread.run_sync(self.digests)
                if len(set(d.values())) == 1:
                    return d
                await trio.sleep(0.3)

    def name_of(self, key: bytes) -> str:
        for p in self.providers:
            if p.ident.public == key:
                return p.spec.name
        return key.hex()[:8]


# -------------------------------------------------------------------- helpers


async def poll(what: str, fn: Callable[[], Awaitable[T | None]], timeout: float,
               every: float = 0.25) -> T:
    """Call `fn` until it returns something; StepFailed after `timeout` seconds."""
    deadline = trio.current_time() + timeout
    while True:
        got = await fn()
        if got is not None:
            return got
        if trio.current_time() > deadline:
            raise StepFailed(f"timed out after {timeout:.0f} s waiting for {what}")
        await trio.sleep(every)


async def bids_final(net: Devnet, deadline_ms: int) -> None:
    """Wait out an auction's bid deadline, then until every node holds the same events:
    a bid signed just before the deadline can still be on its way to the recipient's
    nodes (seconds on a loaded host), and an award that leaves out a valid on-time bid
    does not verify (omitted_bids_change_result)."""
    await wait_until_ms(deadline_ms)
    await net.wait_converged()


async def wait_until_ms(ms: int) -> None:
    delay = (ms - now_ms()) / 1000 + 0.05
    if delay > 0:
        await trio.sleep(delay)


def make_ts(n_packets: int, seed: int) -> bytes:
    """A synthetic MPEG-TS stream: video and audio PIDs with compressible payloads and
    continuity counters, plus a little garbage between packets to show resync."""
    out = bytearray()
    for i in range(n_packets):
        pid = 0x100 if i % 4 else 0x101
        cc = i & 0x0F
        header = bytes([0x47, 0x40 | (pid >> 8), pid & 0xFF, 0x10 | cc])
        frame = (i // 25 + seed) & 0xFF
        payload = bytes((frame + (j // 16)) & 0xFF for j in range(184))
        out += header + payload
        if i % 997 == 500:
            out += b"\x00\xffgarbage"  # a damaged link: the parser resynchronises
    return bytes(out)


def expected_output(ts: bytes, lease: Lease, stream_id: bytes, key: bytes,
                    chains: list[list[str]]) -> bytes:
    parser = MpegTs()
    packets = parser.feed(ts) + parser.end()
    return local_reference(packets, chains, max_packets=256, max_bytes=1 << 20,
                           lease_id=lease.id, stream_id=stream_id, key=key)


@contextlib.asynccontextmanager
async def client(base: Path, name: str, nodes: list[str]) -> AsyncIterator[LightClient]:
    async with LightClient.open(base / "clients" / name, nodes, network=NETWORK) as c:
        yield c


async def market_of(c: LightClient, keys: list[bytes], auctions: list[bytes]) -> Market:
    """A market re-derived (and verified) by the light client from what these views need."""
    events = await c.reputation_events(keys)
    for rid in auctions:
        events += await c.auction_events(rid)
    events += await c.lease_events()
    for kind in ("usage", "subcontract"):
        events += await c.find_events(kind=kind)
    return fold(events)[0]


def _table(out: Output, headers: list[str], rows: list[list[Any]]) -> None:
    keyed = [dict(zip(headers, r, strict=True)) for r in rows]
    out.stream.write(table(keyed, [(h, h) for h in headers]) + "\n")


def rep_row(market: Market, net: Devnet, key: bytes, role: str) -> dict[str, Any]:
    s = market.reputation.score(key, role)
    return {"who": net.name_of(key), "role": role, "score": round(s.score, 3),
            "score_ppm": s.ppm, "ratings": s.ratings, "satisfied": s.satisfied,
            "unsatisfied": s.unsatisfied}
