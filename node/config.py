"""Node configuration: a TOML file (see config/node.example.toml) read with tomllib.

Every option has a default; the file names only what differs. Unknown sections or
keys and values of the wrong type or range raise `ConfigError` naming the key
(`gossip.batch_events`), so a typo never silently falls back to a default.
Relative paths are resolved against the directory of the config file.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import paths
from .errors import ConfigError
from .events import NETWORK_RE, SERVICE_RE

LOG_LEVELS = ("debug", "info", "warning", "error")


Check = Callable[[Any], str | None]


def _opt(default: Any, kind: type | tuple[type, ...], check: Check | None = None) -> Any:
    meta = {"kind": kind, "check": check}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def _range(lo: float, hi: float) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        return None if lo <= v <= hi else f"must be between {lo} and {hi}"
    return check


def _network(v: Any) -> str | None:
    return None if NETWORK_RE.fullmatch(v) else f"must match {NETWORK_RE.pattern}"


def _level(v: Any) -> str | None:
    return None if v in LOG_LEVELS else f"must be one of {', '.join(LOG_LEVELS)}"


_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def _peer_id_ok(text: str) -> bool:
    """A base58 libp2p peer id: a sha2-256 multihash (Qm...) or an identity multihash
    of a small public key (12D3KooW... for Ed25519)."""
    n = 0
    for ch in text:
        i = _B58.find(ch)
        if i < 0:
            return False
        n = n * 58 + i
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    raw = b"\0" * (len(text) - len(text.lstrip("1"))) + raw
    if len(raw) == 34 and raw[:2] == b"\x12\x20":
        return True
    if not (6 <= len(raw) <= 44 and raw[0] == 0 and raw[1] == len(raw) - 2):
        return False
    key = raw[2:]  # a protobuf PublicKey: field 1 (type, varint), field 2 (key bytes)
    return key[0] == 0x08 and key[2] == 0x12 and key[3] == len(key) - 4


def parse_multiaddr(a: Any) -> list[tuple[str, str]]:
    """(protocol, value) pairs of a multiaddr string, or ValueError saying why not."""
    if not isinstance(a, str) or not a.startswith("/"):
        raise ValueError(f"not a multiaddr string like /ip4/1.2.3.4/tcp/4001: {a!r}")
    from multiaddr import Multiaddr  # light (no libp2p); parses and checks every part

    try:
        m = Multiaddr(a)
        return [(p.name, str(v or "")) for p, v in m.items()]
    except Exception as e:  # py-multiaddr raises several unrelated types
        why = str(e).split(" (", 1)[0][:160]
        raise ValueError(f"{a!r} is not a valid multiaddr ({why})") from None


def _listen(v: Any) -> str | None:
    for a in v:
        try:
            parts = parse_multiaddr(a)
        except ValueError as e:
            return str(e)
        names = [n for n, _ in parts]
        if names not in (["ip4", "tcp"], ["ip6", "tcp"]):
            return (f"{a!r} is not supported: listen on TCP over IPv4 or IPv6, like "
                    "/ip4/0.0.0.0/tcp/4001 or /ip6/::/tcp/4001")
    return None


def _announce(v: Any) -> str | None:
    for a in v:
        try:
            parts = parse_multiaddr(a)
        except ValueError as e:
            return str(e)
        names = [n for n, _ in parts if n != "p2p"]
        if len(names) != 2 or names[0] not in ("ip4", "ip6", "dns", "dns4", "dns6") \
                or names[1] != "tcp":
            return f"{a!r}: announce TCP addresses: /ip4|ip6|dns/HOST/tcp/PORT"
        if parts[0][1] in ("0.0.0.0", "::"):
            return f"{a!r}: an unspecified address cannot be dialed; announce a real one"
    return None


def _bootstrap(v: Any) -> str | None:
    for a in v:
        try:
            parts = parse_multiaddr(a)
        except ValueError as e:
            return str(e)
        if not parts or parts[-1][0] != "p2p":
            return f"{a!r} needs a /p2p/<peer id> suffix so the node can authenticate the peer"
        if not _peer_id_ok(parts[-1][1]):
            return f"{a!r}: {parts[-1][1]!r} is not a libp2p peer id"
        if parts[0][0] not in ("ip4", "ip6", "dns", "dns4", "dns6") or len(parts) < 3 \
                or parts[1][0] != "tcp":
            return f"{a!r}: bootstrap peers are dialed over TCP: /ip4|ip6|dns/HOST/tcp/PORT/p2p/ID"
    return None


@dataclass(frozen=True)
class NodeConfig:
    network: str = _opt("main", str, _network)
    # One default for every bidmesh command: $BIDMESH_DATA_DIR, else the XDG data dir.
    data_dir: Path = field(default_factory=paths.default_data_dir,
                           metadata={"kind": Path, "check": None})
    log_level: str = _opt("info", str, _level)
    log_file: str = _opt("node.log", str)  # relative to data_dir; "" disables the file
    # The log file is rotated at this size, keeping log_backups old files.
    log_max_bytes: int = _opt(16 * 1024 * 1024, int, _range(64 * 1024, 1 << 40))
    log_backups: int = _opt(3, int, _range(0, 100))
    status_interval_s: float = _opt(2.0, (int, float), _range(0.1, 3600))
    control_socket: bool = _opt(True, bool)
    stop_timeout_s: float = _opt(4.0, (int, float), _range(0.1, 60))
    # Events dated later than now + this are stored but held out of the market until
    # due (docs/PROTOCOL.md "Time"); every node of a network should use the same value.
    max_clock_skew_s: float = _opt(300.0, (int, float), _range(1, 86_400))
    # Restart from data_dir/market.snapshot instead of deriving the market from the
    # whole ledger (~4x less CPU; a restored process holds more RSS, docs/decisions.md).
    market_snapshot: bool = _opt(True, bool)
    # The ledger's SQLite page cache, MiB: part of the RSS (it fills as the ledger file
    # grows, then stays at this size). Larger makes ingest into a large ledger and
    # lookups of old events slightly cheaper (docs/operations.md "Sizing").
    ledger_cache_mib: int = _opt(8, int, _range(1, 4096))
    # Measure the CPU time of every event-loop step; status.loop_steps then lists the
    # longest step per second (node/loopstats.py). A diagnostic: costs ~1 us per step.
    loop_stats: bool = _opt(False, bool)


@dataclass(frozen=True)
class P2PConfig:
    listen: list[str] = _opt(["/ip4/0.0.0.0/tcp/4001"], list, _listen)
    bootstrap: list[str] = _opt([], list, _bootstrap)
    # Advertised instead of the listen addresses (NAT, containers), and in addition.
    announce: list[str] = _opt([], list, _announce)
    announce_append: list[str] = _opt([], list, _announce)
    max_connections: int = _opt(64, int, _range(1, 10_000))
    reconnect_min_s: float = _opt(1.0, (int, float), _range(0.05, 3600))
    reconnect_max_s: float = _opt(60.0, (int, float), _range(0.05, 86_400))
    mdns: bool = _opt(False, bool)


@dataclass(frozen=True)
class GossipConfig:
    batch_events: int = _opt(256, int, _range(1, 512))
    batch_ms: float = _opt(500.0, (int, float), _range(0, 10_000))
    max_batch_bytes: int = _opt(256 * 1024, int, _range(17 * 1024, 1000 * 1024))
    queue_high_water: int = _opt(16, int, _range(1, 31))
    mesh_degree: int = _opt(3, int, _range(1, 12))
    fault_threshold: int = _opt(20, int, _range(1, 1_000_000))
    fault_window_s: float = _opt(60.0, (int, float), _range(1, 86_400))
    block_s: float = _opt(600.0, (int, float), _range(1, 30 * 86_400))
    regossip_window_s: float = _opt(30.0, (int, float), _range(0, 86_400))
    # What we publish ourselves, paced below peers' default receive budgets
    # ([limits] gossip_peer_*: 1,000 events/s, 1 MiB/s, 4 s bursts), which fault a
    # peer whose own publishes exceed them (docs/decisions.md, replication budgets).
    publish_events_per_s: int = _opt(800, int, _range(1, 1_000_000))
    publish_bytes_per_s: int = _opt(800 * 1024, int, _range(64 * 1024, 1 << 30))
    publish_burst_s: float = _opt(2.0, (int, float), _range(0.1, 600))


@dataclass(frozen=True)
class SyncConfig:
    interval_s: float = _opt(5.0, (int, float), _range(0.05, 86_400))
    on_connect: bool = _opt(True, bool)
    request_timeout_s: float = _opt(10.0, (int, float), _range(0.1, 600))
    heads_page: int = _opt(512, int, _range(1, 1024))
    range_limit: int = _opt(256, int, _range(1, 512))
    range_bytes: int = _opt(512 * 1024, int, _range(16 * 1024 + 128, 1024 * 1024))
    # Local bounds of one session and of all of them (node/sync.py, node/sync_peers.py).
    slots: int = _opt(4, int, _range(1, 256))
    reserved_slots: int = _opt(1, int, _range(0, 255))  # kept from strangers; < slots
    # Strangers' sessions at once per subnet of their address (/24, /56): a stream of
    # fresh identities from one network holds at most this many (node/sync_peers.py).
    stranger_slots_per_subnet: int = _opt(2, int, _range(1, 256))
    session_s: float = _opt(300.0, (int, float), _range(1, 86_400))
    session_requests: int = _opt(10_000, int, _range(1, 10_000_000))
    stall_s: float = _opt(30.0, (int, float), _range(1, 86_400))
    idle_pages: int = _opt(16, int, _range(0, 1_000_000))
    penalty_s: float = _opt(60.0, (int, float), _range(1, 86_400))
    penalty_max_s: float = _opt(3600.0, (int, float), _range(1, 30 * 86_400))
    # Our own sessions: 2 reconciles (/sync/2, falling back to /sync/1 for a peer that
    # lacks it), 1 pages HEADS as before. Both protocols are always served.
    protocol: int = _opt(2, int, _range(1, 2))


def _cidrs(v: Any) -> str | None:
    for c in v:
        try:
            # A bool or int is an address to ipaddress (false is 0.0.0.0): strings only.
            if not isinstance(c, str):
                raise TypeError(c)
            ipaddress.ip_network(c, strict=False)
        except (TypeError, ValueError):
            return f"must be a list of CIDR strings like 127.0.0.0/8, got {c!r}"
    return None


@dataclass(frozen=True)
class LimitsConfig:
    """Resource manager limits (node/resources.py); p2p.max_connections is the node total."""

    outbound_reserved: int = _opt(16, int, _range(0, 10_000))
    trusted_reserved: int = _opt(8, int, _range(0, 10_000))
    conns_per_peer: int = _opt(2, int, _range(1, 16))
    conns_per_ip: int = _opt(8, int, _range(1, 10_000))
    conns_per_subnet: int = _opt(16, int, _range(1, 10_000))
    ipv6_prefix: int = _opt(56, int, _range(16, 128))
    ip_exempt: list[str] = _opt(["127.0.0.0/8", "::1/128"], list, _cidrs)
    streams_per_peer: int = _opt(64, int, _range(1, 100_000))
    streams_per_protocol: int = _opt(64, int, _range(2, 100_000))
    streams_per_peer_protocol: int = _opt(8, int, _range(1, 100_000))
    trusted_reserved_streams: int = _opt(16, int, _range(0, 100_000))
    requests_per_peer: int = _opt(16, int, _range(1, 100_000))
    conn_idle_s: float = _opt(120.0, (int, float), _range(1, 86_400))
    conn_grace_s: float = _opt(5.0, (int, float), _range(0.1, 86_400))
    idle_pressure: float = _opt(0.5, (int, float), _range(0, 1))
    stream_idle_s: float = _opt(60.0, (int, float), _range(1, 86_400))
    good_peers_max: int = _opt(1024, int, _range(1, 1_000_000))
    peerstore_max: int = _opt(512, int, _range(16, 900))
    # Replication budgets (node/budget.py, node/gossip.py, node/query.py, node/ledger.py;
    # docs/RELIABILITY.md section 5). Gossip per forwarding peer, bursts of gossip_burst_s
    # (a forwarder new to us starts with gossip_first_burst_s of it),
    # and per subnet of the peers' addresses (/24, /56; loopback included).
    gossip_peer_events_per_s: int = _opt(1000, int, _range(1, 1_000_000))
    gossip_peer_bytes_per_s: int = _opt(1 << 20, int, _range(64 * 1024, 1 << 30))
    gossip_burst_s: int = _opt(4, int, _range(1, 600))
    gossip_first_burst_s: int = _opt(2, int, _range(1, 600))
    gossip_subnet_events_per_s: int = _opt(4000, int, _range(1, 10_000_000))
    gossip_subnet_bytes_per_s: int = _opt(4 << 20, int, _range(64 * 1024, 1 << 32))
    # Received gossip events waiting to be checked and stored, all peers (node/ingest.py):
    # beyond it, batches of the peers holding more than an equal share are dropped.
    gossip_ingest_queue_events: int = _opt(8192, int, _range(512, 1 << 24))
    # SUBMIT records per requesting peer, per subnet (`submit_ip_*`: /24, IPv6 /56; all
    # addresses, loopback included) and for the whole node: rate per second and burst.
    submit_peer_per_s: int = _opt(50, int, _range(1, 1_000_000))
    submit_peer_burst: int = _opt(200, int, _range(16, 10_000_000))
    submit_ip_per_s: int = _opt(100, int, _range(1, 1_000_000))
    submit_ip_burst: int = _opt(200, int, _range(16, 10_000_000))
    submit_node_per_s: int = _opt(500, int, _range(1, 1_000_000))
    submit_node_burst: int = _opt(1000, int, _range(16, 10_000_000))
    # Pending buffer (events whose predecessor is missing): charged to the peer that
    # sent them, bounded per peer and in total, expiring after pending_ttl_s.
    pending_peer_bytes: int = _opt(4 << 20, int, _range(64 * 1024, 1 << 34))
    pending_peer_events: int = _opt(2048, int, _range(1, 1_000_000))
    pending_total_bytes: int = _opt(32 << 20, int, _range(64 * 1024, 1 << 36))
    pending_ttl_s: int = _opt(60, int, _range(1, 86_400))
    # Gap fetching: authors asked per round, requests per peer per second (bursts of
    # 4 s), and peers asked per gap before it is left to expire.
    gap_authors_per_round: int = _opt(64, int, _range(1, 100_000))
    gap_peer_requests_per_s: int = _opt(16, int, _range(1, 100_000))
    gap_tries: int = _opt(2, int, _range(1, 100))


def _offers(v: Any) -> str | None:
    for name, spec in v.items():
        if not re.fullmatch(SERVICE_RE, name):
            return f"service name {name!r} must match {SERVICE_RE}"
        if not isinstance(spec, dict) or set(spec) - {"price", "capacity"}:
            return f"{name}: must be a table with price and capacity"
        for k in ("price", "capacity"):
            x = spec.get(k, 0)
            if type(x) is not int or not 0 <= x < 1 << 40:
                return f"{name}.{k}: must be a non-negative integer"
    return None


def _services(v: Any) -> str | None:
    bad = [x for x in v if not isinstance(x, str) or not re.fullmatch(SERVICE_RE, x)]
    return f"not service names: {bad!r}" if bad else None


def _currency(v: Any) -> str | None:
    return None if re.fullmatch(r"[A-Z][A-Z0-9]{2,7}", v) else "must be like EUR or USD"


@dataclass(frozen=True)
class ProviderConfig:
    enabled: bool = _opt(False, bool)
    offers: dict[str, dict[str, int]] = _opt({}, dict, _offers)
    currency: str = _opt("EUR", str, _currency)
    bid_services: list[str] = _opt([], list, _services)
    rate_recipients: bool = _opt(True, bool)
    interval_s: float = _opt(0.5, (int, float), _range(0.05, 3600))
    note: str = _opt("", str, lambda v: None if len(v) <= 280 else "at most 280 characters")
    # Recipient policy (node/agent.py RecipientPolicy), on the payment record as of the
    # auction's start: skip rated recipients below this score (percent, 0 = none) ...
    min_recipient_score: float = _opt(0.0, (int, float), _range(0, 100))
    # ... bid on or skip recipients with no rating yet ...
    new_recipient: str = _opt("bid", str,
                              lambda v: None if v in ("bid", "skip") else "must be bid or skip")
    # ... and charge this much more to one rated unpaid or with a lease open unpaid.
    risk_premium_pct: int = _opt(0, int, _range(0, 1000))


def _exec(v: Any) -> str | None:
    for name, argv in v.items():
        if not re.fullmatch(SERVICE_RE, name) or not name.startswith("exec:"):
            return f"{name!r}: exec service names look like exec:NAME"
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            return f"{name}: must be a non-empty list of strings (the command's argv)"
    return None


@dataclass(frozen=True)
class DataplaneConfig:
    enabled: bool = _opt(True, bool)
    workers: int = _opt(0, int, _range(0, 256))
    exec: dict[str, list[str]] = _opt({}, dict, _exec)
    max_streams: int = _opt(64, int, _range(1, 100_000))
    window: int = _opt(16, int, _range(1, 4096))
    # Serving other providers' process requests (docs/dataplane.md §9): bytes of
    # requests and answers in flight per requesting peer and in all, sessions per peer.
    process_peer_bytes: int = _opt(16 << 20, int, _range(64 << 10, 1 << 34))
    process_total_bytes: int = _opt(64 << 20, int, _range(64 << 10, 1 << 36))
    process_sessions_per_peer: int = _opt(2, int, _range(1, 1024))
    # A lease's process requests may total max rate x window x this (+ 16 MiB).
    process_volume_factor: float = _opt(4.0, (int, float), _range(1, 1_000_000))
    served_max: int = _opt(256, int, _range(1, 1_000_000))  # per-requester stats kept
    served_ttl_s: float = _opt(3600.0, (int, float), _range(1, 30 * 86_400))
    # Hiring subcontractors (node/dataplane/contractors.py): unrated providers
    # "fallback" (only when no acceptable rated one can), "never" or "always"; rated
    # ones below this score (percent; 50 = neutral) never; offer addresses dialed only
    # when global, or admitted by an allow rule (CIDR [PORTS]; e.g. 127.0.0.0/8).
    contractor_unrated: str = _opt("fallback", str, lambda v: None if v in (
        "fallback", "never", "always") else "must be fallback, never or always")
    contractor_min_score: float = _opt(40.0, (int, float), _range(0, 100))
    contractor_addrs_allow: list[str] = _opt([], list, lambda v: _egress_rules(v))
    contractor_addrs_deny: list[str] = _opt([], list, lambda v: _egress_rules(v))


def _egress_rules(v: Any) -> str | None:
    from .dataplane.egress import parse_rule  # only when the file names rules
    from .errors import UsageError

    for rule in v:
        try:
            parse_rule(rule)
        except UsageError as e:
            return (f"{e} (rules are \"CIDR\" or \"CIDR PORTS\", like "
                    "\"10.0.0.0/8 80,443,8000-8100\")")
    return None


@dataclass(frozen=True)
class BandwidthConfig:
    """Tunnels of bandwidth leases (node/dataplane/tunnel.py; docs/dataplane.md §14),
    served when the provider offers `bandwidth`."""

    # Carry members' traffic at all (off: every tunnel is refused `egress_disabled`).
    egress: bool = _opt(True, bool)
    # Rules "CIDR" or "CIDR PORTS": deny first, then allow (which admits even the
    # loopback/private/own addresses refused by default), checked after resolution.
    allow: list[str] = _opt([], list, _egress_rules)
    deny: list[str] = _opt(["0.0.0.0/0 25", "::/0 25"], list, _egress_rules)
    max_tunnels: int = _opt(256, int, _range(1, 100_000))
    max_tunnels_per_lease: int = _opt(64, int, _range(1, 100_000))
    max_tunnels_per_member: int = _opt(16, int, _range(1, 100_000))
    max_streams_per_peer: int = _opt(64, int, _range(1, 100_000))
    open_timeout_s: float = _opt(10.0, (int, float), _range(0.1, 600))
    connect_timeout_s: float = _opt(10.0, (int, float), _range(0.1, 600))
    idle_timeout_s: float = _opt(300.0, (int, float), _range(1, 86_400))
    write_timeout_s: float = _opt(30.0, (int, float), _range(0.1, 3600))


@dataclass(frozen=True)
class HttpConfig:
    enabled: bool = _opt(False, bool)
    listen: str = _opt("127.0.0.1", str)
    port: int = _opt(8080, int, _range(0, 65535))
    max_connections: int = _opt(64, int, _range(1, 10_000))
    max_connections_per_ip: int = _opt(16, int, _range(1, 10_000))
    request_timeout_s: float = _opt(10.0, (int, float), _range(0.1, 600))
    keep_alive_s: float = _opt(5.0, (int, float), _range(0.1, 600))
    max_request_bytes: int = _opt(16 * 1024, int, _range(1024, 1 << 20))
    growth_interval_s: float = _opt(5.0, (int, float), _range(0.1, 3600))
    accept_per_s: float = _opt(50.0, (int, float), _range(0.1, 100_000))
    accept_burst: int = _opt(16, int, _range(1, 100_000))


@dataclass(frozen=True)
class Config:
    node: NodeConfig = field(default_factory=NodeConfig)
    p2p: P2PConfig = field(default_factory=P2PConfig)
    gossip: GossipConfig = field(default_factory=GossipConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    provider: ProviderConfig = field(default_factory=ProviderConfig)
    dataplane: DataplaneConfig = field(default_factory=DataplaneConfig)
    bandwidth: BandwidthConfig = field(default_factory=BandwidthConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    source: Path | None = None

    # Files in the data dir.
    @property
    def key_path(self) -> Path:
        return paths.key_path(self.node.data_dir)

    @property
    def ledger_path(self) -> Path:
        return paths.ledger_path(self.node.data_dir)

    @property
    def status_path(self) -> Path:
        return self.node.data_dir / "status.json"

    @property
    def control_path(self) -> Path:
        return self.node.data_dir / "control.sock"

    @property
    def log_path(self) -> Path | None:
        return self.node.data_dir / self.node.log_file if self.node.log_file else None


SECTIONS: dict[str, type[Any]] = {
    "node": NodeConfig, "p2p": P2PConfig, "gossip": GossipConfig, "sync": SyncConfig,
    "provider": ProviderConfig, "dataplane": DataplaneConfig, "http": HttpConfig,
    "limits": LimitsConfig, "bandwidth": BandwidthConfig,
}


_NAMES = {int: "an integer", float: "a number", bool: "a boolean", str: "a string",
          list: "a list", dict: "a table"}


def _value(key: str, raw: Any, f: dataclasses.Field[Any], base: Path) -> Any:
    kind = f.metadata["kind"]
    if kind is Path:
        if not isinstance(raw, str) or not raw or "\0" in raw:
            raise ConfigError(f"{key}: must be a non-empty path string, got {raw!r}")
        try:
            p = Path(raw).expanduser()
        except RuntimeError as e:  # "~user" of a user that does not exist
            raise ConfigError(f"{key}: cannot expand {raw!r}: {e}") from e
        return p if p.is_absolute() else (base / p)
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # bool is an int in Python; TOML keeps them apart and so do we.
    if isinstance(raw, bool) != (bool in kinds) or not isinstance(raw, kinds):
        names = " or ".join(_NAMES.get(k, k.__name__) for k in kinds if k is not int or
                            float not in kinds)
        raise ConfigError(f"{key}: must be {names}, got {type(raw).__name__} {raw!r}")
    check = f.metadata["check"]
    err = check(raw) if check else None
    if err:
        raise ConfigError(f"{key}: {err} (got {raw!r})")
    return float(raw) if float in kinds else raw


def from_dict(data: dict[str, Any], *, base: Path | None = None,
              source: Path | None = None) -> Config:
    base = base or Path.cwd()
    sections: dict[str, Any] = {}
    for name, table in data.items():
        cls = SECTIONS.get(name)
        if cls is None:
            raise ConfigError(f"unknown section [{name}]; known: {', '.join(SECTIONS)}")
        if not isinstance(table, dict):
            raise ConfigError(f"{name}: must be a table ([{name}])")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values = {}
        for key, raw in table.items():
            f = fields.get(key)
            if f is None:
                raise ConfigError(
                    f"unknown key {name}.{key}; known keys in [{name}]: {', '.join(fields)}")
            values[key] = _value(f"{name}.{key}", raw, f, base)
        sections[name] = cls(**values)
    cfg = Config(**sections, source=source)
    if cfg.p2p.reconnect_min_s > cfg.p2p.reconnect_max_s:
        raise ConfigError("p2p.reconnect_min_s: must not exceed p2p.reconnect_max_s")
    lim = cfg.limits
    if lim.outbound_reserved + lim.trusted_reserved >= cfg.p2p.max_connections:
        raise ConfigError("limits.outbound_reserved + limits.trusted_reserved: must be less "
                          "than p2p.max_connections (strangers need inbound slots)")
    if lim.trusted_reserved_streams >= lim.streams_per_protocol:
        raise ConfigError("limits.trusted_reserved_streams: must be less than "
                          "limits.streams_per_protocol")
    return cfg


def load(path: str | Path) -> Config:
    path = Path(path)
    try:
        text = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from e
    try:
        data = tomllib.loads(text.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from e
    except RecursionError:  # tomllib recurses once per nesting level
        raise ConfigError(f"{path}: nested too deeply to be a bidmesh config") from None
    try:
        return from_dict(data, base=path.resolve().parent, source=path)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e


def to_toml(cfg: Config) -> str:
    """Render a config (e.g. for tests and `bench/`); the inverse of `load`."""
    out = []
    for name in SECTIONS:
        sec = getattr(cfg, name)
        out.append(f"[{name}]")
        for f in dataclasses.fields(sec):
            out.append(f"{f.name} = {_toml_value(getattr(sec, f.name))}")
        out.append("")
    return "\n".join(out)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, Path):
        v = str(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot render {v!r} as TOML")


def _toml_key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else _toml_value(k)
