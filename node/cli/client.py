"""`bidmesh client ...`: the light client's arguments and defaults. The commands
themselves (and trio, libp2p, node/client/) load only when one runs
(node/cli/client_cmds.py).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from .. import paths
from ..errors import UsageError
from ..output import Output
from .common import DEFAULT_NETWORK, Handler, add_json_flag


def register_client(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`bidmesh client ...`: the light client (node/client/, imported only when run)."""
    _client_parsers(sub)


def _client_handler(name: str) -> Handler:
    def run(args: argparse.Namespace, out: Output) -> int:
        from .client_cmds import run_command

        _client_defaults(args)
        return run_command(name, args, out)
    return run


def _client_defaults(args: argparse.Namespace) -> None:
    """--dir defaults to DATA_DIR/client; without --node the client talks to the node
    running in DATA_DIR (the one default data dir every command shares), on its network
    unless --network says otherwise."""
    data_dir = paths.default_data_dir()
    if args.dir is None:
        args.dir = paths.client_dir(data_dir)
    if not args.node:
        from ..status_file import read_status

        hint = "pass --node /ip4/ADDR/tcp/PORT/p2p/ID"
        if not (data_dir / "status.json").exists():
            raise UsageError(f"no --node given and no node is running in {data_dir} "
                             f"(${paths.DATA_DIR_ENV}); {hint}")
        st = read_status(data_dir)  # unreadable (permissions): its own one line
        args.node = local_dial_addrs(st.get("listen_addrs", []))
        if st.get("state") != "running" or not args.node:
            raise UsageError(f"no --node given and the node in {data_dir} is "
                             f"{st.get('state')}; {hint}")
        args.network = args.network or st.get("network")
    args.network = args.network or DEFAULT_NETWORK


def local_dial_addrs(listen_addrs: Sequence[str]) -> list[str]:
    """How a process on the same host dials a node listening on `listen_addrs`: an
    unspecified address (0.0.0.0, ::) through loopback, others as they are."""
    out = []
    for a in listen_addrs:
        if a.startswith("/ip4/0.0.0.0/"):
            a = "/ip4/127.0.0.1/" + a[len("/ip4/0.0.0.0/"):]
        elif a.startswith("/ip6/::/"):
            a = "/ip6/::1/" + a[len("/ip6/::/"):]
        out.append(a)
    return out


def _yes_no(text: str) -> bool:
    t = text.lower()
    if t in ("yes", "y", "true", "1"):
        return True
    if t in ("no", "n", "false", "0"):
        return False
    raise argparse.ArgumentTypeError("give yes or no")


def _duration_ms(text: str) -> int:
    """`90`, `90s`, `15m`, `2h`, `1d` (no unit: seconds)."""
    units = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
    for u in sorted(units, key=len, reverse=True):
        if text.endswith(u) and text[: -len(u)].isdigit():
            return int(text[: -len(u)]) * units[u]
    if text.isdigit():
        return int(text) * 1000
    raise argparse.ArgumentTypeError(f"{text!r}: give a duration such as 90s, 15m, 2h")


def _client_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("client", help="light client for recipients: auctions, leases, ratings",
                       description="Talk to one or more nodes as a recipient; every answer is "
                                   "verified and re-derived locally (docs/client.md).")
    p.add_argument("--dir", type=Path,
                   help="client directory (key and state; default: "
                        f"${paths.DATA_DIR_ENV}/{paths.CLIENT_DIR}, else "
                        f"{paths.client_dir()})")
    p.add_argument("--node", action="append", metavar="MADDR",
                   help="node multiaddr with /p2p/<peer id>; repeat to cross-check nodes "
                        "(default: the node running in the default data dir)")
    p.add_argument("--network",
                   help="network id (default: the local node's when --node is not given, "
                        "else main)")
    p.add_argument("--timeout", type=float, default=10.0, help="per-request timeout, seconds")
    cs = p.add_subparsers(dest="client_cmd", metavar="COMMAND", required=True)

    def cmd(name: str, help: str) -> argparse.ArgumentParser:
        c: argparse.ArgumentParser = cs.add_parser(name, help=help)
        add_json_flag(c)
        c.set_defaults(func=_client_handler(name))
        return c

    c = cmd("request", "post a request (open an auction)")
    c.add_argument("service", help="service, e.g. bandwidth or zstd")
    c.add_argument("--duration", type=_duration_ms, required=True, help="block length, e.g. 1h")
    c.add_argument("--reserve", type=int, required=True, help="most you pay (minor units)")
    c.add_argument("--currency", default="EUR")
    c.add_argument("--close-in", type=_duration_ms, default=60_000,
                   help="bids close after this long (default 60s)")
    c.add_argument("--start", type=int, help="lease start, ms since the epoch (default: when "
                                             "bids are final)")
    c.add_argument("--chain", action="append", default=[], help="processing service, in order")
    c.add_argument("--max-rate", type=int, help="max rate, bits/s")
    c.add_argument("--min-rate", type=int, help="min rate, bits/s")
    c.add_argument("--device", action="append", default=[], help="member device key (hex)")
    c.add_argument("--phone", action="append", default=[], help="member phone (+49...)")
    c.add_argument("--user", action="append", default=[], help="member user id")
    c.add_argument("--max-devices", type=int, help="at most N delegated client devices")
    c.add_argument("--rule", choices=["lowest", "best_value", "vickrey"], default="lowest")
    c.add_argument("--sealed", action="store_true", help="sealed bids (commit, then reveal)")
    c.add_argument("--reveal-window", type=_duration_ms, default=30_000,
                   help="sealed: reveal window after close (default 30s)")
    c.add_argument("--group", action="store_true", help="group request (members pledge)")
    c.add_argument("--note", default="")

    c = cmd("bids", "bids of an auction with providers' reputation")
    c.add_argument("request", help="request id (hex)")
    c.add_argument("--watch", action="store_true", help="live view until the auction ends")
    c.add_argument("--interval", type=float, default=1.0, help="--watch poll interval, s")

    c = cmd("award", "award your auction to the rule's winner")
    c.add_argument("request", help="request id (hex)")

    c = cmd("pay", "pay for a lease")
    c.add_argument("lease", help="lease id (= award id, hex)")
    c.add_argument("--amount", type=int, help="default: your share / what is owed")
    c.add_argument("--method", default="ledger")
    c.add_argument("--reference", default="")
    c.add_argument("--on-behalf", action="append", default=[], help="member key (hex)")

    c = cmd("pledge", "join a group request")
    c.add_argument("request", help="request id (hex)")
    c.add_argument("--amount", type=int, default=0, help="most you pay in total")
    c.add_argument("--unwilling", action="store_true", help="join without paying")
    c.add_argument("--sponsor", action="append", default=[], help="member key you pay for")

    c = cmd("stream", "stream a file or stdin through a lease")
    c.add_argument("lease", help="lease id (hex)")
    c.add_argument("--in", dest="infile", default="-", help="input file (default stdin)")
    c.add_argument("--out", dest="outfile", default="-", help="output file (default stdout)")
    c.add_argument("--format", choices=["lp", "ts"], default="lp",
                   help="lp: cut the input into --packet byte packets (default); ts: the "
                        "input is MPEG-TS, sent as its 188-byte packets")
    c.add_argument("--packet", type=int, default=64 * 1024,
                   help="--format lp packet size in bytes")
    c.add_argument("--chain", action="append", default=[], metavar="SERVICE",
                   help="process with these services in order (repeat): a contiguous "
                        "part of the lease's chain, or identity (default: the lease's chain)")
    c.add_argument("--out-format", choices=["results", "frames", "packets"],
                   default="results", help="results: each segment's result in order "
                   "(default); frames: u32 length, u64 seq, result per segment; packets: "
                   "the packets of each result (chains that return packets)")
    c.add_argument("--progress", choices=["auto", "yes", "no"], default="auto")

    c = cmd("tunnel", "a local SOCKS5 proxy through a bandwidth lease")
    c.add_argument("lease", help="lease id (hex or unique prefix)")
    c.add_argument("--socks", default="127.0.0.1:1080", metavar="HOST:PORT",
                   help="where the proxy listens (default 127.0.0.1:1080; port 0: any)")
    c.add_argument("--allow-lan", action="store_true",
                   help="allow a non-loopback --socks address (no SOCKS authentication: "
                        "anyone who reaches it uses your lease)")
    c.add_argument("--max-connections", type=int, default=64,
                   help="SOCKS connections at once (default 64)")
    c.add_argument("--progress", choices=["auto", "yes", "no"], default="auto")

    c = cmd("rate", "rate the other party of a lease")
    c.add_argument("lease", help="lease id (hex)")
    c.add_argument("--satisfied", type=_yes_no, required=True, help="yes or no")
    c.add_argument("--score", type=int, required=True, choices=range(1, 6))
    c.add_argument("--text", default="")

    cmd("leases", "leases you are a party to")
    c = cmd("reputation", "a key's reputation (default: yours)")
    c.add_argument("key", nargs="?", help="public key (hex)")
    cmd("whoami", "your public key, peer id and chain head")
