"""`bidmesh devnet`: a local network of real node processes playing one full round.

Four provider daemons (`bidmesh run`, each with its own key, SQLite ledger and
dataplane) connect on loopback. Recipients act through light clients exactly as a
user would: a warm-up round gives providers different reputations, and a recipient
who does not pay a record that two providers' policies then skip or charge more for;
a recipient auctions a processing lease (zstd then aes-gcm) shared by three devices with
a maximum and minimum rate, cleared by best value; a sealed Vickrey auction runs
beside it; the award is verified; the devices stream a generated MPEG-TS file
through the winner, which subcontracts the aes-gcm step it lacks; the output is
checked byte for byte; payments and ratings flow both ways; a group buys a lease
with one member sponsoring another. Every node must end with the same state digest.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import trio

from . import config
from .agent import HOUR_MS, RecipientPolicy, Verdict, recipient_verdict
from .auction import Market, verify_award
from .auction.lease import Lease
from .auction.views import record_text, rep_label, rep_text
from .client import LightClient, fold, now_ms
from .control import control_call
from .errors import BidmeshError, StepFailed, UsageError
from .events import Usage
from .keys import Identity, save_key
from .output import Output, table
from .p2p import peer_id_from_pubkey
from .segments import MpegTs, local_reference
from .status_file import read_status

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


# -------------------------------------------------------------------- the round


def _nodes(addrs: list[str], start: int, count: int) -> list[str]:
    """`count` node addresses from `start` on, wrapping: the slices a 4- or 5-node devnet
    uses, and still one node per client on the 3 hosts of netns_testnet.py --quick."""
    return list(dict.fromkeys(addrs[(start + j) % len(addrs)] for j in range(count)))


async def play(net: Devnet, out: Output) -> dict[str, Any]:
    n = net.n
    addrs = [p.addr for p in net.providers]
    base = net.base
    summary: dict[str, Any] = {"state_dir": str(base)}

    # 1. Warm-up: earlier leases give the providers different reputations, and
    # mallory a record of not paying.
    async with contextlib.AsyncExitStack() as stack0:
        walter = await stack0.enter_async_context(client(base, "walter", _nodes(addrs, 0, 2)))
        n.say("warm-up: walter buys zstd and bandwidth leases to build reputations")
        r_z = await walter.request("zstd", duration_ms=LEASE_MS, reserve=100,
                                   close_in_ms=CLOSE_MS, rule="lowest")
        r_b = await walter.request("bandwidth", duration_ms=LEASE_MS, reserve=100,
                                   close_in_ms=CLOSE_MS, rule="lowest")
        mallory = await stack0.enter_async_context(client(base, "mallory", _nodes(addrs, 1, 2)))
        r_m = await mallory.request("bandwidth", duration_ms=MALLORY_LEASE_MS, reserve=100,
                                    close_in_ms=CLOSE_MS, rule="lowest")
        n.say("warm-up: mallory takes a 1 s bandwidth lease and will not pay for it")
        await bids_final(net, max(r_z.body.reveal_ms, r_b.body.reveal_ms))  # type: ignore[attr-defined]
        leases = []
        for r in (r_z, r_b):
            aw, body = await walter.award(r.id)
            if body.winner is None:
                raise StepFailed(f"warm-up auction {r.id.hex()[:8]} got no bids")
            leases.append(aw.id)
        _, l_z = await walter.lease(leases[0])
        _, l_b = await walter.lease(leases[1])
        for lease_id in leases:
            await walter.pay(lease_id, method="card", reference=f"ch_{lease_id.hex()[:8]}")
        await walter.rate(l_z.id, satisfied=False, score=2, text="segments arrived late")
        await walter.rate(l_b.id, satisfied=True, score=5, text="solid link")
        n.done("warm-up leases", f"{net.name_of(l_z.provider)} rated 2★ unsatisfied, "
                                 f"{net.name_of(l_b.provider)} rated 5★")
        await unpaid_warm_up(net, mallory, r_m.id)

    # 2. Main auctions: alice's shared processing lease (best value) and dave's sealed one.
    devices = [f"{who}-{dev}" for who, dev in (("alice", "phone"), ("alice", "laptop"),
                                               ("alice", "tv"))]
    async with contextlib.AsyncExitStack() as stack:
        alice = await stack.enter_async_context(client(base, "alice", _nodes(addrs, 0, 2)))
        dave = await stack.enter_async_context(client(base, "dave", _nodes(addrs, 2, 2)))
        devs = [await stack.enter_async_context(client(base, d, [addrs[(i + 1) % len(addrs)]]))
                for i, d in enumerate(devices)]
        provider_keys = [p.ident.public for p in net.providers]
        market0 = await market_of(alice, provider_keys, [])
        summary["reputation_before"] = [rep_row(market0, net, p.ident.public, "provider")
                                        for p in net.providers]
        chain = ["zstd", "aes-gcm"]
        req_a = await alice.request(
            "zstd", chain=chain, duration_ms=LEASE_MS, reserve=40, close_in_ms=CLOSE_MS,
            rule="best_value", devices=[d.key for d in devs], max_devices=3,
            max_rate_bps=16_000_000, min_rate_bps=256_000,
            note="shared by alice's phone, laptop and tv")
        dave_phone = await stack.enter_async_context(
            client(base, "dave-phone", _nodes(addrs, 3, 1)))
        req_b = await dave.request("bandwidth", duration_ms=LEASE_MS, reserve=40,
                                   close_in_ms=CLOSE_MS, sealed=True, reveal_window_ms=2000,
                                   rule="vickrey", max_rate_bps=8_000_000,
                                   devices=[dave_phone.key])
        n.say(f"alice auctions zstd→aes-gcm for 3 devices (best value, 16/0.256 Mbit/s): "
              f"{req_a.id.hex()[:12]}")
        n.say(f"dave auctions bandwidth, sealed Vickrey: {req_b.id.hex()[:12]}")
        mallory = await stack.enter_async_context(client(base, "mallory", _nodes(addrs, 1, 2)))
        req_m = await mallory.request("bandwidth", duration_ms=LEASE_MS, reserve=40,
                                      close_in_ms=CLOSE_MS, rule="lowest")
        n.say(f"mallory, who did not pay, auctions bandwidth again: {req_m.id.hex()[:12]}")

        async def bids_in(c: LightClient, rid: bytes, want: int) -> list[Any] | None:
            bids = await c.bids(rid)
            return bids if len(bids) >= want else None

        bids_a = await poll("bids on alice's auction",
                            lambda: bids_in(alice, req_a.id, 3), timeout=15)
        for b in bids_a:
            r = b.reputation
            n.say(f"   bid {b.price:>3} EUR-cents from {net.name_of(b.provider):9} "
                  f"reputation {rep_label(r)}")
        n.done("bids with reputation", f"{len(bids_a)} open bids on alice's auction")

        await bids_final(net, req_a.body.reveal_ms)  # type: ignore[attr-defined]
        aw_a, award_a = await alice.award(req_a.id)
        market_a, lease_a = await alice.lease(aw_a.id)
        check = verify_award(market_a, aw_a.id)
        if not check.valid:
            raise StepFailed(f"alice's award does not verify: {check.problems}")
        n.done("award verified", f"{net.name_of(lease_a.provider)} wins at {award_a.price} "
                                 f"(best value over {check.considered_count} bids)")

        await bids_final(net, req_b.body.reveal_ms)  # type: ignore[attr-defined]
        await poll("sealed reveals", lambda: bids_in_revealed(dave, req_b.id, 2), timeout=10)
        aw_b, award_b = await dave.award(req_b.id)
        market_b, lease_b = await dave.lease(aw_b.id)
        if not verify_award(market_b, aw_b.id).valid:
            raise StepFailed("dave's sealed award does not verify")
        n.done("sealed Vickrey auction", f"{net.name_of(lease_b.provider)} wins, pays the "
                                         f"second price {award_b.price}")
        summary["recipient_policy"] = await recipient_policy_shown(net, mallory, req_m.id)

        # 2b. dave's phone fetches a file through the bandwidth lease's tunnel.
        summary["tunnel"] = await tunnel_fetch(net, dave_phone, lease_b)

        # 3. Stream: each device sends its own MPEG-TS through the winner.
        winner = next(p for p in net.providers if p.ident.public == lease_a.provider)
        n.say(f"devices stream MPEG-TS through {winner.spec.name} "
              f"(it lacks aes-gcm and must subcontract it)")
        results: dict[str, tuple[int, int, bool]] = {}

        async def stream_one(name: str, dev: LightClient, seed: int) -> None:
            ts = make_ts(6000, seed)
            res = await dev.stream(lease_a.id, [ts], chains=[chain], protocol="ts", timeout=30)
            want = expected_output(ts, lease_a, res.stream_id, res.key, [chain])
            results[name] = (len(ts), len(res.output), res.output == want)

        for dev in devs:  # devices use other nodes than alice: wait for the lease there
            await poll("the lease to reach every device's node",
                       functools.partial(knows, dev.lease, lease_a.id), timeout=10)
        t_stream = time.monotonic()
        async with trio.open_nursery() as nursery:
            for i, (name, dev) in enumerate(zip(devices, devs, strict=True)):
                nursery.start_soon(stream_one, name, dev, i)
        took = time.monotonic() - t_stream
        total = sum(r[0] for r in results.values())
        if not all(r[2] for r in results.values()):
            raise StepFailed(f"stream output differs from local processing: {results}")
        n.done("streams byte-exact", f"3 devices, {total / 1e6:.2f} MB in {took:.1f} s "
                                     f"({total * 8 / took / 1e6:.1f} Mbit/s, limit 16)")
        summary["streams"] = {k: {"bytes_in": v[0], "bytes_out": v[1], "exact": v[2]}
                              for k, v in results.items()}

        # 4. Payments and ratings, both ways; a device rates for alice.
        await alice.pay(lease_a.id, method="card", reference="ch_alice_1")
        await dave.pay(lease_b.id, method="ledger", reference="dave-credit")
        await devs[0].rate(lease_a.id, satisfied=True, score=5, text="smooth stream")
        await dave.rate(lease_b.id, satisfied=True, score=4)
        n.done("payments", "alice by card, dave by ledger credit; alice's phone rated "
                           f"{net.name_of(lease_a.provider)} 5★")

        # 5. Group purchase: erin sponsors frank; grace pays her own share.
        erin = await stack.enter_async_context(client(base, "erin", _nodes(addrs, 1, 2)))
        frank = await stack.enter_async_context(client(base, "frank", _nodes(addrs, 2, 2)))
        grace = await stack.enter_async_context(client(base, "grace", _nodes(addrs, 0, 1)))
        # Longer to close: the request must reach every member's node and three
        # pledges be confirmed by their nodes first (seen late on a loaded netns run).
        req_g = await erin.request("bandwidth", duration_ms=LEASE_MS, reserve=40,
                                   close_in_ms=2 * CLOSE_MS, group=True, rule="lowest",
                                   devices=[frank.key, grace.key],  # who may pledge
                                   note="erin, frank and grace buy together")
        for c in (frank, grace):  # they use other nodes: wait for the request to get there
            await poll("the group request to reach every member's node",
                       functools.partial(knows, c.auction, req_g.id), timeout=10)
        async with trio.open_nursery() as nursery:  # at once: each waits for its nodes
            nursery.start_soon(functools.partial(frank.pledge, req_g.id, willing=False))
            nursery.start_soon(functools.partial(erin.pledge, req_g.id, willing=True,
                                                 amount=12, sponsor=[frank.key]))
            nursery.start_soon(functools.partial(grace.pledge, req_g.id, willing=True,
                                                 amount=8))
        n.say("group: erin (pays, sponsors frank), frank (won't pay), grace (pays)")
        await bids_final(net, req_g.body.reveal_ms)  # type: ignore[attr-defined]
        aw_g, award_g = await erin.award(req_g.id)
        market_g, lease_g = await erin.lease(aw_g.id)
        if not verify_award(market_g, aw_g.id).valid or award_g.winner is None:
            raise StepFailed("the group award does not verify")
        if frank.key not in lease_g.group_members:
            raise StepFailed("the sponsored member is not covered by the group lease")
        for c in (frank, grace):  # other nodes than erin's: wait for the award there
            await poll("the group lease to reach every member's node",
                       functools.partial(knows, c.lease, lease_g.id), timeout=10)
        await erin.pay(lease_g.id, method="card", reference="erin+frank",
                       on_behalf=[erin.key, frank.key])
        await grace.pay(lease_g.id, method="card", reference="grace")
        await frank.rate(lease_g.id, satisfied=True, score=4, text="thanks erin")
        n.done("group purchase", f"{net.name_of(lease_g.provider)} at {award_g.price}; "
                                 f"shares {sorted(lease_g.shares().values())}, frank sponsored")

        # 6. Providers rate the payers; the lease ends; usage is signed.
        async def usage_seen() -> Usage | None:
            got = await alice.find_events(kind="usage", ref=lease_a.id)
            body = got[-1].body if got else None
            return body if isinstance(body, Usage) else None

        async def rated_back() -> bool | None:
            rs = await alice.find_events(kind="rating", ref=lease_a.id)
            return True if any(getattr(r.body, "subject", None) == alice.key for r in rs) else None

        await poll("the provider's rating of alice", rated_back, timeout=15)
        n.done("provider rated the recipient", "alice paid: satisfied")
        n.say(f"waiting for the lease to end ({(lease_a.end_ms - now_ms()) / 1000:.0f} s) "
              "and its signed usage summary")
        usage = await poll("the usage summary", usage_seen,
                           timeout=(lease_a.end_ms - now_ms()) / 1000 + 20)
        await tunnel_usage(net, dave, lease_b, summary["tunnel"])
        auctions = [r_z.id, r_b.id, req_a.id, req_b.id, req_g.id]
        final = await market_of(alice, [*provider_keys, alice.key, dave.key, erin.key],
                                auctions)
        subs = [s for s in final.subcontracts.values() if s.lease == lease_a.id]
        if not subs:
            raise StepFailed("the winner recorded no subcontract for the aes-gcm step")
        n.done("lease ended", f"usage: {sum(m.bytes_in for m in usage.members)} bytes in, "
                              f"{sum(m.segments for m in usage.members)} segments, "
                              f"aes-gcm subcontracted to "
                              f"{', '.join(sorted({net.name_of(s.contractor) for s in subs}))}")
        summary["lease"] = {
            "id": lease_a.id.hex(), "provider": net.name_of(lease_a.provider),
            "members": len(lease_a.devices), "max_rate_bps": lease_a.max_rate_bps,
            "min_rate_bps": lease_a.min_rate_bps, "price": lease_a.price,
            "usage": [{"member": net_member(devs, devices, m.member), "bytes_in": m.bytes_in,
                       "bytes_out": m.bytes_out, "segments": m.segments} for m in usage.members],
            "shortfall_ms": usage.shortfall_ms, "rate_limited": usage.rate_limited,
            "subcontracts": [{"contractor": net.name_of(s.contractor),
                              "services": list(s.services)} for s in subs],
        }
        summary["auctions"] = [auction_row(final, net, rid) for rid in auctions]
        summary["reputation_after"] = [rep_row(final, net, p.ident.public, "provider")
                                       for p in net.providers]
        summary["recipients"] = [
            {**rep_row(final, net, c.key, "recipient"), "who": who}
            for who, c in (("alice", alice), ("dave", dave), ("erin", erin))]
    digests = await net.wait_converged()
    summary["digests"] = digests
    n.done("every node has the same state digest", next(iter(digests.values()))[:16])
    return summary


TUNNEL_FILE_BYTES = 2 << 20


async def _http_file(body: bytes, stream: trio.SocketStream) -> None:
    """A tiny HTTP/1.0 server: any GET gets `body` (the destination of the tunnel)."""
    head = b""
    with trio.move_on_after(10):
        while b"\r\n\r\n" not in head and len(head) < 8192:
            chunk = await stream.receive_some(4096)
            if not chunk:
                break
            head += chunk
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_all(b"HTTP/1.0 200 OK\r\nContent-Type: application/octet-stream"
                                  b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    await stream.aclose()


async def tunnel_fetch(net: Devnet, dev: LightClient, lease: Lease) -> dict[str, Any]:
    """A member device of a bandwidth lease fetches a file from a local HTTP server
    through the winner's tunnel (the provider connects to the server, not the device);
    checked byte for byte."""
    body = os.urandom(TUNNEL_FILE_BYTES)
    winner = net.name_of(lease.provider)
    net.n.say(f"dave's phone fetches {len(body) >> 20} MiB over HTTP through {winner}'s "
              f"tunnel (lease max {(lease.max_rate_bps or 0) / 1e6:.0f} Mbit/s)")
    await poll("the bandwidth lease to reach the phone's node",
               functools.partial(knows, dev.lease, lease.id), timeout=10)
    await wait_until_ms(lease.start_ms)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(
            trio.serve_tcp, functools.partial(_http_file, body), 0, host=net.tunnel_host))
        port = int(listeners[0].socket.getsockname()[1])
        t0 = time.monotonic()
        tunnel = await dev.open_tunnel(lease, net.tunnel_host, port, timeout=15)
        await tunnel.send_all(b"GET /file HTTP/1.0\r\nHost: %s\r\n\r\n"
                              % net.tunnel_host.encode())
        await tunnel.send_eof()
        got = bytearray()
        with trio.fail_after(60):
            while (view := await tunnel.receive_view()) is not None:
                got += view
            await tunnel.aclose()
        took = time.monotonic() - t0
        nursery.cancel_scope.cancel()
    head, _, data = bytes(got).partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.0 200") or data != body:
        raise StepFailed(f"the file fetched through the tunnel differs ({len(data)} of "
                         f"{len(body)} bytes; status {head[:40]!r})")
    end = tunnel.end
    net.n.done("tunnel fetch byte-exact", f"{len(body) / 1e6:.1f} MB in {took:.1f} s "
                                          f"({len(got) * 8 / took / 1e6:.1f} Mbit/s) via "
                                          f"{winner}, which connected to {tunnel.reply.addr}")
    return {"lease": lease.id.hex(), "provider": winner, "bytes": len(body), "exact": True,
            "seconds": round(took, 2), "max_rate_bps": lease.max_rate_bps,
            "provider_bytes_down": end.bytes_down if end else None,
            "member": dev.key.hex()}


async def tunnel_usage(net: Devnet, c: LightClient, lease: Lease, info: dict[str, Any]) -> None:
    """The winner's signed usage of the bandwidth lease shows the phone's bytes."""
    async def seen() -> Usage | None:
        got = await c.find_events(kind="usage", ref=lease.id)
        body = got[-1].body if got else None
        return body if isinstance(body, Usage) else None

    usage = await poll("the bandwidth lease's usage summary", seen,
                       timeout=(lease.end_ms - now_ms()) / 1000 + 20)
    m = next((m for m in usage.members if m.member.hex() == info["member"]), None)
    if m is None or m.bytes_out < info["bytes"]:
        raise StepFailed(f"the tunnel's usage does not show the phone's download: {usage}")
    info["usage"] = {"bytes_in": m.bytes_in, "bytes_out": m.bytes_out,
                     "active_ms": m.active_ms, "rate_limited": usage.rate_limited}
    net.n.done("tunnel usage signed", f"{net.name_of(lease.provider)} billed dave's phone "
                                      f"{m.bytes_out} bytes down, {m.bytes_in} up, "
                                      f"{m.active_ms} ms active")


MALLORY_LEASE_MS = 1_000


async def unpaid_warm_up(net: Devnet, mallory: LightClient, request: bytes) -> None:
    """mallory awards her warm-up auction, never pays, and the lease ends: its provider
    rates her unpaid. Waits until every node holds that rating, so each provider
    judges her next request on the same record."""
    await bids_final(net, (await mallory.auction(request)).auction.deadline_ms)
    aw, body = await mallory.award(request)
    if body.winner is None:
        raise StepFailed("mallory's warm-up auction got no bids")
    _, lease = await mallory.lease(aw.id)

    async def rated_unpaid() -> bool | None:
        rs = await mallory.find_events(kind="rating", ref=lease.id)
        return True if any(getattr(r.body, "subject", None) == mallory.key
                           and not getattr(r.body, "satisfied", True) for r in rs) else None

    await poll("the provider's unpaid rating of mallory", rated_unpaid,
               timeout=(lease.end_ms - now_ms()) / 1000 + 15)
    await net.wait_converged()
    rec = (await mallory.reputation(mallory.key)).recipient
    net.n.done("unpaid lease rated", f"{net.name_of(lease.provider)} rated mallory unpaid "
                                     f"after her lease ended; her paid record "
                                     f"{rep_label(rec)}")


async def recipient_policy_shown(net: Devnet, mallory: LightClient,
                                 request: bytes) -> dict[str, Any]:
    """After mallory's auction closed: each provider's bid or skip, why (the same pure
    verdict the provider's agent applies, on her record as of the auction's start), and
    the skip as the provider counted it in its status."""
    info = await mallory.auction(request)
    await wait_until_ms(info.auction.request.close_ms)
    a, rec = info.auction, info.recipient_record
    net.n.say(f"mallory's paid record at her auction's start: {rec.label()}")
    verdicts: dict[bytes, tuple[ProviderProc, int, Verdict]] = {}
    for p in net.providers:
        price = _price(p.spec, a.request.service, a.request.duration_ms)
        if price is not None and price <= a.request.reserve:
            pol = p.spec.policy
            verdicts[p.ident.public] = (p, price, recipient_verdict(rec, RecipientPolicy(
                min_score_ppm=int(pol.get("min_recipient_score", 0) * 10_000),
                new_recipient=pol.get("new_recipient", "bid"),
                risk_premium_pct=pol.get("risk_premium_pct", 0)), price, a.request.reserve))

    def as_expected(bids: dict[bytes, int | None]) -> bool:
        return all(bids.get(k, -1) == (v.price if v.bid else -1)
                   for k, (_, _, v) in verdicts.items())

    async def settled() -> dict[bytes, int | None] | None:
        got = {b.provider: b.price for b in await mallory.bids(request)}
        return got if as_expected(got) else None

    try:
        bids = await poll("the bids the providers' policies call for", settled, timeout=10)
    except StepFailed:
        got = {net.name_of(b.provider): b.price for b in await mallory.bids(request)}
        want = {p.spec.name: v.price if v.bid else f"skip ({v.reason})"
                for p, _, v in verdicts.values()}
        raise StepFailed(f"mallory's auction got bids {got}, the policies say {want}"
                         ) from None
    rows: list[dict[str, Any]] = []
    for key, (p, price, v) in verdicts.items():
        status = await trio.to_thread.run_sync(control_call, p.data_dir, {"op": "status"}, 10)
        skipped = status["services"]["provider"]["skipped"]
        if not v.bid and not skipped.get(v.reason):
            raise StepFailed(f"{p.spec.name} did not count its skip ({v.reason}): {skipped}")
        what = (f"skipped ({v.reason}): {v.detail}" if not v.bid else
                f"bid {v.price} instead of {price} ({v.reason}): {v.detail}" if v.reason
                else f"bid {price}: no policy against her")
        net.n.say(f"   {p.spec.name:9} {what}")
        rows.append({"provider": p.spec.name, "policy": p.spec.policy, "list_price": price,
                     "bid": bids.get(key), "reason": v.reason, "detail": v.detail,
                     "skipped_counted": dict(skipped)})
    if not any(r["bid"] is None for r in rows) or not any(r["reason"] == "premium"
                                                         for r in rows):
        raise StepFailed(f"no provider both skipped and charged mallory more: {rows}")
    net.n.done("provider policy on an unpaid recipient",
               ", ".join(f"{r['provider']} {'skipped' if r['bid'] is None else 'bid'}"
                         + (f" (+{r['policy'].get('risk_premium_pct')}%)"
                            if r["reason"] == "premium" else "") for r in rows))
    return {"recipient": "mallory", "record": rec.to_json(), "providers": rows}


def _price(spec: ProviderSpec, service: str, duration_ms: int) -> int | None:
    offer = spec.offers.get(service)
    return None if offer is None else max(1, -(-offer["price"] * duration_ms // HOUR_MS))


async def knows(lookup: Callable[[bytes], Awaitable[Any]], event_id: bytes) -> bool | None:
    """True once the client's nodes know `event_id` (gossip takes up to a few hundred
    ms to bring another client's fresh event to them), None before."""
    try:
        await lookup(event_id)
    except UsageError:
        return None
    return True


async def bids_in_revealed(c: LightClient, rid: bytes, want: int) -> bool | None:
    bids = await c.bids(rid)
    return True if sum(b.price is not None for b in bids) >= want else None


def net_member(devs: list[LightClient], names: list[str], key: bytes) -> str:
    for c, name in zip(devs, names, strict=True):
        if c.key == key:
            return name
    return key.hex()[:8]


def auction_row(market: Market, net: Devnet, rid: bytes) -> dict[str, Any]:
    a = market.auctions[rid]
    out = a.outcome
    return {
        "id": rid.hex()[:12], "service": a.request.service, "rule": a.request.rule,
        "sealed": a.request.sealed, "group": a.request.group, "status": a.status(now_ms()),
        "bids": [{"provider": net.name_of(b.provider), "price": b.price, "status": b.status,
                  "reputation": rep_label(market.reputation.score(
                      b.provider, "provider", a.request.close_ms))}
                 for b in a.bids.values()],
        "winner": net.name_of(a.bids[out.winner].provider) if out and out.winner else None,
        "price": out.price if out else None,
    }


def _rep(row: dict[str, Any]) -> str:
    return rep_text(int(row["score_ppm"]), int(row["ratings"]))


def print_summary(summary: dict[str, Any], out: Output) -> None:
    if out.json_mode:
        out.json(summary)
        return
    print("\n== auctions ==")
    rows = []
    for a in summary["auctions"]:
        bids = "; ".join(f"{b['provider']} {b['price']}: {b['reputation']}"
                         for b in a["bids"])
        kind = "sealed " if a["sealed"] else ("group " if a["group"] else "")
        rows.append([a["id"], a["service"], kind + a["rule"], a["winner"] or "-",
                     a["price"] if a["price"] is not None else "-", bids])
    _table(out, ["auction", "service", "rule", "winner", "price", "bids (reputation at close)"],
              rows)
    lease = summary["lease"]
    print(f"\n== alice's shared lease {lease['id'][:12]} from {lease['provider']} "
          f"(price {lease['price']}, max {lease['max_rate_bps']} bit/s, "
          f"min {lease['min_rate_bps']} bit/s) ==")
    _table(out, ["member", "bytes in", "bytes out", "segments"],
              [[u["member"], u["bytes_in"], u["bytes_out"], u["segments"]]
               for u in lease["usage"]])
    counts: dict[str, int] = {}
    for sc in lease["subcontracts"]:
        k = f"{sc['contractor']} ({'+'.join(sc['services'])})"
        counts[k] = counts.get(k, 0) + 1
    subs = ", ".join(f"{k} x{v}" for k, v in counts.items())
    print(f"subcontracted: {subs}; time below min rate: {lease['shortfall_ms']} ms; "
          f"rate-limit waits: {lease['rate_limited']}")
    tun = summary.get("tunnel")
    if tun:
        use = tun.get("usage", {})
        print(f"\n== dave's bandwidth lease {tun['lease'][:12]} from {tun['provider']} "
              f"(max {tun['max_rate_bps']} bit/s) ==\nphone fetched {tun['bytes']} bytes "
              f"through the tunnel in {tun['seconds']} s, byte-exact; usage: "
              f"{use.get('bytes_out')} bytes down, {use.get('bytes_in')} up, "
              f"{use.get('active_ms')} ms active")
    print("\n== provider reputation, before → after ==")
    before = {r["who"]: r for r in summary["reputation_before"]}
    _table(out, ["provider", "before", "after", "ratings", "satisfied", "unsatisfied"],
              [[r["who"], _rep(before[r["who"]]), _rep(r), r["ratings"], r["satisfied"],
                r["unsatisfied"]] for r in summary["reputation_after"]])
    print("\n== recipient reputation (rated by providers: did they pay?) ==")
    _table(out, ["recipient", "score", "ratings", "satisfied"],
              [[r["who"], _rep(r), r["ratings"], r["satisfied"]]
               for r in summary["recipients"]])
    pol = summary.get("recipient_policy")
    if pol:
        print(f"\n== provider policy on {pol['recipient']}, who did not pay (paid record "
              f"{record_text(pol['record'])}) ==")
        _table(out, ["provider", "policy", "list price", "bid", "why"],
               [[r["provider"], ", ".join(f"{k} {v}" for k, v in r["policy"].items()) or "-",
                 r["list_price"], "skipped" if r["bid"] is None else r["bid"],
                 r["detail"] or "-"] for r in pol["providers"]])
    print("\n== state digests ==")
    _table(out, ["node", "digest"], [[k, v] for k, v in summary["digests"].items()])


async def _main(args: argparse.Namespace, out: Output) -> int:
    # Light clients log transient disagreement between nodes while events propagate;
    # the devnet waits for convergence itself and reports only failures.
    logging.getLogger("bidmesh").setLevel(logging.ERROR)
    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bidmesh-devnet-"))
    base.mkdir(parents=True, exist_ok=True)
    # A reused --dir would keep earlier runs' ledgers (offers of nodes that no longer
    # exist): every run starts from fresh state.
    for name in [*(p.name for p in PROVIDERS), "clients"]:
        shutil.rmtree(base / name, ignore_errors=True)
    narrator = Narrator(out)
    net = Devnet(base, args.providers, narrator)
    net.write_configs()
    narrator.say(f"state in {base}; starting {len(net.providers)} provider nodes "
                 f"({', '.join(p.spec.name for p in net.providers)})")
    net.start()
    status = 0
    try:
        # The nodes run in their own sessions (so a terminal's Ctrl-C reaches us, not
        # them, and we stop them in order); SIGTERM/SIGHUP to us must stop them too.
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP) as signals:
            status_box: list[int] = []
            async with trio.open_nursery() as nursery:
                async def on_signal() -> None:
                    async for _ in signals:
                        status_box.append(143)
                        nursery.cancel_scope.cancel()
                        return

                nursery.start_soon(on_signal)
                await _round(net, narrator, out, args)
                nursery.cancel_scope.cancel()
            if status_box:
                status = status_box[0]
    except (BidmeshError, trio.TooSlowError, OSError) as e:
        narrator.say(f"✗ {type(e).__name__}: {e}")
        print(f"devnet failed: {e}; logs under {base}", file=sys.stderr)
        status = 1
    except BaseExceptionGroup as eg:
        leaf = _first_leaf(eg)
        if isinstance(leaf, KeyboardInterrupt):
            status = 130
        else:
            narrator.say(f"✗ {type(leaf).__name__}: {leaf}")
            print(f"devnet failed: {type(leaf).__name__}: {leaf}; logs under {base}",
                  file=sys.stderr)
            status = 1
    except KeyboardInterrupt:
        status = 130
    finally:
        narrator.say("stopping nodes")
        net.stop()
    return status


def _first_leaf(eg: BaseExceptionGroup[BaseException]) -> BaseException:
    e: BaseException = eg
    while isinstance(e, BaseExceptionGroup):
        e = e.exceptions[0]
    return e


async def _round(net: Devnet, narrator: Narrator, out: Output, args: argparse.Namespace) -> None:
    await net.wait_ready()
    narrator.done("network up", f"{len(net.providers)} nodes, fully connected")
    summary = await play(net, out)
    summary["steps"] = [s for s, _ in narrator.steps]
    summary["elapsed_s"] = round(time.monotonic() - narrator.t0, 1)
    print_summary(summary, out)
    narrator.say(f"round complete in {summary['elapsed_s']} s")
    if args.keep:
        http = net.providers[0].http_port
        # stderr in JSON mode keeps stdout a single JSON document
        print(f"\nnetwork kept running; dashboard: http://127.0.0.1:{http}/ ; "
              f"inspect: bidmesh ledger --data-dir {net.providers[0].data_dir} summary; "
              "Ctrl-C stops everything", flush=True,
              file=sys.stderr if out.json_mode else sys.stdout)
        await trio.sleep_forever()


def cmd_devnet(args: argparse.Namespace, out: Output) -> int:
    if not 4 <= args.providers <= len(PROVIDERS):
        raise UsageError(f"--providers must be 4..{len(PROVIDERS)}")
    try:
        return trio.run(_main, args, out)
    except KeyboardInterrupt:
        return 130
