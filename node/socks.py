"""SOCKS5 (RFC 1928) server side, pure: parse a client's greeting and CONNECT request,
build replies. Only what `bidmesh client tunnel` serves: no authentication (method
0x00), CONNECT only, IPv4, IPv6 and domain-name destinations (names are passed on
unresolved: the provider resolves them, as `socks5h://` clients expect).

    need = greeting_size(buf)        # bytes the greeting needs, given what arrived
    methods = parse_greeting(buf)    # SocksError if malformed
    need = request_size(buf)
    req = parse_request(buf)         # SocksError with the reply code to send

The I/O shell (node/tunnel_proxy.py) reads exactly the sizes these name, so nothing a
client sends beyond its request is ever buffered here.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Final

from .dataplane.tunnel_wire import check_host
from .errors import InvalidMessage, Reason, SocksError

__all__ = [
    "ATYP_DOMAIN", "ATYP_IPV4", "ATYP_IPV6", "NO_ACCEPTABLE", "NO_AUTH", "REPLY_FOR_REASON",
    "SocksError", "SocksRequest", "greeting_size", "parse_greeting", "parse_request",
    "reply", "reply_code", "request_size",
]

VERSION: Final = 5
NO_AUTH: Final = 0x00
NO_ACCEPTABLE: Final = 0xFF
CMD_CONNECT: Final = 0x01
ATYP_IPV4: Final = 0x01
ATYP_DOMAIN: Final = 0x03
ATYP_IPV6: Final = 0x04

# Reply codes (RFC 1928 §6).
SUCCEEDED: Final = 0x00
GENERAL_FAILURE: Final = 0x01
NOT_ALLOWED: Final = 0x02
NETWORK_UNREACHABLE: Final = 0x03
HOST_UNREACHABLE: Final = 0x04
CONNECTION_REFUSED: Final = 0x05
TTL_EXPIRED: Final = 0x06
COMMAND_NOT_SUPPORTED: Final = 0x07
ATYP_NOT_SUPPORTED: Final = 0x08

# Tunnel refusal reasons (docs/dataplane.md §14) to the SOCKS reply a client shows.
REPLY_FOR_REASON: Final[dict[str, int]] = {
    Reason.NO_LEASE: NOT_ALLOWED, Reason.NOT_OUR_LEASE: NOT_ALLOWED,
    Reason.WRONG_SERVICE: NOT_ALLOWED, Reason.OUTSIDE_WINDOW: NOT_ALLOWED,
    Reason.NOT_MEMBER: NOT_ALLOWED, Reason.BAD_DELEGATION: NOT_ALLOWED,
    Reason.LEASE_CLOSED: NOT_ALLOWED, Reason.LEASE_ENDED: NOT_ALLOWED,
    Reason.UNAUTHORIZED: NOT_ALLOWED, Reason.EGRESS_DISABLED: NOT_ALLOWED,
    Reason.EGRESS_DENIED: NOT_ALLOWED, Reason.PRIVATE_DESTINATION: NOT_ALLOWED,
    Reason.CONNECTION_REFUSED: CONNECTION_REFUSED,
    Reason.RESOLVE_FAILED: HOST_UNREACHABLE, Reason.UNREACHABLE: HOST_UNREACHABLE,
    Reason.TIMEOUT: TTL_EXPIRED,
    Reason.PROVIDER_UNREACHABLE: NETWORK_UNREACHABLE,
}


def reply_code(reason: str) -> int:
    """The SOCKS reply for a tunnel refusal reason (general failure if unknown)."""
    return REPLY_FOR_REASON.get(reason, GENERAL_FAILURE)


@dataclass(frozen=True)
class SocksRequest:
    host: str  # an IP literal or a DNS name, as the client gave it
    port: int
    atyp: int


def greeting_size(buf: bytes) -> int:
    """Bytes the greeting takes: VER NMETHODS METHODS... (2 until NMETHODS is known;
    what arrived already when the version byte is wrong: no waiting for more)."""
    if buf[:1] not in (b"", bytes([VERSION])):
        return len(buf)
    return 2 if len(buf) < 2 else 2 + buf[1]


def parse_greeting(buf: bytes) -> frozenset[int]:
    """The methods the client offers; SocksError if this is not a SOCKS5 greeting."""
    if len(buf) < 2 or buf[0] != VERSION:
        raise SocksError(f"not a SOCKS5 greeting (version byte {buf[:1].hex() or 'none'})",
                         Reason.BAD_VERSION, None)
    if buf[1] == 0 or len(buf) != 2 + buf[1]:
        raise SocksError("a SOCKS5 greeting lists 1..255 methods", Reason.MALFORMED, None)
    return frozenset(buf[2:])


def request_size(buf: bytes) -> int:
    """Bytes the request takes: VER CMD RSV ATYP ADDR PORT (grows as fields arrive)."""
    if buf[:1] not in (b"", bytes([VERSION])):
        return len(buf)
    if len(buf) < 5:
        return 5  # up to the first address byte (a domain's length)
    atyp = buf[3]
    if atyp == ATYP_IPV4:
        return 4 + 4 + 2
    if atyp == ATYP_IPV6:
        return 4 + 16 + 2
    if atyp == ATYP_DOMAIN:
        return 4 + 1 + buf[4] + 2
    return 5  # unknown type: parse_request says so


def parse_request(buf: bytes) -> SocksRequest:
    """The CONNECT destination; SocksError with the reply code for anything else."""
    if len(buf) < 5 or buf[0] != VERSION:
        raise SocksError("not a SOCKS5 request", Reason.BAD_VERSION, GENERAL_FAILURE)
    cmd, atyp = buf[1], buf[3]
    if atyp not in (ATYP_IPV4, ATYP_IPV6, ATYP_DOMAIN):
        raise SocksError(f"address type {atyp} is not IPv4, IPv6 or a domain name",
                         Reason.BAD_ADDRESS_TYPE, ATYP_NOT_SUPPORTED)
    if len(buf) != request_size(buf):
        raise SocksError("SOCKS5 request of the wrong length", Reason.MALFORMED, GENERAL_FAILURE)
    if cmd != CMD_CONNECT:
        raise SocksError(f"command {cmd} is not supported (CONNECT only)",
                         Reason.BAD_COMMAND, COMMAND_NOT_SUPPORTED)
    port = int.from_bytes(buf[-2:], "big")
    if atyp == ATYP_IPV4:
        host = str(ipaddress.IPv4Address(buf[4:8]))
    elif atyp == ATYP_IPV6:
        host = str(ipaddress.IPv6Address(buf[4:20]))
    else:
        try:
            host = check_host(buf[5:-2].decode("ascii"))
        except (UnicodeDecodeError, InvalidMessage):
            raise SocksError("the destination is not a valid host name", Reason.BAD_HOST,
                             HOST_UNREACHABLE) from None
    if port == 0:
        raise SocksError("destination port 0", Reason.BAD_PORT, GENERAL_FAILURE)
    return SocksRequest(host, port, atyp)


def reply(code: int) -> bytes:
    """A reply with BND.ADDR 0.0.0.0:0 (the provider's side is not ours to tell)."""
    return bytes([VERSION, code, 0, ATYP_IPV4, 0, 0, 0, 0, 0, 0])
