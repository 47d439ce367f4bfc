"""Commands about a node of one's own: `keygen`, `run`, `devnet` (and `init`, in
node/cli/init.py). Each imports trio and libp2p only when it runs.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from .. import config, paths
from ..errors import UsageError
from ..keys import Identity, load_key, save_key
from ..output import Output
from .common import EXIT_OK, add_json_flag, peer_id


def register_keygen(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("keygen", help="create a node/client key file (Ed25519 seed, mode 0600)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--out", type=Path, help="key file to write")
    where.add_argument("--data-dir", type=Path,
                       help=f"write DIR/{paths.KEY_FILE} (default: {paths.default_data_dir()})")
    p.add_argument("--force", action="store_true", help="overwrite an existing key file")
    add_json_flag(p)
    p.set_defaults(func=cmd_keygen)


def cmd_keygen(args: argparse.Namespace, out: Output) -> int:
    path = args.out or paths.key_path(args.data_dir or paths.default_data_dir())
    if path.exists() and not args.force:
        raise UsageError(f"{path} already exists; pass --force to replace it (the old "
                         "identity and its reputation are lost)")
    ident = Identity.generate()
    save_key(path, ident, overwrite=args.force)
    ident = load_key(path)  # prove it reads back
    data: dict[str, Any] = {"key_file": str(path), "public_key": ident.public.hex()}
    peer = peer_id(ident.public)
    if peer is not None:
        data["peer_id"] = peer
    out.emit(data)
    return EXIT_OK


# ---------------------------------------------------------------- run (node/daemon.py)


def register_run(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("run", help="run a node daemon from a TOML config",
                       description="Run a bidmesh node until SIGTERM/SIGINT. Every option is "
                       "documented in config/node.example.toml.")
    add_run_args(p)
    p.set_defaults(func=_run)


def add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path,
                   help=f"node TOML config file (default: DATA_DIR/{paths.CONFIG_FILE} if it "
                        "exists, else the built-in defaults)")
    p.add_argument("--data-dir", type=Path,
                   help="state directory; overrides node.data_dir (default: "
                        f"${paths.DATA_DIR_ENV}, else {paths.default_data_dir()})")


def _run(args: argparse.Namespace, out: Output) -> int:
    from ..daemon import run_foreground  # imports trio and libp2p: only for this command

    run_foreground(load_run_config(args.config, args.data_dir))
    return EXIT_OK


def load_run_config(config_path: Path | None, data_dir: Path | None) -> config.Config:
    """`bidmesh run`'s config: --config FILE, else DATA_DIR/node.toml (what `bidmesh
    init` writes) when it exists, else the defaults; --data-dir overrides
    node.data_dir. DATA_DIR defaults to the one every bidmesh command uses."""
    if config_path is None:
        d = data_dir or paths.default_data_dir()
        path = paths.config_path(d)
        if path.exists():
            cfg = config.load(path)
        else:
            cfg, data_dir = config.Config(), d
    else:
        cfg = config.load(config_path)
    if data_dir is not None:
        cfg = dataclasses.replace(cfg, node=dataclasses.replace(cfg.node, data_dir=data_dir))
    return cfg


def register_devnet(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "devnet", help="run a local multi-node network through a full round",
        description="Start real provider nodes on loopback and play a narrated round: "
        "auctions (open, sealed, best value, group with a sponsor), award verification, a "
        "3-device stream with subcontracting, payments and ratings both ways; then a "
        "summary. Exits non-zero if any step fails. See docs/devnet.md.")
    p.add_argument("--providers", type=int, default=4, help="provider nodes (4-5, default 4)")
    p.add_argument("--dir", help="state directory (default: a new temporary directory)")
    p.add_argument("--keep", action="store_true",
                   help="leave the network running afterwards (Ctrl-C stops it)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON only")
    p.set_defaults(func=_devnet)


def _devnet(args: argparse.Namespace, out: Output) -> int:
    from ..devnet import cmd_devnet  # trio, libp2p and the light client: only when asked

    return cmd_devnet(args, out)


def register_init(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from .init import register

    register(sub)
