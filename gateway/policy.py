# -*- test-case-name: tests.test_policy -*-
"""
Who may use the proxy and where it may go: pure decisions, no I/O.

Everything here answers a yes/no question with a L{Decision} that says why, so
the protocol layer only has to map C{reason} to a status and a metric label and
put C{detail} in the log.  Nothing resolves names or touches sockets: the
caller checks the name before DNS (L{DestinationPolicy.checkName}) and then
every address it is about to dial (L{DestinationPolicy.checkAddress}), which is
what defeats DNS rebinding and the many spellings of 127.0.0.1.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from typing import Literal

from attrs import evolve, field, frozen

__all__ = [
    "ALLOWED",
    "SELF",
    "Decision",
    "DestinationPolicy",
    "HostPattern",
    "IPAddress",
    "IPNetwork",
    "TunnelPattern",
    "checkClient",
    "checkPort",
    "clientAllowed",
    "formatPortRanges",
    "normaliseNetwork",
    "parseHostPattern",
    "parseHostPatterns",
    "parseIP",
    "parsePortRanges",
    "parseTunnelPatterns",
    "portAllowed",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

Reason = Literal["client", "port", "destination"]


@frozen
class Decision:
    """
    The answer to "may this go ahead?".

    C{reason} is one of the fixed strings "client", "port" or "destination" so
    it can be a bounded metric label; C{detail} is the single human line for
    the log and the error page (never credentials, host names are escaped).
    """

    allowed: bool
    reason: Reason | None = None
    detail: str = ""


ALLOWED = Decision(True)


def _deny(reason: Reason, detail: str) -> Decision:
    return Decision(False, reason, detail)


# -- IP literals -------------------------------------------------------------------------------

_IPV4_PART = re.compile(r"0[xX][0-9a-fA-F]*|0[0-7]*|[1-9][0-9]*")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")


def _inetAtonPart(part: str) -> int | None:
    if not _IPV4_PART.fullmatch(part):
        return None
    if part[:2] in ("0x", "0X"):
        return int(part[2:] or "0", 16)
    if len(part) > 1 and part[0] == "0":
        return int(part, 8)
    return int(part)


def _parseLegacyIPv4(text: str) -> ipaddress.IPv4Address | None:
    """
    Read IPv4 the way C{inet_aton} (and so C{getaddrinfo}) does.

    One to four parts, each decimal, 0x-hex or 0-octal, the last one filling
    the remaining bytes: "127.1", "0x7f.1", "0177.0.0.1", "2130706433".  A
    policy that only knows dotted quads would wave these through to loopback.
    One trailing dot is allowed because URL parsers treat "127.0.0.1." as IPv4.
    """
    if text.endswith("."):
        text = text[:-1]
    parts = text.split(".")
    if not 1 <= len(parts) <= 4:
        return None
    values: list[int] = []
    for part in parts:
        value = _inetAtonPart(part)
        if value is None:
            return None
        values.append(value)
    *head, last = values
    if any(v > 0xFF for v in head) or last >= 1 << (8 * (4 - len(head))):
        return None
    number = last
    for index, value in enumerate(head):
        number |= value << (8 * (3 - index))
    return ipaddress.IPv4Address(number)


def _unmap(address: IPAddress) -> IPAddress:
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address.scope_id is not None:
            # The zone picks an interface, not a different host; policy is about hosts.
            return ipaddress.IPv6Address(int(address))
    return address


def parseIP(text: str) -> IPAddress | None:
    """
    The IP address C{text} denotes, or None when it is a name.

    Brackets are stripped, IPv4-mapped IPv6 (::ffff:127.0.0.1) becomes plain
    IPv4 and zone ids are dropped, so that one address has one spelling for
    every comparison made with it.
    """
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if not text or not text.isascii():
        return None
    if ":" in text:
        try:
            return _unmap(ipaddress.IPv6Address(text))
        except ValueError:
            return None
    return _parseLegacyIPv4(text)


def normaliseNetwork(network: IPNetwork) -> IPNetwork:
    """
    Rewrite an IPv4-mapped IPv6 network (::ffff:10.0.0.0/104) as IPv4.

    Addresses are unmapped by L{parseIP}, so a mapped network would otherwise
    never match anything.
    """
    if (
        isinstance(network, ipaddress.IPv6Network)
        and network.prefixlen >= 96
        and network.network_address.ipv4_mapped is not None
    ):
        return ipaddress.IPv4Network((network.network_address.ipv4_mapped, network.prefixlen - 96))
    return network


def _show(text: str, limit: int = 255) -> str:
    """Make a client-supplied host safe for one log line."""
    shown = "".join(c if c.isprintable() and c != " " else f"\\x{ord(c):02x}" for c in text)
    return shown if len(shown) <= limit else shown[:limit] + "..."


# -- host patterns -----------------------------------------------------------------------------

_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")

PatternKind = Literal["any", "exact", "suffix", "wildcard", "network", "self"]

#: The keyword of deny_destinations for every address of this host's own interfaces.
SELF = "self"


def _normaliseName(host: str) -> str:
    host = host.lower()
    if host.endswith("."):
        host = host[:-1]
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            pass
    return host


@frozen(repr=False)
class HostPattern:
    """
    One entry of allow_destinations, deny_destinations, intercept or passthrough.

    kinds: "any" (*), "exact" (example.com), "suffix" (.example.com: the name
    and its subdomains), "wildcard" (*.example.com: subdomains only, at any
    depth), "network" (a CIDR or a single address), "self" (the keyword
    C{self}: every address of this host's interfaces, which the policy learns
    with L{DestinationPolicy.withLocalNetworks}; it matches no name).  C{name} is lower-case
    ASCII without the leading "." or "*." and without a trailing dot.
    """

    kind: PatternKind
    name: str = ""
    network: IPNetwork | None = None

    def __str__(self) -> str:
        if self.kind == "any":
            return "*"
        if self.kind == "self":
            return SELF
        if self.kind == "suffix":
            return "." + self.name
        if self.kind == "wildcard":
            return "*." + self.name
        if self.kind == "network":
            assert self.network is not None
            if self.network.prefixlen == self.network.max_prefixlen:
                return str(self.network.network_address)
            return str(self.network)
        return self.name

    def __repr__(self) -> str:
        return f"HostPattern({str(self)!r})"

    def matchesName(self, host: str) -> bool:
        """Case-insensitive, one trailing dot ignored; network patterns never match names."""
        if self.kind == "any":
            return True
        if self.kind == "network" or self.kind == "self":
            return False
        host = _normaliseName(host)
        if self.kind == "exact":
            return host == self.name
        if self.kind == "wildcard":
            return host.endswith("." + self.name)
        return host == self.name or host.endswith("." + self.name)

    def matchesAddress(self, address: IPAddress) -> bool:
        """Only "network" and "any" patterns say anything about addresses."""
        if self.kind == "any":
            return True
        if self.kind != "network":
            return False
        assert self.network is not None
        return address.version == self.network.version and address in self.network


def _parseNetworkPattern(text: str, original: str) -> HostPattern:
    if "://" in text:
        raise ValueError(f"invalid host pattern {original!r}: a URL; write the host name only")
    match = re.fullmatch(r"\[([^\]]*)\](/.*)?", text)
    if match:
        text = match.group(1) + (match.group(2) or "")
    address, _, prefix = text.partition("/")
    if not re.fullmatch(r"[0-9]{1,3}", prefix):
        raise ValueError(f"invalid host pattern {original!r}: bad prefix length")
    try:
        network = ipaddress.ip_network(f"{address}/{prefix}", strict=True)
    except ValueError as e:
        try:
            loose = ipaddress.ip_network(f"{address}/{prefix}", strict=False)
        except ValueError:
            raise ValueError(f"invalid host pattern {original!r}: {e}") from None
        raise ValueError(
            f"invalid host pattern {original!r}: host bits set (did you mean {loose}?)"
        ) from None
    return HostPattern("network", network=normaliseNetwork(network))


def parseHostPattern(text: str) -> HostPattern:
    """
    Read one pattern; ValueError with one line naming it when it is not one.

    Anything that reads as an IP address in any spelling is an address, so a
    pattern can never be a name that clients would dial as an address.
    """
    original = text
    text = text.strip().lower()
    if not text:
        raise ValueError("invalid host pattern '': empty")
    if text == "*":
        return HostPattern("any")
    if text == SELF:
        return HostPattern("self")
    if "/" in text:
        return _parseNetworkPattern(text, original)
    address = parseIP(text)
    if address is not None:
        bits = 32 if address.version == 4 else 128
        return HostPattern("network", network=ipaddress.ip_network((address, bits)))
    if ":" in text or text.startswith("["):
        raise ValueError(
            f"invalid host pattern {original!r}: not an IP address, and ports are not allowed"
        )
    kind: PatternKind = "exact"
    if text.startswith("*."):
        kind, text = "wildcard", text[2:]
    elif text.startswith("."):
        kind, text = "suffix", text[1:]
    if text.endswith("."):
        text = text[:-1]
    if not text.isascii():
        try:
            text = text.encode("idna").decode("ascii")
        except UnicodeError:
            raise ValueError(f"invalid host pattern {original!r}: not a valid IDN") from None
    labels = text.split(".")
    for label in labels:
        if not label:
            raise ValueError(f"invalid host pattern {original!r}: empty label")
        if not _LABEL.fullmatch(label):
            raise ValueError(
                f"invalid host pattern {original!r}: bad label {label!r} (letters, digits, "
                "'-' and '_' only; '*' only as a leading '*.')"
            )
    if len(text) > 253:
        raise ValueError(f"invalid host pattern {original!r}: longer than 253 characters")
    if labels[-1].isdigit():
        raise ValueError(
            f"invalid host pattern {original!r}: not a valid IP address, and a name cannot "
            "end in an all-digit label"
        )
    return HostPattern(kind, name=text)


def parseHostPatterns(items: Iterable[str]) -> tuple[HostPattern, ...]:
    """Read patterns in order; duplicates are kept (harmless, and order shows in details)."""
    return tuple(parseHostPattern(item) for item in items)


@frozen(repr=False)
class TunnelPattern:
    """
    One entry of [mitm] intercept or passthrough: a host pattern, maybe limited to one port
    (C{host:port}, C{[v6]:port}, C{*:port}: any host on that port).
    """

    host: HostPattern
    port: int | None = None

    def __str__(self) -> str:
        if self.port is None:
            return str(self.host)
        shown = str(self.host)
        if ":" in shown:
            shown = f"[{shown}]"
        return f"{shown}:{self.port}"

    def __repr__(self) -> str:
        return f"TunnelPattern({str(self)!r})"

    def matches(self, host: str, port: int) -> bool:
        """Whether a CONNECT to C{host}:C{port} matches (a name, or an IP literal)."""
        if self.port is not None and self.port != port:
            return False
        if self.host.matchesName(host):
            return True
        address = parseIP(host)
        return address is not None and self.host.matchesAddress(address)


def parseTunnelPattern(text: str) -> TunnelPattern:
    """One intercept or passthrough entry; ValueError with one line naming it."""
    item = text.strip()
    host, port = item, None
    if item.startswith("["):
        end = item.find("]")
        if end >= 0 and item[end + 1 : end + 2] == ":":
            host, port = item[: end + 1], item[end + 2 :]
    elif item.count(":") == 1:
        host, port = item.split(":")
    if port is None:
        return TunnelPattern(parseHostPattern(item))
    if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        raise ValueError(f"invalid host pattern {text!r}: bad port {port!r}")
    return TunnelPattern(parseHostPattern(host), int(port))


def parseTunnelPatterns(items: Iterable[str]) -> tuple[TunnelPattern, ...]:
    return tuple(parseTunnelPattern(item) for item in items)


# -- clients and ports -------------------------------------------------------------------------


def clientAllowed(cidrs: Iterable[IPNetwork], peerHost: str) -> bool:
    """
    Is the peer inside one of C{cidrs}?

    A peer that is not an IP address (a UNIX socket) is not allowed: such
    listeners are guarded by file permissions, and the caller decides.
    """
    address = parseIP(peerHost)
    if address is None:
        return False
    return any(address.version == net.version and address in net for net in cidrs)


def checkClient(cidrs: Iterable[IPNetwork], peerHost: str) -> Decision:
    """L{clientAllowed} with the reason and the line to log."""
    if clientAllowed(cidrs, peerHost):
        return ALLOWED
    return _deny("client", f"client {_show(peerHost)} is not in allowed_client_cidrs")


def portAllowed(ranges: tuple[tuple[int, int], ...], port: int) -> bool:
    return any(low <= port <= high for low, high in ranges)


def formatPortRanges(ranges: Iterable[tuple[int, int]]) -> str:
    return " ".join(str(low) if low == high else f"{low}-{high}" for low, high in ranges)


def checkPort(ranges: tuple[tuple[int, int], ...], port: int) -> Decision:
    """L{portAllowed} with the reason and the line to log."""
    if portAllowed(ranges, port):
        return ALLOWED
    shown = formatPortRanges(ranges) or "nothing"
    return _deny("port", f"port {port} is not in connect_ports ({shown})")


def _parsePort(text: str, original: str) -> int:
    if not text.isdigit() or not text.isascii():
        raise ValueError(f"invalid port range {original!r}: {text!r} is not a port number")
    port = int(text)
    if not 1 <= port <= 65535:
        raise ValueError(f"invalid port range {original!r}: {port} is not in 1-65535")
    return port


def parsePortRanges(items: Iterable[str]) -> tuple[tuple[int, int], ...]:
    """
    Read "443", "1024-65535" items into inclusive (low, high) pairs.

    Port 0 is refused because nothing can be reached on it; a reversed range
    is refused rather than silently swapped, since it is more likely a typo.
    """
    ranges: list[tuple[int, int]] = []
    for item in items:
        low, dash, high = item.strip().partition("-")
        lowPort = _parsePort(low.strip(), item)
        highPort = _parsePort(high.strip(), item) if dash else lowPort
        if highPort < lowPort:
            raise ValueError(f"invalid port range {item!r}: reversed ({lowPort} > {highPort})")
        ranges.append((lowPort, highPort))
    return tuple(ranges)


# -- destinations ------------------------------------------------------------------------------

SelfAddress = tuple[str | None, int]


def _normaliseSelfAddress(item: SelfAddress) -> set[SelfAddress]:
    host, port = item
    if host is None or host in ("", "*"):
        return {(None, port)}
    if host.lower() == "localhost":
        return {("127.0.0.1", port), ("::1", port)}
    address = parseIP(host)
    if address is None:
        raise ValueError(f"self address {host!r} is not an IP address")
    if address.is_unspecified:
        return {(None, port)}
    return {(str(address), port)}


def _denyCandidates(address: IPAddress) -> tuple[IPAddress, ...]:
    """
    The address and what it stands for: a NAT64 address (64:ff9b::7f00:1) is
    translated to its embedded IPv4 by the network, and an IPv4-compatible one
    (::127.0.0.1, deprecated by RFC 4291 §2.5.5.1 but still accepted by parsers and
    by some stacks' tunnels) names the IPv4 inside, so deny rules see both. :: and
    ::1 are themselves (unspecified, loopback), not 0.0.0.0 and 0.0.0.1.
    """
    if isinstance(address, ipaddress.IPv6Address) and (
        address in _NAT64 or (address in _IPV4_COMPATIBLE and int(address) > 1)
    ):
        return (address, ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return (address,)


_CACHE_SIZE = 4096


def _remember(cache: dict, key: tuple, decision: Decision) -> None:
    if len(cache) >= _CACHE_SIZE:
        cache.clear()  # crude but bounded; a busy proxy refills the hot entries at once
    cache[key] = decision


@frozen
class DestinationPolicy:
    """
    allow_destinations / deny_destinations plus the proxy's own addresses.

    Rules, in order: the proxy's own listeners are always denied; then deny
    (a name pattern matching the host, or a network containing the dialled
    address) wins over allow; the unspecified addresses (0.0.0.0, ::) are
    always denied because dialling them reaches this host; then, when allow
    is not empty, the host must match a name pattern or the dialled address
    must be in an allow network.
    """

    allow: tuple[HostPattern, ...]
    deny: tuple[HostPattern, ...]
    selfAddresses: frozenset[SelfAddress] = field(default=frozenset())
    #: What the C{self} deny pattern covers: this host's interface addresses (read at
    #: start-up, L{gateway.interfaces.localNetworks}); loopback and the unspecified
    #: addresses whatever this holds.
    localNetworks: tuple[IPNetwork, ...] = ()
    # Decisions are pure functions of (host, [ip,] port) and this frozen value, and the
    # same few destinations come back on every request: remember them (bounded).
    _names: dict = field(factory=dict, init=False, eq=False, repr=False)
    _addresses: dict = field(factory=dict, init=False, eq=False, repr=False)

    def withSelfAddresses(self, addrs: Iterable[SelfAddress]) -> DestinationPolicy:
        """
        Add (ip, port) pairs this proxy listens on; None or an unspecified ip
        means a wildcard listener.  Added, not replaced, because listeners come
        up one at a time.
        """
        extra: set[SelfAddress] = set()
        for item in addrs:
            extra |= _normaliseSelfAddress(item)
        return evolve(self, selfAddresses=self.selfAddresses | extra)

    def withLocalNetworks(self, networks: Iterable[IPNetwork]) -> DestinationPolicy:
        """This policy with C{self} covering C{networks} (this host's interface addresses)."""
        return evolve(self, localNetworks=tuple(networks))

    def usesSelf(self) -> bool:
        """Whether deny_destinations holds the C{self} keyword (the caller reads addresses)."""
        return any(p.kind == "self" for p in self.deny)

    def _isLocal(self, address: IPAddress) -> bool:
        if address.is_loopback or address.is_unspecified:
            return True
        return any(address.version == net.version and address in net for net in self.localNetworks)

    def _allowNetworks(self) -> bool:
        return any(p.kind == "network" for p in self.allow)

    def checkName(self, host: str, port: int) -> Decision:
        """
        What can be decided before DNS.  An allowed result is provisional:
        the caller must still call L{checkAddress} for the address it dials.
        """
        key = (host, port)
        decision = self._names.get(key)
        if decision is None:
            decision = self._checkName(host, port)
            _remember(self._names, key, decision)
        return decision

    def _checkName(self, host: str, port: int) -> Decision:
        address = parseIP(host)
        if address is not None:
            return self.checkAddress(host, str(address), port)
        if not host:
            return _deny("destination", "destination host is empty")
        for pattern in self.deny:
            if pattern.matchesName(host):
                return _deny(
                    "destination",
                    f"destination {_show(host)} is denied by deny_destinations ({pattern})",
                )
        if (
            self.allow
            and not self._allowNetworks()
            and not any(p.matchesName(host) for p in self.allow)
        ):
            return _deny("destination", f"destination {_show(host)} is not in allow_destinations")
        return ALLOWED

    def _isSelf(self, address: IPAddress, port: int) -> bool:
        for selfHost, selfPort in self.selfAddresses:
            if selfPort != port:
                continue
            if selfHost is None:
                if address.is_loopback or address.is_unspecified:
                    return True
                continue
            selfAddress = parseIP(selfHost)
            if selfAddress is None:
                continue
            if address == selfAddress or (address.is_unspecified and selfAddress.is_loopback):
                return True
        return False

    def checkAddress(self, host: str, ip: str, port: int) -> Decision:
        """
        The final word, on the address actually about to be dialled.  C{host}
        is what the client asked for (name rules apply to it too, so this call
        alone gives the complete decision).
        """
        key = (host, ip, port)
        decision = self._addresses.get(key)
        if decision is None:
            decision = self._checkAddress(host, ip, port)
            _remember(self._addresses, key, decision)
        return decision

    def _checkAddress(self, host: str, ip: str, port: int) -> Decision:
        address = parseIP(ip)
        isName = parseIP(host) is None
        shown = _show(host) if host == ip else f"{_show(host)} ({_show(ip)})"
        if address is None:
            return _deny("destination", f"destination {shown}: {_show(ip)} is not an address")
        if any(self._isSelf(c, port) for c in _denyCandidates(address)):
            return _deny("destination", f"destination {shown} port {port} is this proxy itself")
        candidates = _denyCandidates(address)
        for pattern in self.deny:
            if (
                (isName and pattern.matchesName(host))
                or any(pattern.matchesAddress(c) for c in candidates)
                or (pattern.kind == "self" and any(self._isLocal(c) for c in candidates))
            ):
                return _deny(
                    "destination", f"destination {shown} is denied by deny_destinations ({pattern})"
                )
        if address.is_unspecified:
            return _deny(
                "destination",
                f"destination {shown} is an unspecified address, which reaches this host",
            )
        if self.allow and not any(
            (isName and p.matchesName(host)) or p.matchesAddress(address) for p in self.allow
        ):
            return _deny("destination", f"destination {shown} is not in allow_destinations")
        return ALLOWED
