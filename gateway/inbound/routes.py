# -*- test-case-name: tests.test_inbound_routes -*-
"""
Which route serves a request: the match syntax of C{[route NAME] match}, and the route
table that picks one route for a (Host, path) pair.

The rules, as a user of nginx or Traefik would expect them:

- A match is a path prefix (C{/rstudio/}), a host and a prefix
  (C{apps.example.com/rstudio/}) or a host alone (C{jupyter.example.com}, the same as
  C{jupyter.example.com/}).
- Routes that name the request's host are tried first, then routes without a host (nginx's
  server-then-location order: a host is the more specific half of a match). Among those,
  the longest prefix wins.
- Prefixes match whole path segments: C{/rstudio} serves C{/rstudio} and C{/rstudio/...},
  never C{/rstudiox}.
- A prefix written with its trailing slash (C{/rstudio/}) redirects the bare C{/rstudio} to
  C{/rstudio/} (nginx does this for C{location /rstudio/}, and Posit's docs configure it),
  so the app's relative links resolve under the prefix. Written without the slash
  (C{/api}), the bare path is forwarded as it is.
- Paths are matched (and forwarded) in one normal form, so that the spelling of a path
  cannot pick a route the path does not name: percent-encoded unreserved characters are
  decoded (C{/%61dmin} is C{/admin}), other escapes get upper-case hex, runs of slashes
  are merged, and dot segments (C{/a/../admin}, also encoded) are refused with 400:
  browsers resolve them before sending, so only a crafted request has them.
- Host names are compared without their port, in lower case, without a trailing dot.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Protocol

from attrs import frozen

from ..http1.parse import HTTPError
from ..policy import parseIP

__all__ = [
    "Match",
    "Redirect",
    "RouteTable",
    "Routed",
    "hostKey",
    "normalisePath",
    "parseMatch",
]


@frozen
class Match:
    """
    A parsed C{match} value.

    @ivar host: the host name or IP address (lower case, IPv6 without brackets), or None
        for a path-only match.
    @ivar prefix: the path prefix in normal form, without its trailing slash except for the
        root C{/}.
    @ivar slash: written with a trailing slash: the bare prefix redirects to the slash form.
    """

    host: str | None
    prefix: bytes
    slash: bool = False

    def __str__(self) -> str:
        host = self.host or ""
        if host and ":" in host:
            host = f"[{host}]"
        prefix = self.prefix.decode("ascii")
        if self.slash:
            prefix += "/"
        return host + ("" if host and prefix == "/" else prefix)

    @property
    def key(self) -> tuple[str | None, bytes]:
        """What two routes may not share: C{/a} and C{/a/} serve the same paths."""
        return (self.host, self.prefix)


# RFC 3986 unreserved characters: their escapes mean the character itself (§6.2.2.2).
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX = b"0123456789abcdefABCDEF"
_PATH_CHARS = re.compile(rb"/[A-Za-z0-9\-._~!$&'()*+,;=:@%/]*")
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")


def normalisePath(path: bytes) -> bytes:
    """
    The normal form of an origin-form path (no query): see the module docstring.

    @raise HTTPError: 400 for a malformed escape or a dot segment.
    """
    if b"%" not in path and b"//" not in path and b"/." not in path:
        return path  # almost every request
    if b"%" in path:
        out = bytearray()
        i, n = 0, len(path)
        while i < n:
            c = path[i]
            if c != 0x25:  # '%'
                out.append(c)
                i += 1
                continue
            pair = path[i + 1 : i + 3]
            if len(pair) != 2 or pair[0] not in _HEX or pair[1] not in _HEX:
                raise HTTPError(400, "malformed percent-encoding in the path")
            value = int(pair, 16)
            if value in _UNRESERVED:
                out.append(value)
            else:
                out += b"%" + pair.upper()
            i += 3
        path = bytes(out)
    while b"//" in path:
        path = path.replace(b"//", b"/")
    for segment in path.split(b"/"):
        if segment == b"." or segment == b"..":
            raise HTTPError(400, "dot segments ('.' or '..') in the path")
    return path


def _parseHost(text: str) -> str:
    if text.startswith("["):
        if not text.endswith("]"):
            raise ValueError(f"invalid host {text!r}: unterminated IPv6 literal")
        address = parseIP(text)
        if address is None or address.version != 6:
            raise ValueError(f"invalid host {text!r}: not an IPv6 address")
        return str(address)
    if "*" in text:
        raise ValueError(f"invalid host {text!r}: wildcards are not supported, name each host")
    if ":" in text:
        raise ValueError(
            f"invalid host {text!r}: leave out the port (a host matches on every port "
            "it is reached on)"
        )
    host = text.lower()
    if host.endswith("."):
        host = host[:-1]
    labels = host.split(".")
    if len(host) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise ValueError(f"invalid host {text!r}: letters, digits, '-', '_' and dots only")
    address = parseIP(host) if all(label.isdigit() for label in labels) else None
    return str(address) if address is not None else host


def parseMatch(text: str) -> Match:
    """
    Read a C{match} value: C{/prefix/}, C{host/prefix/} or C{host}.

    @raise ValueError: with a one-line problem.
    """
    text = text.strip()
    if not text:
        raise ValueError("a match is required: a path prefix (/app/), host/prefix or a host")
    if " " in text or "\t" in text:
        raise ValueError(f"invalid match {text!r}: one prefix or host, no spaces")
    if text.startswith("/"):
        host, rawPrefix = None, text
    else:
        if text.startswith("["):
            close = text.find("]")
            split = text.find("/", close if close > 0 else 0)
        else:
            split = text.find("/")
        hostText, rawPrefix = (text, "/") if split < 0 else (text[:split], text[split:])
        host = _parseHost(hostText)
    if "?" in rawPrefix or "#" in rawPrefix:
        raise ValueError(f"invalid match {text!r}: a prefix has no query or fragment")
    raw = rawPrefix.encode("ascii", "replace")
    if not _PATH_CHARS.fullmatch(raw):
        raise ValueError(f"invalid match {text!r}: the prefix has characters a path cannot have")
    try:
        prefix = normalisePath(raw)
    except HTTPError as e:
        raise ValueError(f"invalid match {text!r}: {e.reason}") from None
    slash = len(prefix) > 1 and prefix.endswith(b"/")
    if slash:
        prefix = prefix[:-1]
    return Match(host, prefix, slash)


def hostKey(authority: bytes) -> str:
    """
    The host a request names, as routes compare it: C{Host} (or C{:authority}) without its
    port, lower case, no trailing dot, IPv6 without brackets.
    """
    if authority.startswith(b"["):
        host = authority[1 : authority.find(b"]")]
    else:
        host = authority.rpartition(b":")[0] if b":" in authority else authority
    if host.endswith(b"."):
        host = host[:-1]
    return host.decode("ascii", "replace").lower()


class RouteLike(Protocol):
    """What the table needs of a route (L{gateway.config.RouteConfig} is one)."""

    match: Match
    strip_prefix: bool


class Routed:
    """
    A request matched to a route.

    @ivar route: the route.
    @ivar target: what the backend gets as its request target: the normal path, stripped of
        the prefix if the route says so, and the query.
    @ivar prefix: the public prefix the route matched (C{b""} for the root), for
        C{{prefix}} and the public URLs of rewrite_location.
    @ivar stripped: the prefix the backend does not see (the X-Forwarded-Prefix value), or
        None when nothing was stripped.
    @ivar publicTarget: the client's target in normal form, for C{{url}}.
    """

    __slots__ = ("prefix", "publicTarget", "route", "stripped", "target")

    def __init__(self, route, target: bytes, prefix: bytes, stripped: bytes | None, public: bytes):
        self.route = route
        self.target = target
        self.prefix = prefix
        self.stripped = stripped
        self.publicTarget = public

    def __repr__(self) -> str:
        return f"<Routed {self.target!r} prefix={self.prefix!r} stripped={self.stripped!r}>"


@frozen
class Redirect:
    """The bare prefix of a route written with a slash: send the client to the slash form."""

    location: bytes

    def status(self, method: bytes) -> int:
        """301 as nginx answers GET and HEAD; 308 keeps any other method and its body."""
        return 301 if method in (b"GET", b"HEAD") else 308


class RouteTable:
    """
    The routes of the configuration, indexed for one dictionary look-up per path segment.
    """

    def __init__(self, routes: Iterable[RouteLike]) -> None:
        self._byHost: dict[str, dict[bytes, RouteLike]] = {}
        self._anyHost: dict[bytes, RouteLike] = {}
        for route in routes:
            table = self._anyHost
            if route.match.host is not None:
                table = self._byHost.setdefault(route.match.host, {})
            if route.match.prefix in table:
                raise ValueError(f"two routes match {route.match}")
            table[route.match.prefix] = route

    def __len__(self) -> int:
        return len(self._anyHost) + sum(len(t) for t in self._byHost.values())

    def namesHost(self, host: str) -> bool:
        """
        Whether a route names C{host} (as L{hostKey} spells it): an absolute-form request
        to any other host is a forward-proxy request, which a gateway does not serve.
        """
        return host in self._byHost

    def match(self, authority: bytes, target: bytes) -> Routed | Redirect | None:
        """
        The route for a request to C{authority} (its Host) for the origin-form C{target}
        (path and query), a redirect to the slash form of a route's prefix, or None (404).

        @raise HTTPError: 400 for a path that has no normal form (see L{normalisePath}).
        """
        if target[:1] != b"/":
            return None  # "*" (OPTIONS to the server): no route serves it
        path, question, query = target.partition(b"?")
        path = normalisePath(path)
        tables = []
        if self._byHost:
            hosted = self._byHost.get(hostKey(authority))
            if hosted is not None:
                tables.append(hosted)
        tables.append(self._anyHost)
        for table in tables:
            if not table:
                continue
            candidate = path
            while True:
                route = table.get(candidate)
                if route is not None:
                    return self._routed(route, path, candidate, question + query)
                if candidate == b"/":
                    break
                candidate = candidate[: candidate.rfind(b"/")] or b"/"
        return None

    @staticmethod
    def _routed(route: RouteLike, path: bytes, prefix: bytes, query: bytes) -> Routed | Redirect:
        root = prefix == b"/"
        if not root and len(path) == len(prefix) and route.match.slash:
            return Redirect(prefix + b"/" + query)
        public = path + query
        publicPrefix = b"" if root else prefix
        if root or not route.strip_prefix:
            return Routed(route, public, publicPrefix, None, public)
        rest = path[len(prefix) :] or b"/"
        return Routed(route, rest + query, publicPrefix, prefix, public)
