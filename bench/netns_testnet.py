"""The devnet round across real hosts: one network namespace per node, joined by veth
pairs to a bridge, every node with its own IP and the DEFAULT listen address
(`/ip4/0.0.0.0/tcp/4001`), so what peers and clients dial is what the nodes
advertise (node/addrs.py), not loopback.

    sudo .venv/bin/python bench/netns_testnet.py [--quick] [--hosts N] [--no-round]

Topology (all inside namespaces this run creates, named bmt<pid><rand>-*, removed on
every exit path): a switch namespace holding bridge br0; per node a namespace `-hK`
with `eth0` = 10.77.0.K+1/24; a client namespace `-c` (10.77.0.100) from which the
light clients of the round, the dial probe and the raw baseline run.

Steps: network up; advertised addresses (no 0.0.0.0 anywhere; loopback neither
in offers nor in what identify and signed peer records tell peers on other hosts);
the devnet round of node/devnet/ (`play`: warm-up leases, bids with reputation, a best-value award
verified, a sealed Vickrey auction, three devices streaming MPEG-TS through the
winner which subcontracts aes-gcm to another host, a phone fetching a file from an
HTTP server on the client host through the bandwidth lease's tunnel (the provider
on its host connects out), payments, ratings both ways, a group purchase, the signed
usage summaries, equal digests; needs 3+ hosts); an address
added to a node's interface is advertised and its offer re-published; every address
in every offer is dialed from the client host; a partition (one host's link down,
events published, link up) heals; `tc netem` delay+loss on one host's link where the
kernel has netem (reported otherwise). Last line: JSON with `hosts`, `steps`,
`steps_failed`, `digests_equal`, `advertised_dialable`, and `connect_ratio` (a libp2p
dial, TCP+noise+yamux, over a raw TCP connect between the same namespaces).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SUBNET = "10.77.0"
CLIENT_IP = f"{SUBNET}.100"
EXTRA_IP = f"{SUBNET}.200"  # added to host 0 mid-run: its offer must follow
PORT = 4001  # the default listen port; every node uses the default listen address
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def unavailable() -> str | None:
    """Why this cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, veth pairs)"
    for tool in ("ip",):
        if shutil.which(tool) is None:
            return f"`{tool}` not found (install iproute2)"
    probe = f"bmtprobe{os.getpid()}{secrets.token_hex(2)}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return f"network namespaces unavailable: {r.stderr.strip()}"
    try:
        r = subprocess.run(["ip", "-n", probe, "link", "add", "v0", "type", "veth", "peer",
                            "name", "v1"], capture_output=True, text=True)
        if r.returncode != 0:
            return f"veth pairs unavailable: {r.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def run(*cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip() or r.returncode}")
    return r


class Topology:
    """Namespaces, a bridge and veth pairs; `down()` removes all of it."""

    def __init__(self, hosts: int) -> None:
        self.prefix = f"bmt{os.getpid()}{secrets.token_hex(2)}"
        self.switch = f"{self.prefix}-s"
        self.hosts = [f"{self.prefix}-h{k}" for k in range(hosts)]
        self.client = f"{self.prefix}-c"
        self.created: list[str] = []

    def ip_of(self, k: int) -> str:
        return f"{SUBNET}.{k + 1}"

    def up(self) -> None:
        for ns in (self.switch, *self.hosts, self.client):
            run("ip", "netns", "add", ns)
            self.created.append(ns)
            run("ip", "-n", ns, "link", "set", "lo", "up")
        run("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", self.switch, "link", "set", "br0", "up")
        members = [(ns, self.ip_of(k)) for k, ns in enumerate(self.hosts)]
        members.append((self.client, CLIENT_IP))
        for k, (ns, ip) in enumerate(members):
            run("ip", "-n", self.switch, "link", "add", f"p{k}", "type", "veth", "peer", "name",
                "eth0", "netns", ns)
            run("ip", "-n", self.switch, "link", "set", f"p{k}", "master", "br0", "up")
            run("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
            run("ip", "-n", ns, "link", "set", "eth0", "up")

    def link(self, k: int, up: bool) -> None:
        run("ip", "-n", self.switch, "link", "set", f"p{k}", "up" if up else "down")

    def netem(self, k: int, spec: list[str] | None) -> str | None:
        """Apply (or with None remove) netem on host k's eth0; the error, if any."""
        cmd = ["ip", "netns", "exec", self.hosts[k], "tc", "qdisc"]
        if spec is None:
            r = run(*cmd, "del", "dev", "eth0", "root", check=False)
        elif shutil.which("tc") is None:
            return "tc not found (iproute2)"
        else:
            r = run(*cmd, "replace", "dev", "eth0", "root", "netem", *spec, check=False)
        return None if r.returncode == 0 else (r.stderr.strip() or f"exit {r.returncode}")

    def down(self) -> None:
        for ns in reversed(self.created):
            pids = run("ip", "netns", "pids", ns, check=False).stdout.split()
            for pid in pids:  # only processes inside the namespaces we created
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            run("ip", "netns", "del", ns, check=False)
        self.created.clear()


def in_ns(ns: str, *cmd: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *cmd]


# ---------------------------------------------------------------- the orchestrator


@dataclass
class Report:
    steps: list[dict[str, Any]]

    def ok(self, name: str, detail: str = "") -> None:
        self.steps.append({"step": name, "ok": True, "detail": detail})
        print(f"  ok    {name}" + (f": {detail}" if detail else ""), flush=True)

    def fail(self, name: str, detail: str) -> None:
        self.steps.append({"step": name, "ok": False, "detail": detail})
        print(f"  FAIL  {name}: {detail}", flush=True)

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[list[str]]:
        detail: list[str] = []
        try:
            yield detail
        except Exception as e:  # a bench step: record it and carry on with the others
            self.fail(name, f"{type(e).__name__}: {e}")
        else:
            self.ok(name, "; ".join(detail))


def _wait(cond: Any, timeout: float, what: str, every: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} (waited {timeout:.0f} s)")
        time.sleep(every)


def orchestrate(args: argparse.Namespace) -> dict[str, Any]:
    from node import config
    from node.control import control_call
    from node.devnet import PROVIDERS, ProviderProc
    from node.keys import Identity, save_key
    from node.p2p import peer_id_from_pubkey
    from node.status_file import read_status

    t0 = time.monotonic()
    topo = Topology(args.hosts)
    base = Path(tempfile.mkdtemp(prefix="bidmesh-netns-"))
    rep = Report([])
    out: dict[str, Any] = {"hosts": args.hosts}
    procs: list[ProviderProc] = []

    def status(p: ProviderProc) -> dict[str, Any]:
        return control_call(p.data_dir, {"op": "status"}, 10)

    def digests() -> list[str]:
        return [str(status(p)["digest"]) for p in procs]

    try:
        topo.up()
        rep.ok("network up", f"{args.hosts} hosts + client on bridge {SUBNET}.0/24")
        addrs = []
        for k in range(args.hosts):
            spec = PROVIDERS[k % len(PROVIDERS)]
            d = base / spec.name
            (d / "state").mkdir(parents=True, mode=0o700)
            ident = Identity.from_seed(os.urandom(32))
            save_key(d / "state" / "node.key", ident)
            procs.append(ProviderProc(spec, d, ident, PORT))
            addrs.append(f"/ip4/{topo.ip_of(k)}/tcp/{PORT}/p2p/{peer_id_from_pubkey(ident.public)}")
        for k, p in enumerate(procs):
            cfg = config.from_dict({
                # p2p.listen is left out: the default /ip4/0.0.0.0/tcp/4001.
                "node": {"network": "devnet", "data_dir": str(p.data_dir),
                         "status_interval_s": 0.5, "log_level": "info"},
                "p2p": {"bootstrap": [a for j, a in enumerate(addrs) if j != k],
                        "reconnect_min_s": 0.2, "reconnect_max_s": 2.0},
                "sync": {"interval_s": 1.0},
                "provider": {"enabled": True, "offers": p.spec.offers, "currency": "EUR",
                             "interval_s": 0.25, "note": f"{p.spec.name} (netns)",
                             **p.spec.policy},  # the round checks the recipient policies
                # Subcontractors are on the namespaces' private subnet.
                "dataplane": {"workers": 1, "contractor_addrs_allow": [f"{SUBNET}.0/24"]},
                # The round's tunnel fetches from an HTTP server on the client host
                # (a private address, refused by the default egress policy).
                "bandwidth": {"allow": [f"{CLIENT_IP}/32"]},
            })
            assert cfg.p2p.listen == ["/ip4/0.0.0.0/tcp/4001"]
            (p.dir / "node.toml").write_text(config.to_toml(cfg))
            with open(p.dir / "stderr.log", "ab") as log:
                p.popen = subprocess.Popen(
                    in_ns(topo.hosts[k], sys.executable, "-m", "node.cli", "run", "--config",
                          str(p.dir / "node.toml")),
                    stdout=subprocess.DEVNULL, stderr=log, cwd=p.dir, env=ENV)

        with rep.step("nodes up and connected") as d:
            def ready() -> bool:
                for p in procs:
                    if p.popen is not None and p.popen.poll() is not None:
                        raise RuntimeError(f"{p.spec.name} exited: "
                                           f"{(p.dir / 'stderr.log').read_text()[-500:]}")
                with contextlib.suppress(Exception):
                    return all(len(read_status(p.data_dir).get("peers", [])) >= len(procs) - 1
                               for p in procs)
                return False
            _wait(ready, 60, "every node connected to every other")
            d.append(f"{len(procs)} nodes, each with {len(procs) - 1} peers")

        with rep.step("advertised addresses") as d:
            for k, p in enumerate(procs):
                st = status(p)
                adv = [a.split("/p2p/")[0] for a in st["advertised_addrs"]]
                if any("0.0.0.0" in a or "127.0.0.1" in a for a in adv) \
                        or f"/ip4/{topo.ip_of(k)}/tcp/{PORT}" not in adv:
                    raise AssertionError(f"{p.spec.name} advertises {adv}")
                if st["listen_addrs"][0].split("/p2p/")[0] != f"/ip4/0.0.0.0/tcp/{PORT}":
                    raise AssertionError(f"{p.spec.name} listens on {st['listen_addrs']}")
                offer = st["services"]["provider"]["offer_addrs"]
                if any("127.0.0.1" in a for a in offer) or not offer:
                    raise AssertionError(f"{p.spec.name}'s offer carries {offer}")
            d.append(f"e.g. {procs[0].spec.name}: {adv_short(status(procs[0]))}")

        inner_state = {"base": str(base), "providers": [
            {"name": p.spec.name, "dir": str(p.dir), "addr": a}
            for p, a in zip(procs, addrs, strict=True)]}
        (base / "inner.json").write_text(json.dumps(inner_state))

        if not args.no_round:
            if args.hosts < 3:
                rep.fail("devnet round", "needs 3+ hosts (3 services, a subcontract)")
            else:
                res = inner(topo, base, "round", timeout=args.round_timeout)
                for s in res.get("steps", []):
                    rep.ok(f"round: {s}")
                if res.get("error"):
                    rep.fail("devnet round", res["error"])
                out["round_elapsed_s"] = res.get("elapsed_s")

        with rep.step("offer follows an added interface address") as d:
            run("ip", "-n", topo.hosts[0], "addr", "add", f"{EXTRA_IP}/24", "dev", "eth0")
            _wait(lambda: any(f"/ip4/{EXTRA_IP}/" in a for a in
                              status(procs[0])["services"]["provider"]["offer_addrs"]),
                  30, f"{procs[0].spec.name}'s offer with {EXTRA_IP}")
            d.append(f"{procs[0].spec.name} re-published its offer with {EXTRA_IP}")

        probe = inner(topo, base, "probe", timeout=120)
        dials = probe.get("dials", [])
        out["offer_addrs_dialed"] = len(dials)
        out["advertised_dialable"] = bool(dials) and all(x["ok"] for x in dials) and any(
            EXTRA_IP in x["addr"] for x in dials)
        (rep.ok if out["advertised_dialable"] else rep.fail)(
            "every offer address dialed from another host",
            f"{sum(x['ok'] for x in dials)}/{len(dials)} ok"
            + "".join(f"; {x['addr']}: {x['error']}" for x in dials if not x["ok"]))
        hidden = probe.get("identify_loopback", [])
        (rep.ok if probe.get("identified") and not hidden else rep.fail)(
            "loopback not advertised to other hosts",
            f"{probe.get('identified')} peers identified" + (f"; told {hidden}" if hidden
                                                             else ""))
        if probe.get("raw_connect_ms") and probe.get("p2p_connect_ms"):
            out["raw_connect_ms"] = probe["raw_connect_ms"]
            out["p2p_connect_ms"] = probe["p2p_connect_ms"]
            out["connect_ratio"] = round(probe["p2p_connect_ms"] / probe["raw_connect_ms"], 1)

        cut = len(procs) - 1
        with rep.step("partition heals (link down, events, link up)") as d:
            topo.link(cut, up=False)
            # Events published during the partition: the cut host cannot get them.
            events = [["offer", {"services": [], "currency": "EUR", "addrs": [],
                                 "note": f"partition {i}"}] for i in range(20)]
            control_call(procs[0].data_dir, {"op": "publish", "events": events}, 30)
            _wait(lambda: len(set(digests()[:cut])) == 1, 30, "the connected side converged")
            if digests()[cut] == digests()[0]:
                raise AssertionError("the cut host got the events: the link was not down")
            t_up = time.monotonic()
            topo.link(cut, up=True)
            _wait(lambda: len(set(digests())) == 1, 90, "every digest equal after link up")
            d.append(f"{procs[cut].spec.name} cut; converged {time.monotonic() - t_up:.1f} s "
                     "after link up")

        err = topo.netem(1, ["delay", "80ms", "20ms", "loss", "3%"])
        if err is not None:
            out["netem"] = f"unavailable: {err}"
            print(f"  note  tc netem unavailable on this kernel: {err}", flush=True)
        else:
            out["netem"] = "delay 80ms 20ms loss 3% on host 1"
            with rep.step("converges over a netem link (80±20 ms, 3% loss)") as d:
                events = [["offer", {"services": [], "currency": "EUR", "addrs": [],
                                     "note": f"netem {i}"}] for i in range(20)]
                t1 = time.monotonic()
                control_call(procs[0].data_dir, {"op": "publish", "events": events}, 30)
                _wait(lambda: len(set(digests())) == 1, 90, "digests equal over netem")
                d.append(f"{time.monotonic() - t1:.1f} s")
            topo.netem(1, None)

        with rep.step("final digests equal") as d:
            final = _wait(lambda: (lambda ds: ds if len(set(ds)) == 1 else None)(digests()),
                          60, "equal digests")
            d.append(final[0][:16])
        out["digests_equal"] = rep.steps[-1]["ok"]
        out["sync_failed"] = {p.spec.name: status(p)["sync"]["failed"] for p in procs}
        out["sync_rounds"] = {p.spec.name: status(p)["sync"]["rounds"] for p in procs}
    except Exception as e:
        rep.fail("testnet", f"{type(e).__name__}: {e}")
    finally:
        for p in procs:
            if p.popen is not None and p.popen.poll() is None:
                p.popen.send_signal(signal.SIGTERM)
        for p in procs:
            if p.popen is not None:
                try:
                    p.popen.wait(10)
                except subprocess.TimeoutExpired:
                    p.popen.kill()
                    p.popen.wait(10)
        topo.down()
        if not args.keep_state:
            shutil.rmtree(base, ignore_errors=True)
    out.setdefault("digests_equal", False)
    out.setdefault("advertised_dialable", False)
    out["steps"] = [s["step"] for s in rep.steps if s["ok"]]
    out["steps_failed"] = sum(not s["ok"] for s in rep.steps)
    out["failed"] = [f"{s['step']}: {s['detail']}" for s in rep.steps if not s["ok"]]
    out["elapsed_s"] = round(time.monotonic() - t0, 1)
    return out


def adv_short(st: dict[str, Any]) -> str:
    return ", ".join(a.split("/p2p/")[0] for a in st["advertised_addrs"])


def inner(topo: Topology, base: Path, mode: str, timeout: float) -> dict[str, Any]:
    """Run `mode` of this script inside the client namespace; its last line is JSON."""
    cmd = in_ns(topo.client, sys.executable, str(Path(__file__).resolve()), "--inner", mode,
                "--state", str(base / "inner.json"))
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=timeout,
                              env=ENV, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"{mode} did not finish within {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    for ln in lines[:-1]:
        print(f"    {ln}", flush=True)
    try:
        result: dict[str, Any] = json.loads(lines[-1])
    except (IndexError, ValueError):
        return {"error": f"{mode} exited {proc.returncode} without a result"}
    return result


# ---------------------------------------------------------------- inside the client host


def _load_net(state: dict[str, Any]) -> Any:
    from node.devnet import PROVIDERS, Devnet, Narrator, ProviderProc
    from node.keys import load_key
    from node.output import Output

    class HostProc(ProviderProc):
        """A provider on another host: dialed at its advertised address."""

        remote_addr: str = ""

        @property
        def addr(self) -> str:
            return self.remote_addr

    specs = {s.name: s for s in PROVIDERS}
    net = object.__new__(Devnet)
    net.base = Path(state["base"])
    net.n = Narrator(Output(json_mode=False))
    net.summary = {}
    net.tunnel_host = CLIENT_IP  # the round's HTTP server, as the providers reach it
    net.providers = []
    for p in state["providers"]:
        d = Path(p["dir"])
        hp = HostProc(specs[p["name"]], d, load_key(d / "state" / "node.key"), PORT)
        hp.remote_addr = p["addr"]
        net.providers.append(hp)
    return net


async def inner_round(state: dict[str, Any]) -> dict[str, Any]:
    from node.devnet import play

    net = _load_net(state)
    t0 = time.monotonic()
    try:
        await play(net, net.n.out)
    except Exception as e:  # reported as the round's failure, with the steps done
        return {"steps": [s for s, _ in net.n.steps], "error": f"{type(e).__name__}: {e}",
                "elapsed_s": round(time.monotonic() - t0, 1)}
    return {"steps": [s for s, _ in net.n.steps], "elapsed_s": round(time.monotonic() - t0, 1)}


async def inner_probe(state: dict[str, Any]) -> dict[str, Any]:
    """Dial every address in every provider's latest offer (fetched and verified by a
    light client) with a fresh libp2p host; compare with a raw TCP connect."""
    import trio

    from node import addrs as node_addrs
    from node.client import LightClient
    from node.keys import Identity
    from node.p2p import open_host

    net = _load_net(state)
    dials: list[dict[str, Any]] = []
    async with LightClient.open(net.base / "clients" / "probe",
                                [p.addr for p in net.providers[:2]], network="devnet") as c:
        offer_addrs = []
        for p in net.providers:
            offer_addrs += [(p, a) for a in await c.provider_addrs(p.ident.public)]
    p2p_ms: list[float] = []
    identified, told_loopback = 0, []
    for _p, a in offer_addrs:
        async with open_host(Identity.from_seed(os.urandom(32)).seed,
                             [f"/ip4/{CLIENT_IP}/tcp/0"]) as h:
            t = time.perf_counter()
            try:
                with trio.fail_after(15):
                    await h.connect(a)
                p2p_ms.append((time.perf_counter() - t) * 1000)
                dials.append({"addr": a, "ok": True})
            except Exception as e:  # the probe's result, not a crash
                dials.append({"addr": a, "ok": False, "error": f"{type(e).__name__}: {e}"})
                continue
            peer = h.libp2p.get_peerstore()
            with trio.move_on_after(5):
                while not getattr(h.libp2p, "_identified_peers", {}).get(p2p_peer(a)):
                    await trio.sleep(0.05)
            if p2p_peer(a) in getattr(h.libp2p, "_identified_peers", {}):
                identified += 1
                told = [str(m) for m in peer.addrs(p2p_peer(a))]
                told_loopback += [x for x in told if node_addrs.is_loopback(x)]
    raw_ms = []
    for p in net.providers:
        host, port = p.addr.split("/")[2], int(p.addr.split("/")[4])
        for _ in range(5):
            t = time.perf_counter()
            with socket.create_connection((host, port), timeout=5):
                raw_ms.append((time.perf_counter() - t) * 1000)
    return {"dials": dials, "identified": identified, "identify_loopback": told_loopback,
            "raw_connect_ms": round(statistics.median(raw_ms), 3) if raw_ms else None,
            "p2p_connect_ms": round(statistics.median(p2p_ms), 3) if p2p_ms else None}


def p2p_peer(addr: str) -> Any:
    from node.p2p import parse_peer_id

    return parse_peer_id(addr.rsplit("/p2p/", 1)[1])


def main() -> int:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 hosts")
    ap.add_argument("--hosts", type=int, help="node hosts (default 4; 3 with --quick)")
    ap.add_argument("--no-round", action="store_true",
                    help="skip the devnet round (addresses, dials, faults only)")
    ap.add_argument("--round-timeout", type=float, default=240.0)
    ap.add_argument("--keep-state", action="store_true", help="keep the nodes' data dirs")
    ap.add_argument("--inner", choices=["round", "probe"], help=argparse.SUPPRESS)
    ap.add_argument("--state", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.inner:
        import logging

        import trio

        from node.cli import quiet_logging

        quiet_logging()
        # Light clients log transient disagreement while events propagate (as devnet).
        logging.getLogger("bidmesh").setLevel(logging.ERROR)
        state = json.loads(Path(args.state).read_text())
        fn = inner_round if args.inner == "round" else inner_probe
        try:
            result = trio.run(fn, state)
        except Exception as e:  # one JSON line for the orchestrator either way
            result = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(result), flush=True)
        return 0
    args.hosts = args.hosts or (3 if args.quick else 4)
    if not 2 <= args.hosts <= 5:
        ap.error("--hosts must be 2..5 (one devnet provider per host)")
    why = unavailable()
    if why:
        print(f"netns testnet cannot run here: {why}", file=sys.stderr)
        print(json.dumps({"hosts": args.hosts, "skipped": why}))
        return 2

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # unwinds through orchestrate's finally: cleanup

    signal.signal(signal.SIGTERM, on_term)
    try:
        result = orchestrate(args)
    except KeyboardInterrupt:
        print("interrupted; the namespaces and nodes of this run are removed", file=sys.stderr)
        return 130
    print(json.dumps(result))
    return 0 if result["steps_failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
