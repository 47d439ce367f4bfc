"""The daemon's logs: one JSON object per line on stderr and in a size-rotated file.

`setup_logging(cfg)` is called once by `bidmesh run`; every other command keeps its
plain one-line errors (`node.cli.quiet_logging`).
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import sys
from typing import Any

from . import config

_STD_ATTRS = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, and every `extra=` field."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in vars(record).items():
            if k not in _STD_ATTRS and not k.startswith("_"):
                out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(cfg: config.Config) -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    fmt = JsonFormatter()
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if cfg.log_path is not None:
        # Rotated by size: a long-running node's log must not fill the disk.
        handlers.append(logging.handlers.RotatingFileHandler(
            cfg.log_path, maxBytes=cfg.node.log_max_bytes,
            backupCount=cfg.node.log_backups, encoding="utf-8"))
    for h in handlers:
        h.setFormatter(fmt)
        root.addHandler(h)
    level = getattr(logging, cfg.node.log_level.upper())
    root.setLevel(level)
    # py-libp2p logs routine peer churn at INFO/ERROR; keep it to warnings and up.
    logging.getLogger("libp2p").setLevel(max(level, logging.WARNING))
    if level > logging.DEBUG:
        logging.getLogger("libp2p").setLevel(logging.CRITICAL)
