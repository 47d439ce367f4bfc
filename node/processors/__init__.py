"""Processing services: the `Processor` protocol, its context, and the plugin registry.

A processor turns one segment's bytes into its result. It must be a module-level,
picklable object (an instance of a top-level class) because the dataplane runs it in a
worker process (`node.processors.pool`). It must be deterministic: the same input and
context give the same bytes, or results cannot be verified against a local reference.

Plugins register under the entry-point group `bidmesh.processors`; the entry point names
either a class (instantiated with no arguments) or a ready instance. `exec:*` processors
come only from the provider's own config, never from a client.

This package is pure (no trio); the pool lives in `node.processors.pool`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from importlib import metadata
from types import MappingProxyType

from .base import (
    Bounded,
    ProcessContext,
    Processor,
    Verifier,
    output_bounds,
    run_chain,
    verify_result,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "Bounded",
    "ProcessContext",
    "Processor",
    "Verifier",
    "load_processors",
    "output_bounds",
    "run_chain",
    "verify_result",
]

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "bidmesh.processors"
_NO_EXEC: Mapping[str, Sequence[str]] = MappingProxyType({})


def load_processors(extra_exec: Mapping[str, Sequence[str]] = _NO_EXEC) -> dict[str, Processor]:
    """Builtins, then entry-point plugins, then the provider's `exec:*` commands.

    A plugin that fails to load, is not a Processor, or reuses a taken name is skipped
    with a warning: one broken package must not take the node down.
    """
    from . import builtin

    procs: dict[str, Processor] = {p.name: p for p in builtin.BUILTINS}
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
            proc = obj() if isinstance(obj, type) else obj
        except Exception as e:  # any import/constructor error of third-party code
            log.warning("skipping processor plugin %r (%s): %s: %s", ep.name, ep.value,
                        type(e).__name__, e)
            continue
        if not isinstance(proc, Processor) or proc.name != ep.name:
            log.warning("skipping processor plugin %r (%s): not a Processor named %r",
                        ep.name, ep.value, ep.name)
            continue
        if ep.name in procs:
            if type(procs[ep.name]) is not type(proc):
                log.warning("skipping processor plugin %r (%s): name already taken",
                            ep.name, ep.value)
            continue
        procs[ep.name] = proc
    for name, argv in extra_exec.items():
        procs[name] = builtin.Exec(name, tuple(argv))
    return procs
