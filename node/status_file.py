"""`status.json` in a node's data dir: what a running node last said about itself.

The daemon rewrites it atomically every `node.status_interval_s` (and once more,
`"state": "stopped"`, on a clean stop); `bidmesh ledger peers|sync`, the client's
default node and the devnet read it without talking to the node.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from .errors import UsageError


def write_status(path: Path, status: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(status, default=str, indent=1))
    os.replace(tmp, path)


def read_status(data_dir: str | Path) -> dict[str, Any]:
    """The last status written by the node using `data_dir` (read-only)."""
    path = Path(data_dir) / "status.json"
    try:
        status: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"no status file at {path}: is a node running with this data dir?"
                         ) from None
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read {path}: {e}") from e
    age = time.time() - float(status.get("updated_at", 0))
    status["age_s"] = round(age, 1)
    if status.get("state") == "running" and not _pid_alive(int(status.get("pid", 0))):
        status["state"] = "dead"
    return status


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
