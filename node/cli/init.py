"""`bidmesh init`: a new node's data dir with a commented config and a key.

    bidmesh init [--data-dir DIR] [--provider] [--network NET] [--listen MADDR]
    bidmesh run  [--data-dir DIR]          # reads DIR/node.toml

The config names only what a new operator decides first (network, addresses, peers,
provider offers); every other option keeps its default and is documented in
config/node.example.toml. An existing key is kept (it is the node's identity and its
reputation); an existing config is replaced only with --force.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .. import config, paths
from ..errors import UsageError
from ..keys import Identity, load_key, save_key
from ..output import Output

TEMPLATE = """\
# bidmesh node config, written by `bidmesh init`. Start the node with
#   bidmesh run --data-dir {data_dir_shown}
# Every option and its default: config/node.example.toml, docs/operations.md.
# Relative paths are resolved against this file's directory.

[node]
# Events are signed for one network; nodes of other networks ignore them.
network = "{network}"
# node.key, ledger.db, status.json, control.sock, node.lock and node.log live here.
data_dir = "."
# debug | info | warning | error (JSON lines on stderr and in node.log).
log_level = "info"

[p2p]
# TCP over IPv4/IPv6. 0.0.0.0 listens on every interface; peers are told the
# interface addresses (status.json shows them under advertised_addrs).
listen = [{listen}]
# Addresses to advertise instead (behind NAT, in a container: the address others
# reach), and addresses to advertise in addition to the listen addresses.
announce = []
announce_append = []
# Peers to keep connected: /ip4/ADDR/tcp/PORT/p2p/PEER_ID (`bidmesh ledger peers`
# on the other node shows its addresses).
bootstrap = []
{provider}"""

PROVIDER = """
[provider]
# Publish an offer, bid on requests for the offered services, rate recipients.
enabled = true
# service -> {{ price = minor units per hour of lease, capacity = KiB/s committed }}
offers = {{ bandwidth = {{ price = 40, capacity = 10000 }}, \
zstd = {{ price = 5, capacity = 50000 }} }}
currency = "EUR"
"""


def register(sub: Any) -> None:
    p = sub.add_parser("init", help="create a node data dir: a commented config and a key",
                       description="Write DATA_DIR/node.toml and DATA_DIR/node.key (an "
                       "existing key is kept). Then: bidmesh run --data-dir DATA_DIR.")
    p.add_argument("--data-dir", type=Path,
                   help=f"data directory (default: ${paths.DATA_DIR_ENV}, else "
                        f"{paths.default_data_dir()})")
    p.add_argument("--provider", action="store_true",
                   help="run the provider agent, with example offers to edit")
    p.add_argument("--network", default="main", help="network id (default main)")
    p.add_argument("--listen", action="append", metavar="MADDR",
                   help="listen multiaddr (repeatable; default /ip4/0.0.0.0/tcp/4001)")
    p.add_argument("--force", action="store_true", help="replace an existing node.toml")
    p.add_argument("--json", action="store_true", help="print JSON to stdout")
    p.set_defaults(func=cmd_init)


def cmd_init(args: argparse.Namespace, out: Output) -> int:
    data_dir: Path = (args.data_dir or paths.default_data_dir()).absolute()
    cfg_path = paths.config_path(data_dir)
    if cfg_path.exists() and not args.force:
        raise UsageError(f"{cfg_path} already exists; pass --force to replace it")
    listen = args.listen or ["/ip4/0.0.0.0/tcp/4001"]
    text = TEMPLATE.format(
        data_dir_shown=data_dir, network=args.network,
        listen=", ".join(config._toml_value(a) for a in listen),
        provider=PROVIDER.format() if args.provider else "")
    # Check what we are about to write exactly as `bidmesh run` will read it.
    import tomllib

    config.from_dict(tomllib.loads(text), base=data_dir, source=cfg_path)
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    key_path = paths.key_path(data_dir)
    created = not key_path.exists()
    if created:
        save_key(key_path, Identity.generate())
    ident = load_key(key_path)
    tmp = cfg_path.with_name(cfg_path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(cfg_path)
    from .common import peer_id

    data: dict[str, Any] = {"data_dir": str(data_dir), "config": str(cfg_path),
                            "key_file": str(key_path), "key_created": created,
                            "public_key": ident.public.hex(), "peer_id": peer_id(ident.public)}
    out.emit(data, "\n".join([
        f"wrote {cfg_path}",
        f"{'created' if created else 'kept existing'} key {key_path}",
        f"peer id {data['peer_id']}",
        f"start the node: bidmesh run --data-dir {data_dir}"]))
    return 0
