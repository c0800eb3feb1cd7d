# -*- test-case-name: tests.test_upstream -*-
"""
The upstream proxy: its URL, its credentials, and which hosts bypass it.

The pure part (this first half) reads C{[upstream] proxy} and C{no_proxy}
without I/O.  The password is secret configuration: it is kept out of
C{repr}, and no error message built here ever quotes the URL, because a
malformed URL is exactly when a password ends up where a host or port was
expected.
"""

from __future__ import annotations

import base64
import ipaddress
import re
from collections.abc import Iterable
from urllib.parse import unquote

from attrs import field, frozen

from gateway.message import bracketed
from gateway.policy import IPAddress, IPNetwork, normaliseNetwork, parseIP

__all__ = [
    "NoProxy",
    "NoProxyEntry",
    "ProxyURL",
    "UpstreamRule",
    "UpstreamRules",
    "parseNoProxy",
    "parseProxyURL",
    "parseUpstreamRules",
]

DEFAULT_PORTS = {"http": 80, "https": 443}

_HOSTNAME = re.compile(
    r"(?:[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\.)*"
    r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\.?"
)


@frozen
class ProxyURL:
    """
    An upstream proxy: http:// (plain) or https:// (TLS to the proxy itself).

    C{host} has no brackets, even for IPv6.  C{username}/C{password} are
    already percent-decoded.
    """

    scheme: str
    host: str
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    def authorization(self) -> bytes | None:
        """
        The Proxy-Authorization value for the upstream, or None without a
        user name.  UTF-8, as curl sends and RFC 7617's charset="UTF-8" asks.
        """
        if self.username is None:
            return None
        pair = f"{self.username}:{self.password or ''}".encode()
        return b"Basic " + base64.b64encode(pair)

    def redacted(self) -> str:
        """The URL for logs: the password, if any, shown as ***."""
        host = bracketed(self.host)
        user = ""
        if self.username is not None:
            user = self.username + (":***" if self.password is not None else "") + "@"
        return f"{self.scheme}://{user}{host}:{self.port}"


_HINT = "expected http://[user:password@]host[:port] or https://..."


def _parseHost(hostport: str) -> tuple[str, str | None]:
    """Split host[:port] / [v6][:port]; errors never quote the text."""
    if hostport.startswith("["):
        end = hostport.find("]")
        if end < 0:
            raise ValueError(f"invalid upstream proxy URL: unclosed '[' in the host ({_HINT})")
        host, rest = hostport[1:end], hostport[end + 1 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(
                "invalid upstream proxy URL: the bracketed host is not an IPv6 address"
            ) from None
        if rest and not rest.startswith(":"):
            raise ValueError(f"invalid upstream proxy URL: junk after the IPv6 host ({_HINT})")
        return host.lower(), rest[1:] if rest else None
    host, colon, port = hostport.partition(":")
    host = host.lower()
    if not host:
        raise ValueError(f"invalid upstream proxy URL: missing host ({_HINT})")
    if not _HOSTNAME.fullmatch(host):
        raise ValueError(
            "invalid upstream proxy URL: the host is not a valid name or address "
            "(percent-encode '@', ':' and '/' in the user name and password)"
        )
    return host.rstrip("."), port if colon else None


def parseProxyURL(text: str) -> ProxyURL:
    """
    Read C{[upstream] proxy}.  Without a port, http:// means 80 and https://
    443 (the URL defaults, as curl does).  Only http and https: SOCKS is not
    spoken.  No path, query or fragment: they would be silently ignored.
    """
    text = text.strip()
    match = re.fullmatch(r"([A-Za-z][A-Za-z0-9+.-]*)://(.*)", text, re.DOTALL)
    if match is None:
        raise ValueError(f"invalid upstream proxy URL: no scheme ({_HINT})")
    scheme, rest = match.group(1).lower(), match.group(2)
    if scheme not in DEFAULT_PORTS:
        raise ValueError(f"unsupported upstream proxy scheme {scheme!r}: use http:// or https://")
    if any(c.isspace() or not c.isprintable() for c in rest):
        raise ValueError("invalid upstream proxy URL: contains whitespace or control characters")
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    authority, tail = rest[:end], rest[end:]
    if tail not in ("", "/"):
        raise ValueError(
            "invalid upstream proxy URL: a path, query or fragment is not allowed "
            "(percent-encode '/', '?' and '#' in the user name and password)"
        )
    userinfo, at, hostport = authority.rpartition("@")
    username: str | None = None
    password: str | None = None
    if at:
        rawUser, colon, rawPassword = userinfo.partition(":")
        try:
            username = unquote(rawUser, errors="strict")
            password = unquote(rawPassword, errors="strict") if colon else None
        except UnicodeDecodeError:
            raise ValueError(
                "invalid upstream proxy URL: the user name or password is not percent-encoded UTF-8"
            ) from None
        if ":" in username:
            raise ValueError("invalid upstream proxy URL: the user name must not contain ':'")
        if not username and password is None:
            username = None
    host, portText = _parseHost(hostport)
    if portText is None or portText == "":
        port = DEFAULT_PORTS[scheme]
    elif portText.isascii() and portText.isdigit() and 1 <= int(portText) <= 65535:
        port = int(portText)
    else:
        raise ValueError(
            "invalid upstream proxy URL: the port is not a number in 1-65535 "
            "(percent-encode ':' in the password)"
        )
    return ProxyURL(scheme, host, port, username, password)


@frozen
class NoProxyEntry:
    """One no_proxy item: a domain (it and its subdomains) or a network, maybe one port."""

    domain: str | None = None
    network: IPNetwork | None = None
    port: int | None = None

    def matches(self, host: str, address: IPAddress | None, port: int) -> bool:
        if self.port is not None and self.port != port:
            return False
        if self.network is not None:
            return (
                address is not None
                and address.version == self.network.version
                and address in self.network
            )
        if address is not None or self.domain is None:
            return False
        return host == self.domain or host.endswith("." + self.domain)


@frozen
class NoProxy:
    """
    The hosts that go direct.  As curl and requests: "*" is everything,
    "example.com" and ".example.com" both mean the domain and its subdomains
    (never badexample.com), addresses and CIDRs match literal IP hosts only
    (no DNS is done to decide), and host:port limits an entry to one port.
    """

    entries: tuple[NoProxyEntry, ...] = ()
    matchAll: bool = False

    def matches(self, host: str, port: int) -> bool:
        if self.matchAll:
            return True
        if not self.entries:
            return False
        host, address = _normaliseHost(host)
        return any(entry.matches(host, address, port) for entry in self.entries)


def _normaliseHost(host: str) -> tuple[str, IPAddress | None]:
    """A destination as the entries compare it: lower case, no brackets, no final dot."""
    host = host.strip().lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    host = host.rstrip(".")
    return host, parseIP(host)


def _noProxyPort(text: str, item: str, kind: str) -> int:
    if not (text.isascii() and text.isdigit() and 1 <= int(text) <= 65535):
        raise ValueError(f"invalid {kind} {item!r}: bad port")
    return int(text)


def _noProxyAddress(text: str, item: str, port: int | None, kind: str) -> NoProxyEntry:
    if "/" in text:
        if port is not None:
            raise ValueError(f"invalid {kind} {item!r}: a network cannot have a port")
        address, _, prefix = text.partition("/")
        try:
            network = ipaddress.ip_network(f"{address}/{prefix}", strict=False)
        except ValueError:
            raise ValueError(f"invalid {kind} {item!r}: bad network") from None
        return NoProxyEntry(network=normaliseNetwork(network), port=port)
    address = parseIP(text)
    if address is None:
        raise ValueError(f"invalid {kind} {item!r}: bad IP address")
    return NoProxyEntry(network=ipaddress.ip_network(address), port=port)


def _parseNoProxyEntry(item: str, kind: str = "no_proxy entry") -> NoProxyEntry | None:
    """One entry; None for "*". C{kind} names what it is in error messages."""
    text = item.strip().lower()
    if text == "*":
        return None
    if "://" in text:
        raise ValueError(f"invalid {kind} {item!r}: a URL; write the host name only")
    port: int | None = None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"invalid {kind} {item!r}: unclosed '['")
        inner, rest = text[1:end], text[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"invalid {kind} {item!r}: junk after ']'")
            port = _noProxyPort(rest[1:], item, kind)
        return _noProxyAddress(inner, item, port, kind)
    if text.count(":") >= 2 or "/" in text:
        return _noProxyAddress(text, item, None, kind)
    if ":" in text:
        text, _, portText = text.partition(":")
        port = _noProxyPort(portText, item, kind)
    text = text.rstrip(".")
    if parseIP(text) is not None:
        return _noProxyAddress(text, item, port, kind)
    if text.startswith("*."):
        text = text[2:]
    elif text.startswith("."):
        text = text[1:]
    if not text or not _HOSTNAME.fullmatch(text):
        raise ValueError(f"invalid {kind} {item!r}: not a host, domain, IP or CIDR")
    return NoProxyEntry(domain=text, port=port)


def parseNoProxy(items: Iterable[str]) -> NoProxy:
    """
    Read no_proxy items; each item may itself be a comma or space separated
    list, so a NO_PROXY environment value can be pasted as is.
    """
    entries: list[NoProxyEntry] = []
    matchAll = False
    for item in items:
        for piece in re.split(r"[\s,]+", item.strip()):
            if not piece:
                continue
            entry = _parseNoProxyEntry(piece)
            if entry is None:
                matchAll = True
            else:
                entries.append(entry)
    return NoProxy(tuple(entries), matchAll)


@frozen
class UpstreamRule:
    """
    One line of C{[upstream] rules}: destinations matching C{pattern} (a no_proxy entry;
    None is "*", everything) go through C{target}, or direct when it is None.
    """

    pattern: NoProxyEntry | None
    target: ProxyURL | None


@frozen
class UpstreamRules:
    """
    The per-destination choice of upstream, tried before C{no_proxy} and C{proxy}: the
    first rule whose pattern matches decides. Patterns read as no_proxy entries do (names
    match names, no DNS is done; addresses and CIDRs match IP literals).
    """

    rules: tuple[UpstreamRule, ...] = ()

    def find(self, host: str, port: int) -> int | None:
        """The index of the first rule matching C{host}:C{port}, or None."""
        if not self.rules:
            return None
        name, address = _normaliseHost(host)
        for index, rule in enumerate(self.rules):
            if rule.pattern is None or rule.pattern.matches(name, address, port):
                return index
        return None


def parseUpstreamRules(lines: Iterable[str]) -> UpstreamRules:
    """
    Read C{[upstream] rules}: one C{PATTERN TARGET} per line, TARGET an upstream URL (as
    C{proxy}) or C{direct}. Errors name the rule by its number and never quote a URL.
    """
    rules: list[UpstreamRule] = []
    for line in lines:
        fields = line.split()
        if not fields:
            continue
        number = len(rules) + 1
        if len(fields) != 2:
            raise ValueError(
                f"rule {number}: expected 'PATTERN TARGET' (TARGET an upstream URL or 'direct'), "
                f"found {len(fields)} fields"
            )
        pattern, target = fields
        if "://" in pattern or "@" in pattern:
            # Never quoted: the fields may be swapped, and a URL may carry a password.
            raise ValueError(f"rule {number}: the pattern is a URL; write PATTERN, then TARGET")
        try:
            entry = _parseNoProxyEntry(pattern, kind="pattern")
            proxy = None if target.lower() == "direct" else parseProxyURL(target)
        except ValueError as e:
            raise ValueError(f"rule {number}: {e}") from None
        rules.append(UpstreamRule(entry, proxy))
    return UpstreamRules(tuple(rules))
