"""
Header rules for an intermediary: what is hop-by-hop, what the proxy adds, and the request
target forms it accepts. Pure functions over plain lists of (name, value) pairs.
"""

from __future__ import annotations

import ipaddress
import re
import time
from email.utils import formatdate

from ..message import bracketed, logURL
from ..policy import parseIP
from .parse import Headers, HTTPError, splitTokens

__all__ = [
    "HOP_BY_HOP",
    "Target",
    "bracketed",
    "connectionTokens",
    "httpDate",
    "parseAbsoluteTarget",
    "parseAuthority",
    "stripHopByHop",
]

# RFC 9110 §7.6.1 names these (and "not limited to"); Proxy-Authorization is consumed by
# this proxy and Proxy-Authenticate answers it, so neither ever crosses a hop.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authorization",
        b"proxy-authenticate",
    }
)
# The proxy frames every message itself; a client listing these in Connection must not make
# the proxy drop the framing or the Host it computes (Go CVE-2021-33197).
_PROTECTED = frozenset({b"host", b"content-length"})
# Back ends that read `_` as `-` (CGI/WSGI) would frame or route by these look-alikes
# (Transfer_Encoding, Content_Length): they are never forwarded, as nginx drops them.
_FRAMING = frozenset({b"host", b"content-length", b"transfer-encoding", b"connection"})
# What is dropped when Connection names nothing else (almost every message).
_DROP = HOP_BY_HOP | {b"content-length"}


def connectionTokens(headers: Headers) -> list[bytes]:
    """The lower-cased options of every Connection field."""
    return splitTokens([v for n, v in headers if n.lower() == b"connection"])


def stripHopByHop(
    headers: Headers,
    keep: frozenset[bytes] = frozenset(),
    tokens: list[bytes] | None = None,
    also: frozenset[bytes] = frozenset(),
) -> Headers:
    """
    Drop hop-by-hop fields and every field the Connection header names.

    The removal set is computed first and applied once (tinyproxy CVE-2023-49606 freed the
    list it was iterating when Connection named itself). Fields in C{keep} survive (the
    upgrade handshake keeps Upgrade and Connection for its own hop). Content-Length and
    framing fields are dropped too: the caller writes its own framing, and so are the
    names in C{also} (fields the caller rewrites, such as Host).
    """
    named = [
        t
        for t in (connectionTokens(headers) if tokens is None else tokens)
        if t not in _PROTECTED and t not in _DROP
    ]
    if named or keep:
        drop = (_DROP | also | frozenset(named)) - keep
        return [field for field in headers if not _dropped(field[0], drop)]
    # Almost always: the removal set depends on `also` only, so each spelling's verdict is
    # remembered and the fields are filtered by one lookup each.
    verdicts = _verdicts.get(also)
    if verdicts is None:
        verdicts = _verdicts[also] = {}
    try:
        return [field for field in headers if not verdicts[field[0]]]
    except KeyError:
        if len(verdicts) >= 4096:
            verdicts.clear()
        drop = _DROP | also
        for name, _ in headers:
            verdicts[name] = _dropped(name, drop)
        return [field for field in headers if not verdicts[field[0]]]


def _dropped(name: bytes, drop: frozenset[bytes]) -> bool:
    lower = name.lower()
    return lower in drop or (b"_" in name and lower.replace(b"_", b"-") in _FRAMING)


#: For each C{also}, whether a field spelled so is dropped when Connection names nothing
#: else (almost every message).
_verdicts: dict[frozenset[bytes], dict[bytes, bool]] = {}


class Target:
    """Where an absolute-form request goes, and what the origin sees as its target."""

    __slots__ = ("host", "hostHeader", "path", "port", "scheme")

    def __init__(self, scheme: str, host: str, port: int, path: bytes, hostHeader: bytes):
        self.scheme = scheme
        self.host = host  # no brackets for IPv6
        self.port = port
        self.path = path
        self.hostHeader = hostHeader

    def url(self) -> str:
        """The URL for logs (L{gateway.message.logURL})."""
        return logURL(self.scheme, self.hostHeader, self.path)


_DEFAULT_PORTS = {"http": 80, "https": 443}
_HOST = re.compile(rb"[A-Za-z0-9._\-]+")
_NUMERIC = re.compile(rb"[0-9]+|0[xX][0-9a-fA-F]*")


_authorities: dict[tuple[bytes, int | None], tuple[str, int]] = {}


def parseAuthority(authority: bytes, defaultPort: int | None) -> tuple[str, int]:
    """
    Split C{host[:port]} (IPv6 literals in brackets).

    Valid results are remembered (a proxy sees the same few authorities over and over, in
    the target and in Host); the memo is emptied when it grows past a few thousand.

    @raise HTTPError: 400 for an empty host, a bad or missing port, userinfo, or characters
        that have no business in a host name.
    """
    key = (authority, defaultPort)
    known = _authorities.get(key)
    if known is not None:
        return known
    result = _parseAuthority(authority, defaultPort)
    if len(_authorities) >= 4096:
        _authorities.clear()
    _authorities[key] = result
    return result


def _parseAuthority(authority: bytes, defaultPort: int | None) -> tuple[str, int]:
    if not authority or b"@" in authority:
        raise HTTPError(400, "invalid authority (no host, or userinfo)")
    if authority.startswith(b"["):
        close = authority.find(b"]")
        if close < 0:
            raise HTTPError(400, "unterminated IPv6 literal")
        host = authority[1:close]
        rest = authority[close + 1 :]
        # Brackets hold an IPv6 address and nothing else (RFC 3986 §3.2.2; no zone id, no
        # IPvFuture): `[dead.beef]` or `[::ffff:127.0.0..0.1]` must not reach the resolver
        # as a name, where IDNA encoding raises instead of failing the look-up.
        if not host or not all(c in b"0123456789abcdefABCDEF:." for c in host):
            raise HTTPError(400, "invalid IPv6 literal")
        try:
            ipaddress.IPv6Address(host.decode("ascii"))
        except ValueError:
            raise HTTPError(400, "invalid IPv6 literal") from None
        if rest and not rest.startswith(b":"):
            raise HTTPError(400, "junk after the IPv6 literal")
        portText = rest[1:] if rest else None
    else:
        host, sep, portText = authority.partition(b":")
        if not sep:
            portText = None
        if not host:
            raise HTTPError(400, "empty host")
        # letters, digits, '-', '.', '_' (seen in real internal names)
        if not _HOST.fullmatch(host):
            raise HTTPError(400, "invalid character in the host")
        # No name resolves with an empty or over-long label (`a..b`, `.a`, 64 characters),
        # and the resolver does not fail them cleanly (getaddrinfo's idna encoding raises).
        name = host[:-1] if host.endswith(b".") else host
        labels = name.split(b".")
        if len(name) > 253 or not all(0 < len(label) < 64 for label in labels):
            raise HTTPError(400, "invalid host name")
        # A name ending in a number is an IPv4 address to every URL parser (WHATWG "ends in
        # a number"), and no top-level domain is numeric: `1.2.3.999` is no name either.
        if _NUMERIC.fullmatch(labels[-1]) and parseIP(name.decode("ascii")) is None:
            raise HTTPError(400, "invalid IPv4 address")
    if portText is None or portText == b"":
        if defaultPort is None:
            raise HTTPError(400, "the target has no port")
        port = defaultPort
    else:
        if not portText.isdigit() or len(portText) > 5:
            raise HTTPError(400, "invalid port")
        port = int(portText)
        if not 0 < port < 65536:
            raise HTTPError(400, "port out of range")
    return host.decode("ascii").lower(), port


def parseAbsoluteTarget(target: bytes) -> Target:
    """
    Parse an absolute-form request target (RFC 9112 §3.2.2).

    Only C{http://} is forwarded in plain HTTP: other schemes (ftp, gopher, file, urn...)
    were the source of a string of Squid CVEs and have no place in an HTTP proxy. The path
    and query go to the origin byte for byte (RFC 9110 §7.7); an empty path becomes C{/}.
    """
    sep = target.find(b"://")
    if sep < 0:
        raise HTTPError(400, "the request target is not an absolute URI")
    scheme = target[:sep].lower()
    if scheme != b"http":
        raise HTTPError(400, f"unsupported URI scheme {scheme[:16].decode('ascii', 'replace')!r}")
    rest = target[sep + 3 :]
    slash = len(rest)
    for delim in (b"/", b"?"):
        i = rest.find(delim)
        if 0 <= i < slash:
            slash = i
    authority = rest[:slash]
    path = rest[slash:]
    if not path:
        path = b"/"
    elif path[:1] == b"?":
        path = b"/" + path
    host, port = parseAuthority(authority, 80)
    if port == 80:
        # The default port, written or left empty (`host:`), is omitted (RFC 3986 §6.2.3).
        hostHeader = (
            authority[: authority.rfind(b":")] if authority.endswith((b":80", b":")) else authority
        )
    else:
        hostHeader = authority
    return Target("http", host, port, path, hostHeader.lower())


_dateCache: tuple[int, bytes] = (0, b"")


def httpDate() -> bytes:
    """The current IMF-fixdate, formatted once per second (it is added to every response)."""
    global _dateCache
    now = int(time.time())
    if _dateCache[0] != now:
        _dateCache = (now, formatdate(now, usegmt=True).encode("ascii"))
    return _dateCache[1]
