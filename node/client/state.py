"""The client directory's state: the key file and `state.json` (network, own chain head,
the last signed event until a node confirmed it)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import UsageError
from .results import ChainHead

KEY_FILE = "client.key"
STATE_FILE = "state.json"


class ClientState:
    """`state.json` in the client dir: the network and our own chain head, plus the
    wire of our last signed event until a node confirmed it (so it is resent, never
    re-signed differently at the same seq)."""

    def __init__(self, path: Path, network: str) -> None:
        self.path = path
        self.network = network
        self.head = ChainHead()
        self.unconfirmed: list[bytes] = []
        if path.exists():
            self._load()

    def _load(self) -> None:
        try:
            d = json.loads(self.path.read_text())
            net = d["network"]
            h = d.get("head") or {}
            head = ChainHead(int(h.get("seq", 0)),
                             bytes.fromhex(h["id"]) if h.get("id") else None,
                             int(h.get("ts_ms", 0)))
            unconfirmed = [bytes.fromhex(w) for w in d.get("unconfirmed", [])]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UsageError(f"client state {self.path} is unreadable ({e}); move it away "
                             "and the client re-syncs its head from the nodes") from e
        if net != self.network:
            raise UsageError(f"client dir {self.path.parent} belongs to network {net!r}, not "
                             f"{self.network!r}; pass --network {net} or use another --dir")
        self.head, self.unconfirmed = head, unconfirmed

    def save(self) -> None:
        d = {"network": self.network,
             "head": {"seq": self.head.seq, "id": self.head.id.hex() if self.head.id else None,
                      "ts_ms": self.head.ts_ms},
             "unconfirmed": [w.hex() for w in self.unconfirmed]}
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, json.dumps(d, indent=1).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
