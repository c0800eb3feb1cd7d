# -*- test-case-name: tests.test_selfaddresses -*-
"""
The addresses of this host's own interfaces, for the C{self} keyword of
C{deny_destinations}: a destination that is any of them is this host, whatever the
interface (an origin on 10.0.0.5 of eth0 is as much "the proxy's own machine" as one on
127.0.0.1).

Read once at start-up (and again when the configuration is reloaded), without new
dependencies: on Linux from the kernel's own tables, C{/proc/net/fib_trie} (every IPv4
route of type LOCAL, secondary addresses included, which C{SIOCGIFADDR} would miss) and
C{/proc/net/if_inet6} (every IPv6 address); these are per network namespace, like the
interfaces. Elsewhere, what the host name resolves to. Loopback (127.0.0.0/8, ::1) and the
unspecified addresses are always included. An address added after start-up is not seen
until the next reload (the policy stays a pure function of what was read).
"""

from __future__ import annotations

import ipaddress
import socket

from .policy import IPNetwork

__all__ = ["ALWAYS", "localNetworks", "parseFibTrie", "parseIfInet6"]

#: This host whatever its interfaces: loopback and the unspecified addresses.
ALWAYS: tuple[IPNetwork, ...] = (
    ipaddress.IPv4Network("127.0.0.0/8"),
    ipaddress.IPv4Network("0.0.0.0/32"),
    ipaddress.IPv6Network("::1/128"),
    ipaddress.IPv6Network("::/128"),
)


def parseFibTrie(text: str) -> set[IPNetwork]:
    """
    The local IPv4 networks of a C{/proc/net/fib_trie}: each C{|-- ADDRESS} line followed
    by C{/N host LOCAL} (127.0.0.0 with /8: the whole loopback network is local).
    """
    found: set[IPNetwork] = set()
    address = None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("|-- "):
            address = stripped[4:].strip()
        elif address is not None and stripped.startswith("/") and stripped.endswith(" LOCAL"):
            prefix = stripped[1:].split(" ", 1)[0]
            try:
                found.add(ipaddress.IPv4Network(f"{address}/{prefix}", strict=False))
            except ValueError:
                pass
    return found


def parseIfInet6(text: str) -> set[IPNetwork]:
    """The IPv6 addresses of a C{/proc/net/if_inet6}: 32 hex digits first on each line."""
    found: set[IPNetwork] = set()
    for line in text.splitlines():
        fields = line.split()
        if not fields or len(fields[0]) != 32:
            continue
        try:
            found.add(ipaddress.IPv6Network((int(fields[0], 16), 128)))
        except ValueError:
            pass
    return found


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _resolvedAddresses() -> set[IPNetwork]:
    """Where there is no /proc: what this host's name resolves to (its configured addresses)."""
    found: set[IPNetwork] = set()
    try:
        infos = socket.getaddrinfo(socket.gethostname(), None, 0, socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return found
    for *_, sockaddr in infos:
        try:
            address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        except ValueError:
            continue
        found.add(ipaddress.ip_network(address))
    return found


def localNetworks(procNet: str = "/proc/net") -> tuple[IPNetwork, ...]:
    """Every address (as networks) of this host's interfaces, plus L{ALWAYS}; sorted."""
    found: set[IPNetwork] = set(ALWAYS)
    fibTrie = _read(f"{procNet}/fib_trie")
    inet6 = _read(f"{procNet}/if_inet6")
    if fibTrie is None and inet6 is None:
        found |= _resolvedAddresses()
    if fibTrie is not None:
        found |= parseFibTrie(fibTrie)
    if inet6 is not None:
        found |= parseIfInet6(inet6)
    return tuple(sorted(found, key=lambda n: (n.version, n)))
