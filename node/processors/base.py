"""The processor API: `Processor`, `ProcessContext`, chains, output bounds and result
verification. Re-exported by `node.processors`; the built-ins (node/processors/
builtin.py) import it from here, so the package's registry can load them without an
import cycle.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from ..errors import ProcessingError, UsageError

log = logging.getLogger("node.processors")  # the package's logger, as before the split

_PARAM_TYPES = (bool, int, float, str, bytes)


@dataclass(frozen=True)
class ProcessContext:
    """What a processor may know about the segment it processes.

    `step` is the position of the service in the segment's chain: aes-gcm mixes it into
    its nonce so that a chain using the same key twice never reuses a nonce. `params`
    are provider-side settings (never taken raw from a client); values are scalars.
    """

    lease_id: bytes
    stream_id: bytes
    seq: int
    key: bytes | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    step: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.lease_id, bytes) or len(self.lease_id) != 32:
            raise UsageError("ProcessContext.lease_id must be 32 bytes (the lease event id)")
        if not isinstance(self.stream_id, bytes) or not 1 <= len(self.stream_id) <= 64:
            raise UsageError("ProcessContext.stream_id must be 1..64 bytes")
        if not isinstance(self.seq, int) or not 0 <= self.seq < 1 << 64:
            raise UsageError(f"ProcessContext.seq must be a u64, got {self.seq!r}")
        if self.key is not None and (not isinstance(self.key, bytes) or len(self.key) != 32):
            raise UsageError("ProcessContext.key must be 32 bytes (the per-lease key) or None")
        if not isinstance(self.step, int) or not 0 <= self.step < 1 << 16:
            raise UsageError(f"ProcessContext.step must be 0..65535, got {self.step!r}")
        for k, v in self.params.items():
            if not isinstance(k, str) or not isinstance(v, _PARAM_TYPES):
                raise UsageError(f"ProcessContext.params[{k!r}] must map str to a scalar")
        # A plain dict copy: picklable for worker processes and immune to later mutation.
        object.__setattr__(self, "params", dict(self.params))

    def at_step(self, step: int) -> ProcessContext:
        return ProcessContext(self.lease_id, self.stream_id, self.seq, self.key, self.params, step)


@runtime_checkable
class Processor(Protocol):
    """A processing service. Module-level and picklable; raise ProcessingError on failure."""

    @property
    def name(self) -> str: ...

    def process(self, data: bytes, ctx: ProcessContext) -> bytes: ...


class Bounded(Protocol):
    """Optional extra of a Processor: its declared expansion bound, the most bytes it
    outputs for `n` bytes of input. A requester reads no more than this from another
    provider's answer (docs/dataplane.md §9); without it, `default` applies."""

    def output_bound(self, n: int) -> int: ...


def output_bounds(processors: Mapping[str, Processor], services: Sequence[str], n: int,
                  default: int) -> list[int]:
    """The most bytes each service of a step may output for `n` input bytes, applying
    the services' `output_bound` in order (`default` for a service that declares none,
    unknown here, or whose bound fails); each bound is at most `default`."""
    out = []
    for name in services:
        bound = getattr(processors.get(name), "output_bound", None)
        try:
            b = int(bound(n)) if bound is not None else default
        except Exception:  # plugin code: an unusable bound falls back to the cap
            log.warning("processor %s: output_bound(%d) failed; using %d", name, n, default)
            b = default
        n = max(0, min(b, default))
        out.append(n)
    return out


class Verifier(Protocol):
    """Optional extra of a Processor: check another provider's result."""

    def verify(self, data: bytes, output: bytes, ctx: ProcessContext) -> None: ...


def run_chain(
    processors: Mapping[str, Processor],
    services: Sequence[str],
    data: bytes,
    ctx: ProcessContext,
) -> bytes:
    """Apply `services` in order; `ctx.step` is the chain position of the first one."""
    for i, name in enumerate(services):
        proc = processors.get(name)
        if proc is None:
            raise ProcessingError(f"no processor named {name!r} here; offer it or subcontract")
        data = proc.process(data, ctx.at_step(ctx.step + i))
    return data


def verify_result(
    processors: Mapping[str, Processor],
    service: str,
    data: bytes,
    output: bytes,
    ctx: ProcessContext,
) -> bool:
    """Check that `output` is a well-formed result of `service` on `data`.

    Used on results that come back from another provider. A processor may define
    `verify(data, output, ctx) -> None` (raise ProcessingError when the output is
    wrong); returns True when it did and the output passed, False when the service
    cannot be verified here (unknown, or no `verify`: e.g. `exec:*`), in which case the
    caller must take the result on trust. Any other exception from plugin code is
    reported as ProcessingError.
    """
    proc = processors.get(service)
    check = getattr(proc, "verify", None) if proc is not None else None
    if check is None:
        return False
    try:
        check(data, output, ctx)
    except ProcessingError:
        raise
    except Exception as e:  # third-party verify code: treat a crash as "does not verify"
        raise ProcessingError(f"{service}: verify failed: {type(e).__name__}: {e}") from e
    return True
