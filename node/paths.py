"""Where a node keeps its files inside a data directory. One place, so the CLI, the
daemon and the tests agree.

    DIR/node.key    the identity seed (mode 0600; see keys.py)
    DIR/ledger.db   the SQLite ledger (plus ledger.db-wal / ledger.db-shm while open)
    DIR/node.toml   the node config `bidmesh init` writes and `bidmesh run` reads by default
    DIR/node.lock   held by the running node (node/lifecycle.py)
    DIR/client/     `bidmesh client`'s default --dir (the recipient's key and state)
"""

from __future__ import annotations

import os
from pathlib import Path

KEY_FILE = "node.key"
CONFIG_FILE = "node.toml"  # written by `bidmesh init`, read by `bidmesh run` by default
LEDGER_FILE = "ledger.db"
DATA_DIR_ENV = "BIDMESH_DATA_DIR"
CLIENT_DIR = "client"


def default_data_dir() -> Path:
    """$BIDMESH_DATA_DIR, else $XDG_DATA_HOME/bidmesh, else ~/.local/share/bidmesh."""
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "share"
    return base / "bidmesh"


def key_path(data_dir: str | Path) -> Path:
    return Path(data_dir) / KEY_FILE


def ledger_path(data_dir: str | Path) -> Path:
    return Path(data_dir) / LEDGER_FILE


def config_path(data_dir: str | Path) -> Path:
    return Path(data_dir) / CONFIG_FILE


def client_dir(data_dir: str | Path | None = None) -> Path:
    """`bidmesh client`'s directory when --dir is not given: DATA_DIR/client."""
    return Path(data_dir or default_data_dir()) / CLIENT_DIR
