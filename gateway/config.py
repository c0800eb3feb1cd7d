# -*- test-case-name: tests.test_config -*-
"""
The INI file, read into frozen values, or refused with one line that says where.

A proxy that starts with a typo in its configuration is a proxy that is open,
or closed, in a way nobody asked for; so every unknown section or key and
every bad value stops start-up with a L{ConfigError} naming the file, the
section and the key.  The defaults live in one table (L{SCHEMA}) and go
through the same parsers as the file's values, so L{defaultConfig} cannot
drift from what a file with every key at its default would give.

Only L{loadConfig} reads files; L{parseConfig} works on text (it does build
each listen endpoint, which for C{ssl:} reads the certificate and key it
names, because that is the only complete validation of an endpoint string).
"""

from __future__ import annotations

import configparser
import difflib
import ipaddress
import math
import os
import re
import socket
from collections.abc import Callable, Iterable
from typing import Any

from attrs import field, frozen

from gateway import policy, upstream
from gateway.inbound import balance, rewrite, routes

__all__ = [
    "ROUTE_SCHEMA",
    "SCHEMA",
    "AuthConfig",
    "Config",
    "ConfigError",
    "LogConfig",
    "MetricsConfig",
    "MitmConfig",
    "ProxyConfig",
    "ReverseConfig",
    "RouteConfig",
    "UpstreamConfig",
    "cgroupCPULimit",
    "cpuCount",
    "defaultConfig",
    "endpointAddress",
    "innerEndpoint",
    "loadConfig",
    "parseConfig",
    "refuseOpenProxy",
    "serverEndpoint",
]

SelfAddress = tuple[str | None, int]


class ConfigError(Exception):
    """
    A configuration that must not start.  C{str(e)} is one line:
    "<file>: [section] key: problem", "<file>: [section]: problem" or
    "<file>: problem", and never contains a password.
    """


@frozen
class ProxyConfig:
    listen: tuple[str, ...]
    allowed_client_cidrs: tuple[policy.IPNetwork, ...]
    connect_ports: tuple[tuple[int, int], ...]
    allow_destinations: tuple[policy.HostPattern, ...]
    deny_destinations: tuple[policy.HostPattern, ...]
    via: str
    forwarded_for: bool
    connect_timeout: float
    header_timeout: float
    idle_timeout: float
    max_header_size: int
    max_connections: int
    workers: int = 1
    #: Seconds a stopping proxy lets requests in flight finish and tunnels run.
    drain_grace: float = 10.0
    #: ftp:// through the proxy (GET and HEAD), and the ports it may reach.
    ftp: bool = True
    ftp_ports: tuple[tuple[int, int], ...] = ((21, 21), (1024, 65535))
    ftp_data_ports: tuple[tuple[int, int], ...] = ((1024, 65535),)


@frozen
class AuthConfig:
    htpasswd: str | None
    realm: str


@frozen
class UpstreamConfig:
    proxy: upstream.ProxyURL | None
    no_proxy: upstream.NoProxy
    ca_certificate: str | None
    verify: bool
    rules: upstream.UpstreamRules = field(factory=upstream.UpstreamRules)


@frozen
class MitmConfig:
    enabled: bool
    ca_cert: str
    ca_key: str
    intercept: tuple[policy.TunnelPattern, ...]
    passthrough: tuple[policy.TunnelPattern, ...]
    upstream_ca_bundle: str | None
    verify_upstream: bool
    #: (DNS domains, IP networks) a CA proxygate creates is constrained to; None: none.
    name_constraints: tuple[tuple[str, ...], tuple[policy.IPNetwork, ...]] | None = None
    http2: bool = True
    http2_max_streams: int = 100


@frozen
class MetricsConfig:
    listen: tuple[str, ...]
    path: str


@frozen
class LogConfig:
    access_log: str | None
    format: str


@frozen
class ReverseConfig:
    listen: tuple[str, ...]
    allowed_client_cidrs: tuple[policy.IPNetwork, ...]
    http2: bool
    sticky_secret: str | None = field(repr=False)  # a key: never in a log line


@frozen
class RouteConfig:
    """One C{[route NAME]} section; C{name} is its metrics and log label."""

    name: str
    match: routes.Match
    backends: tuple[balance.BackendURL, ...]
    strip_prefix: bool
    balance: str
    health_check: str | None
    health_interval: float
    max_body_size: int  # 0: unlimited
    timeout: float
    auth: bool
    user_header: str | None
    request_headers: tuple[rewrite.HeaderTemplate, ...]
    rewrite_location: bool
    ca_bundle: str | None


@frozen
class Config:
    proxy: ProxyConfig
    auth: AuthConfig
    upstream: UpstreamConfig
    mitm: MitmConfig
    metrics: MetricsConfig
    log: LogConfig
    reverse: ReverseConfig
    routes: tuple[RouteConfig, ...]
    path: str | None
    #: The command-line overrides (section, key) -> raw value this configuration was read
    #: with, so a reload of the file applies them again. Hidden from repr: a value may be
    #: an upstream URL with its password.
    overrides: tuple[tuple[tuple[str, str], str], ...] = field(default=(), repr=False, eq=False)

    def usesTLS(self) -> bool:
        """
        Whether this configuration makes TLS contexts: ssl: listeners, interception, an
        https:// upstream proxy (what the TLS groups of L{gateway.tls.groups} apply to).
        """
        listeners = any(
            d.strip().removeprefix("haproxy:").startswith("ssl:") for d in self.proxy.listen
        )
        upstreamTLS = self.upstream.proxy is not None and self.upstream.proxy.scheme == "https"
        return listeners or self.mitm.enabled or upstreamTLS

    def selfAddresses(self) -> frozenset[SelfAddress]:
        """
        The (interface, port) pairs of the proxy and metrics listeners, for
        L{policy.DestinationPolicy.withSelfAddresses}; interface None means
        every interface.  Port 0 listeners are left out: only the bound port
        (C{IListeningPort.getHost()}) is known, so the service adds those.
        """
        found: set[SelfAddress] = set()
        for description in self.proxy.listen + self.metrics.listen:
            address = endpointAddress(description)
            if address is not None and address[1] != 0:
                found.add(address)
        return frozenset(found)


# -- endpoint strings --------------------------------------------------------------------------

#: The prefix of listeners behind a load balancer that sends the PROXY protocol header
#: (L{gateway.proxyprotocol}): C{haproxy:tcp:3128:interface=0.0.0.0}.
PROXIED = "haproxy:"


def innerEndpoint(description: str) -> str:
    """The listener under a C{haproxy:} prefix (the description itself without one)."""
    if description[: len(PROXIED)].lower() == PROXIED:
        return description[len(PROXIED) :]
    return description


def endpointParts(description: str) -> tuple[str, list[str], dict[str, str]]:
    """Split an endpoint string as Twisted does: ':' between fields, key=value, '\\' escapes."""
    fields: list[list[str]] = [[""]]
    chars = iter(description)
    afterEquals = False
    for char in chars:
        if char == "\\":
            fields[-1][-1] += next(chars, "")
        elif char == ":":
            fields.append([""])
            afterEquals = False
        elif char == "=" and not afterEquals:
            fields[-1].append("")
            afterEquals = True
        else:
            fields[-1][-1] += char
    kind = fields[0][0] if len(fields[0]) == 1 else ""
    args = [f[0] for f in fields[1:] if len(f) == 1]
    kwargs = {f[0]: f[1] for f in fields[1:] if len(f) == 2}
    return kind, args, kwargs


_NETWORK_ENDPOINTS = {
    # kind: (index of the positional port, default port, default interface)
    "tcp": (0, None, ""),
    "tcp6": (0, None, "::"),
    "ssl": (0, None, ""),
    "tls": (1, "443", "::"),
}


def _endpointBinding(description: str) -> tuple[str, str | None] | None:
    """(interface, port text) of a TCP-based server endpoint, None for other kinds."""
    kind, args, kwargs = endpointParts(innerEndpoint(description))
    if kind not in _NETWORK_ENDPOINTS:
        return None
    index, defaultPort, defaultInterface = _NETWORK_ENDPOINTS[kind]
    port = kwargs.get("port", args[index] if len(args) > index else defaultPort)
    return kwargs.get("interface", defaultInterface), port


def endpointAddress(description: str) -> SelfAddress | None:
    """
    The (interface, port) a tcp:, tcp6:, ssl: or tls: server endpoint binds,
    interface None when it is every interface; None for any other kind
    (unix:, systemd:, plugins) or a string that does not say.
    """
    binding = _endpointBinding(description)
    if binding is None or binding[1] is None or not binding[1].isdigit():
        return None
    interface, port = binding
    address = policy.parseIP(interface)
    if not interface or (address is not None and address.is_unspecified):
        return (None, int(port))
    return (str(address) if address is not None else interface, int(port))


def _isLocalOnly(description: str) -> bool:
    """
    Can only this machine connect?  unix: sockets and loopback binds can;
    wildcard or other binds, and endpoint kinds we cannot see into, count as
    reachable from the network.
    """
    kind = endpointParts(innerEndpoint(description))[0]
    if kind == "unix":
        return True
    binding = _endpointBinding(description)
    if binding is None:
        return False
    interface = binding[0]
    if interface.lower() == "localhost":
        return True
    address = policy.parseIP(interface)
    return address is not None and address.is_loopback


def serverEndpoint(reactor, description: str, wrapProxied=None, alpn: tuple[str, ...] = ()):
    """
    The server endpoint for C{description}: Twisted's C{serverFromString}, except C{ssl:},
    which is proxygate's own (L{gateway.tls.listener}: the standard library's TLS, no
    pyOpenSSL), and C{haproxy:}, proxygate's own too (L{gateway.proxyprotocol}: the PROXY
    header's client is the peer from the first request on). C{wrapProxied} makes the
    factory of a C{haproxy:} listener from the protocol factory (its clock, header timeout
    and refusal report); by default L{gateway.proxyprotocol.ProxyHeaderFactory}'s. C{alpn}:
    the protocols an C{ssl:} listener (not one inside C{haproxy:}) agrees to, in its order
    of preference; empty: http/1.1 only.
    """
    kind, args, kwargs = endpointParts(description)
    if kind == "haproxy":
        from .proxyprotocol import ProxiedEndpoint

        inner = innerEndpoint(description)
        if endpointParts(inner)[0] == "haproxy":
            raise ValueError("haproxy: cannot wrap another haproxy: listener")
        return ProxiedEndpoint(reactor, inner, serverEndpoint, wrapProxied)
    if kind == "ssl":
        from .tls.listener import sslServerEndpoint

        return sslServerEndpoint(reactor, args, kwargs, alpn)
    from twisted.internet.endpoints import serverFromString

    return serverFromString(reactor, description)


def _checkEndpoint(description: str) -> None:
    try:
        # Parsing needs no reactor (it is only used to listen): importing the global one
        # here would install it, as a side effect of reading a file, before an embedding
        # application chose its own.
        serverEndpoint(None, description)
    except Exception as e:  # Twisted raises ValueError, TypeError, OSError, KeyError...
        problem = " ".join(str(e).split()) or type(e).__name__
        if re.search(r"interface=(?:[0-9a-fA-F]{0,4}:){2}", description):
            problem += " (escape ':' in IPv6 addresses: interface=\\:\\:1)"
        raise ValueError(f"invalid endpoint {description!r}: {problem}") from None
    binding = _endpointBinding(description)
    if binding is not None and binding[1] is not None:
        port = binding[1]
        if not (port.isdigit() and 0 <= int(port) <= 65535):
            raise ValueError(f"invalid endpoint {description!r}: port {port!r} is not in 0-65535")


# -- value parsers -----------------------------------------------------------------------------
# Each takes the raw value and the folder relative paths are relative to, and
# raises ValueError with a one-line problem (the caller adds file/section/key).

Parser = Callable[[str, str], Any]


def _items(value: str) -> list[str]:
    return [item for item in re.split(r"[\s,]+", value.strip()) if item]


def _endpoints(value: str, baseDir: str) -> tuple[str, ...]:
    items = _items(value)
    for item in items:
        _checkEndpoint(item)
    return tuple(items)


def _requiredEndpoints(value: str, baseDir: str) -> tuple[str, ...]:
    items = _endpoints(value, baseDir)
    if not items:
        raise ValueError("at least one endpoint is required (e.g. tcp:3128:interface=127.0.0.1)")
    return items


def _cidrs(value: str, baseDir: str) -> tuple[policy.IPNetwork, ...]:
    networks = []
    for item in _items(value):
        text = item[1:-1] if item.startswith("[") and item.endswith("]") else item
        try:
            network = ipaddress.ip_network(text, strict=True)
        except ValueError as e:
            try:
                loose = ipaddress.ip_network(text, strict=False)
            except ValueError:
                raise ValueError(f"invalid CIDR {item!r}: {e}") from None
            raise ValueError(f"invalid CIDR {item!r}: host bits set (did you mean {loose}?)")
        networks.append(policy.normaliseNetwork(network))
    return tuple(networks)


def _ports(value: str, baseDir: str) -> tuple[tuple[int, int], ...]:
    return policy.parsePortRanges(_items(value))


def _nameConstraints(
    value: str, baseDir: str
) -> tuple[tuple[str, ...], tuple[policy.IPNetwork, ...]] | None:
    """
    DNS domains (example.com or .example.com: both mean it and every subdomain, as an
    X.509 dNSName constraint does) and optional CIDRs or addresses.
    """
    items = _items(value)
    if not items:
        return None
    domains: list[str] = []
    networks: list[policy.IPNetwork] = []
    for item in items:
        pattern = policy.parseHostPattern(item)
        if pattern.kind == "network":
            assert pattern.network is not None
            networks.append(pattern.network)
        elif pattern.kind in ("exact", "suffix"):
            domains.append(pattern.name)
        else:
            raise ValueError(
                f"{item!r}: name constraints are domains (example.com: it and its "
                "subdomains) and CIDRs, no wildcards or keywords"
            )
    if not domains:
        raise ValueError(
            "at least one DNS domain is needed (IP ranges alone would leave every name open)"
        )
    return tuple(dict.fromkeys(domains)), tuple(dict.fromkeys(networks))


def _denyPatterns(value: str, baseDir: str) -> tuple[policy.HostPattern, ...]:
    return policy.parseHostPatterns(_items(value))


def _patterns(value: str, baseDir: str) -> tuple[policy.HostPattern, ...]:
    patterns = _denyPatterns(value, baseDir)
    if any(p.kind == "self" for p in patterns):
        raise ValueError(
            f"'{policy.SELF}' (this host's addresses) is a keyword of deny_destinations only"
        )
    return patterns


def _tunnelPatterns(value: str, baseDir: str) -> tuple[policy.TunnelPattern, ...]:
    """Host patterns, each maybe with a port (host:port, [v6]:port, *:port)."""
    patterns = policy.parseTunnelPatterns(_items(value))
    if any(p.host.kind == "self" for p in patterns):
        raise ValueError(
            f"'{policy.SELF}' (this host's addresses) is a keyword of deny_destinations only"
        )
    return patterns


_BOOLEANS = {
    "on": True, "true": True, "yes": True, "1": True,
    "off": False, "false": False, "no": False, "0": False,
}  # fmt: skip


def _boolean(value: str, baseDir: str) -> bool:
    try:
        return _BOOLEANS[value.strip().lower()]
    except KeyError:
        raise ValueError(
            f"invalid boolean {value!r} (use on/off, true/false, yes/no or 1/0)"
        ) from None


def _seconds(value: str, baseDir: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"invalid number of seconds {value!r}") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"must be a number of seconds greater than 0, not {value!r}")
    return seconds


def _positiveInteger(value: str, baseDir: str) -> int:
    text = value.strip()
    if not re.fullmatch(r"[0-9]+", text):
        raise ValueError(f"invalid integer {value!r}")
    number = int(text)
    if number <= 0:
        raise ValueError(f"must be greater than 0, not {value!r}")
    return number


#: More reactor processes than this is a typo, not a deployment.
MAX_WORKERS = 256


def cpuCount() -> int:
    """
    The CPUs this process may use, what C{workers = auto} means: its affinity mask, or
    fewer when its cgroup has a CPU quota (a container's CPU limit, systemd's CPUQuota=),
    which the affinity mask does not show.
    """
    try:
        count = len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        count = os.cpu_count() or 1
    limit = cgroupCPULimit()
    return min(count, limit) if limit is not None else count


def cgroupCPULimit(root: str = "/sys/fs/cgroup", cgroups: str = "/proc/self/cgroup") -> int | None:
    """
    The CPUs this process's cgroup v2 quota allows (C{cpu.max}: "QUOTA PERIOD", rounded
    up), or None without a quota (or without cgroup v2).
    """
    try:
        with open(cgroups, encoding="ascii") as f:
            entries = [line.strip().split(":", 2) for line in f]
        (path,) = [entry[2] for entry in entries if entry[0] == "0"]
        with open(os.path.join(root, path.lstrip("/"), "cpu.max"), encoding="ascii") as f:
            quota, period = f.read().split()
    except (OSError, ValueError):
        return None
    if quota == "max" or not (quota.isdigit() and period.isdigit() and int(period)):
        return None
    return max(1, math.ceil(int(quota) / int(period)))


def _workers(value: str, baseDir: str) -> int:
    text = value.strip().lower()
    if text == "auto":
        return min(cpuCount(), MAX_WORKERS)
    if not re.fullmatch(r"[0-9]+", text):
        raise ValueError(f"invalid number of worker processes {value!r} (a number or 'auto')")
    number = int(text)
    if not 1 <= number <= MAX_WORKERS:
        raise ValueError(f"must be from 1 to {MAX_WORKERS} (or 'auto'), not {value!r}")
    return number


_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def _via(value: str, baseDir: str) -> str:
    if value and not _TOKEN.fullmatch(value):
        raise ValueError(
            f"invalid pseudonym {value!r}: one HTTP token (letters, digits, "
            "!#$%&'*+-.^_`|~), or empty for no Via"
        )
    return value


def _realm(value: str, baseDir: str) -> str:
    if not value or not all(" " <= c <= "~" and c not in '"\\' for c in value):
        raise ValueError(f"invalid realm {value!r}: printable ASCII without '\"' or '\\'")
    return value


def _path(value: str, baseDir: str) -> str:
    if not value:
        raise ValueError("a file path is required")
    return os.path.normpath(os.path.join(baseDir, os.path.expanduser(value)))


def _optionalPath(value: str, baseDir: str) -> str | None:
    return _path(value, baseDir) if value else None


def _accessLog(value: str, baseDir: str) -> str | None:
    return "-" if value == "-" else _optionalPath(value, baseDir)


_LOG_FORMATS = ("squid", "combined", "json")


def _logFormat(value: str, baseDir: str) -> str:
    if value.lower() not in _LOG_FORMATS:
        raise ValueError(f"unknown log format {value!r} (use {', '.join(_LOG_FORMATS)})")
    return value.lower()


def _urlPath(value: str, baseDir: str) -> str:
    if not re.fullmatch(r"/[!$&'()*+,\-./0-9:;=@A-Z_a-z~%]*", value):
        raise ValueError(f"invalid path {value!r}: must start with '/', no query or spaces")
    return value


#: Paths the metrics listener serves besides the scrape path (gateway.service).
RESERVED_METRICS_PATHS = ("/healthz", "/ca.pem", "/ca.der")


def _metricsPath(value: str, baseDir: str) -> str:
    path = _urlPath(value, baseDir)
    if (path.rstrip("/") or "/") in RESERVED_METRICS_PATHS:
        raise ValueError(f"{path} is served by the metrics listener already; choose another")
    return path


def _streams(value: str, baseDir: str) -> int:
    """Concurrent HTTP/2 streams per connection: RFC 9113 §6.5.2 advises at least 100."""
    n = _positiveInteger(value, baseDir)
    if n > 1000:
        raise ValueError(f"{n} streams per connection is more than 1000")
    return n


def _proxyURL(value: str, baseDir: str) -> upstream.ProxyURL | None:
    # parseProxyURL's messages never quote the URL; neither may anything here.
    return upstream.parseProxyURL(value) if value else None


def _noProxy(value: str, baseDir: str) -> upstream.NoProxy:
    return upstream.parseNoProxy(_items(value))


def _optionalText(value: str, baseDir: str) -> str | None:
    return value or None


def _match(value: str, baseDir: str) -> routes.Match:
    return routes.parseMatch(value)


def _backends(value: str, baseDir: str) -> tuple[balance.BackendURL, ...]:
    items = _items(value)
    if not items:
        raise ValueError("at least one backend URL is required (e.g. http://127.0.0.1:8787)")
    backends = tuple(balance.parseBackendURL(item) for item in items)
    seen: set[tuple[str, str, int]] = set()
    for backend in backends:
        key = (backend.scheme, backend.host, backend.port)
        if key in seen:
            raise ValueError(f"backend {backend.url!r} is listed twice")
        seen.add(key)
    return backends


def _balance(value: str, baseDir: str) -> str:
    if value.lower() not in balance.BALANCE_METHODS:
        methods = " | ".join(balance.BALANCE_METHODS)
        raise ValueError(f"unknown balance method {value!r} (use {methods})")
    return value.lower()


def _healthCheck(value: str, baseDir: str) -> str | None:
    if not value:
        return None
    if not re.fullmatch(r"/[!-~]*", value) or "#" in value:
        raise ValueError(f"invalid health check path {value!r}: a path starting with '/'")
    return value


_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def _size(value: str, baseDir: str) -> int:
    m = re.fullmatch(r"([0-9]+)\s*([kmgt]?)b?", value.strip().lower())
    if m is None:
        raise ValueError(f"invalid size {value!r}: bytes, or a number with K, M, G or T")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2)]


def _headerName(value: str, baseDir: str) -> str | None:
    if not value:
        return None
    rewrite.checkFieldName(value, "header name")
    return value


def _requestHeaders(value: str, baseDir: str) -> tuple[rewrite.HeaderTemplate, ...]:
    return rewrite.parseRequestHeaders(value)


def _upstreamRules(value: str, baseDir: str) -> upstream.UpstreamRules:
    # One rule per line; parseUpstreamRules' messages name the rule, never its URL.
    return upstream.parseUpstreamRules(value.splitlines())


# section -> key -> (default as written in the INI, parser)
SCHEMA: dict[str, dict[str, tuple[str, Parser]]] = {
    "proxy": {
        "listen": ("tcp:3128:interface=127.0.0.1", _requiredEndpoints),
        "allowed_client_cidrs": ("127.0.0.0/8 ::1/128", _cidrs),
        "connect_ports": ("443", _ports),
        "allow_destinations": ("", _patterns),
        "deny_destinations": (
            "127.0.0.0/8 ::1/128 169.254.0.0/16 fe80::/10 0.0.0.0/8",
            _denyPatterns,
        ),
        "via": ("proxygate", _via),
        "forwarded_for": ("off", _boolean),
        "connect_timeout": ("10", _seconds),
        "header_timeout": ("30", _seconds),
        "idle_timeout": ("300", _seconds),
        "drain_grace": ("10", _seconds),
        "max_header_size": ("65536", _positiveInteger),
        "max_connections": ("10000", _positiveInteger),
        "workers": ("1", _workers),
        "ftp": ("on", _boolean),
        "ftp_ports": ("21 1024-65535", _ports),
        "ftp_data_ports": ("1024-65535", _ports),
    },
    "auth": {
        "htpasswd": ("", _optionalPath),
        "realm": ("proxygate", _realm),
    },
    "upstream": {
        "proxy": ("", _proxyURL),
        "no_proxy": ("", _noProxy),
        "ca_certificate": ("", _optionalPath),
        "verify": ("on", _boolean),
        "rules": ("", _upstreamRules),
    },
    "mitm": {
        "enabled": ("off", _boolean),
        "ca_cert": ("proxygate-ca.pem", _path),
        "ca_key": ("proxygate-ca.key", _path),
        "intercept": ("*", _tunnelPatterns),
        "passthrough": ("", _tunnelPatterns),
        "upstream_ca_bundle": ("", _optionalPath),
        "verify_upstream": ("on", _boolean),
        "name_constraints": ("", _nameConstraints),
        "http2": ("on", _boolean),
        "http2_max_streams": ("100", _streams),
    },
    "metrics": {
        "listen": ("tcp:9530:interface=127.0.0.1", _endpoints),
        "path": ("/metrics", _metricsPath),
    },
    "log": {
        "access_log": ("-", _accessLog),
        "format": ("squid", _logFormat),
    },
    "reverse": {
        "listen": ("", _endpoints),
        "allowed_client_cidrs": ("0.0.0.0/0 ::/0", _cidrs),
        "http2": ("off", _boolean),
        "sticky_secret": ("", _optionalText),
    },
}

# The keys of every [route NAME] section (README, the inbound gateway); match and
# backends have no default: their parsers refuse the empty value.
ROUTE_SCHEMA: dict[str, tuple[str, Parser]] = {
    "match": ("", _match),
    "backends": ("", _backends),
    "strip_prefix": ("on", _boolean),
    "balance": ("round_robin", _balance),
    "health_check": ("", _healthCheck),
    "health_interval": ("5", _seconds),
    "max_body_size": ("0", _size),
    "timeout": ("300", _seconds),
    "auth": ("off", _boolean),
    "user_header": ("X-Forwarded-User", _headerName),
    "request_headers": ("", _requestHeaders),
    "rewrite_location": ("on", _boolean),
    "ca_bundle": ("", _optionalPath),
}

_ROUTE_SECTION = re.compile(r"route(?:\s+(.*))?")
_ROUTE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def _routeName(section: str) -> str | None:
    """The NAME of a [route NAME] section, None for any other section."""
    m = _ROUTE_SECTION.fullmatch(section)
    return None if m is None else (m.group(1) or "").strip()


# -- reading -----------------------------------------------------------------------------------


def _suggest(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word.lower(), list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _unknownKeyProblem(section: str, key: str) -> str:
    isRoute = _routeName(section) is not None
    homes = [f"[{name}]" for name, keys in SCHEMA.items() if key in keys and name != section]
    if key in ROUTE_SCHEMA and not isRoute:
        homes.append("[route NAME]")
    if homes:
        return f"unknown key {key!r} (it belongs in " + " or ".join(homes) + ")"
    return f"unknown key {key!r}" + _suggest(key, ROUTE_SCHEMA if isRoute else SCHEMA[section])


def _read(text: str, path: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(
        delimiters=("=",),
        inline_comment_prefixes=(";", "#"),
        interpolation=None,
        strict=True,
        default_section="\x00none",  # so a [DEFAULT] section is refused, not inherited
    )
    try:
        parser.read_string(text, source=path)
    except configparser.DuplicateOptionError as e:
        raise ConfigError(f"{path}: [{e.section}] {e.option}: duplicate key (line {e.lineno})")
    except configparser.DuplicateSectionError as e:
        raise ConfigError(f"{path}: [{e.section}]: duplicate section (line {e.lineno})")
    except configparser.MissingSectionHeaderError as e:
        raise ConfigError(f"{path}: line {e.lineno}: a key before any [section] header")
    except configparser.ParsingError as e:
        # The offending line is not quoted: it may be a mistyped proxy URL with a password.
        lines = [str(lineno) for lineno, _ in e.errors]
        more = f" (and {len(lines) - 1} more)" if len(lines) > 1 else ""
        raise ConfigError(f"{path}: line {lines[0]}: expected 'key = value'{more}")
    return parser


def _values(parser: configparser.ConfigParser, path: str, baseDir: str) -> dict[str, Any]:
    """Every key of every section: the file's value or the default, parsed."""
    for section in parser.sections():
        routeName = _routeName(section)
        if section not in SCHEMA and routeName is None:
            routeHint = ""
            if section.lower().startswith("rout"):
                routeHint = " (did you mean [route NAME]?)"
            raise ConfigError(
                f"{path}: [{section}]: unknown section {section!r}"
                + (
                    routeHint
                    or _suggest(section, SCHEMA)
                    or f" (sections: {', '.join(SCHEMA)}, route NAME)"
                )
            )
        keys = SCHEMA[section] if routeName is None else ROUTE_SCHEMA
        for key in parser[section]:
            if key not in keys:
                raise ConfigError(f"{path}: [{section}] {key}: {_unknownKeyProblem(section, key)}")
    values: dict[str, Any] = {}
    for section, keys in SCHEMA.items():
        for key, (default, parse) in keys.items():
            raw = default
            if parser.has_section(section):
                raw = parser.get(section, key, fallback=default)
            try:
                values[f"{section}.{key}"] = parse(raw.strip(), baseDir)
            except ValueError as e:
                raise ConfigError(f"{path}: [{section}] {key}: {e}") from None
    return values


def _routes(parser: configparser.ConfigParser, path: str, baseDir: str) -> tuple[RouteConfig, ...]:
    """Every [route NAME] section, in file order, checked one by one and against each other."""
    found: list[RouteConfig] = []
    names: dict[str, str] = {}
    matched: dict[tuple[str | None, bytes], str] = {}
    for section in parser.sections():
        name = _routeName(section)
        if name is None:
            continue
        if not _ROUTE_NAME.fullmatch(name):
            raise ConfigError(
                f"{path}: [{section}]: "
                + (
                    f"invalid route name {name!r}: letters, digits, '_', '.' and '-', "
                    "at most 64 (it becomes a metrics label and a cookie name)"
                    if name
                    else "a route needs a name: [route NAME]"
                )
            )
        if name in names:
            raise ConfigError(f"{path}: [{section}]: route {name!r} is defined twice")
        names[name] = section
        v: dict[str, Any] = {}
        for key, (default, parse) in ROUTE_SCHEMA.items():
            raw = parser.get(section, key, fallback=default)
            try:
                v[key] = parse(raw.strip(), baseDir)
            except ValueError as e:
                raise ConfigError(f"{path}: [{section}] {key}: {e}") from None
        match: routes.Match = v["match"]
        if match.key in matched:
            raise ConfigError(
                f"{path}: [{section}] match: {str(match)!r} matches the same requests as "
                f"[{matched[match.key]}]"
            )
        matched[match.key] = section
        found.append(RouteConfig(name=name, **v))
    return tuple(found)


def _coversEverything(networks: Iterable[policy.IPNetwork]) -> bool:
    for version, everything in ((4, "0.0.0.0/0"), (6, "::/0")):
        nets = [n for n in networks if n.version == version]
        if list(ipaddress.collapse_addresses(nets)) == [ipaddress.ip_network(everything)]:
            return True
    return False


def refuseOpenProxy(config: Config, path: str) -> None:
    """
    A proxy reachable from the network, letting in every address, without a
    password, is an open proxy: spam, abuse and SSRF for anyone who finds it.
    """
    if config.auth.htpasswd is not None:
        return
    if not _coversEverything(config.proxy.allowed_client_cidrs):
        return
    for description in config.proxy.listen:
        if not _isLocalOnly(description):
            raise ConfigError(
                f"{path}: [proxy] allowed_client_cidrs: refusing to run an open proxy: "
                f"listen {description!r} is reachable from other hosts, "
                "allowed_client_cidrs admits every address and [auth] htpasswd is empty "
                "(narrow allowed_client_cidrs or set [auth] htpasswd)"
            )


#: Endpoint kinds several processes can share (each binds the port with SO_REUSEPORT).
WORKER_ENDPOINTS = ("tcp", "tcp6", "ssl")


def _checkWorkers(config: Config, path: str) -> None:
    """Several worker processes share TCP ports; other listener kinds cannot be shared."""
    if config.proxy.workers == 1:
        return
    if not hasattr(socket, "SO_REUSEPORT"):
        raise ConfigError(
            f"{path}: [proxy] workers: several worker processes need SO_REUSEPORT, which this "
            "platform lacks (use workers = 1)"
        )
    for description in config.proxy.listen:
        if endpointParts(innerEndpoint(description))[0] not in WORKER_ENDPOINTS:
            raise ConfigError(
                f"{path}: [proxy] workers: {config.proxy.workers} worker processes need "
                f"tcp:, tcp6: or ssl: listeners (also under haproxy:), and listen "
                f"{description!r} is not one (use workers = 1 with it)"
            )


def _sharesPort(a: str, b: str) -> bool:
    """Would these two server endpoints bind the same TCP port (on a common interface)?"""
    first, second = endpointAddress(a), endpointAddress(b)
    if first is None or second is None or first[1] != second[1] or first[1] == 0:
        return False
    return first[0] is None or second[0] is None or first[0] == second[0]


def _checkReverse(config: Config, path: str, parser: configparser.ConfigParser) -> None:
    """What no single [reverse] or [route NAME] key can check on its own."""
    for description in config.reverse.listen:
        for section, others in (("proxy", config.proxy.listen), ("metrics", config.metrics.listen)):
            for other in others:
                if _sharesPort(description, other):
                    raise ConfigError(
                        f"{path}: [reverse] listen: {description!r} takes the port of "
                        f"[{section}] listen {other!r} (the gateway needs listeners of its own)"
                    )
        if config.proxy.workers > 1 and endpointParts(description)[0] not in WORKER_ENDPOINTS:
            raise ConfigError(
                f"{path}: [reverse] listen: {config.proxy.workers} worker processes need "
                f"tcp:, tcp6: or ssl: listeners, and {description!r} is not one"
            )
    for route in config.routes:
        section = next(s for s in parser.sections() if _routeName(s) == route.name)
        if route.auth and config.auth.htpasswd is None:
            raise ConfigError(
                f"{path}: [{section}] auth: edge authentication needs [auth] htpasswd"
            )
        user = (route.user_header or "").lower().replace("_", "-")
        if any(t.name.decode().lower().replace("_", "-") == user for t in route.request_headers):
            raise ConfigError(
                f"{path}: [{section}] request_headers: {route.user_header!r} is the route's "
                "user_header, which only the logged-in user's name may fill"
            )


def parseConfig(
    text: str,
    path: str = "<config>",
    *,
    allowOpenProxy: bool = False,
    overrides: dict[tuple[str, str], str] | None = None,
) -> Config:
    """
    Read INI text.  Relative paths are relative to the folder of C{path}
    (the current folder for the default "<config>").  C{allowOpenProxy} is
    for a deliberate, explicit command-line override, never a default.
    C{overrides} maps (section, key) to a raw value that replaces the file's
    (command-line options), validated exactly like the file's own values.
    """
    baseDir = os.path.dirname(os.path.abspath(path))
    parser = _read(text, path)
    for (section, key), value in (overrides or {}).items():
        if not parser.has_section(section):
            parser.add_section(section)
        parser.set(section, key, value)
    v = _values(parser, path, baseDir)
    config = Config(
        proxy=ProxyConfig(
            listen=v["proxy.listen"],
            allowed_client_cidrs=v["proxy.allowed_client_cidrs"],
            connect_ports=v["proxy.connect_ports"],
            allow_destinations=v["proxy.allow_destinations"],
            deny_destinations=v["proxy.deny_destinations"],
            via=v["proxy.via"],
            forwarded_for=v["proxy.forwarded_for"],
            connect_timeout=v["proxy.connect_timeout"],
            header_timeout=v["proxy.header_timeout"],
            idle_timeout=v["proxy.idle_timeout"],
            drain_grace=v["proxy.drain_grace"],
            max_header_size=v["proxy.max_header_size"],
            max_connections=v["proxy.max_connections"],
            workers=v["proxy.workers"],
            ftp=v["proxy.ftp"],
            ftp_ports=v["proxy.ftp_ports"],
            ftp_data_ports=v["proxy.ftp_data_ports"],
        ),
        auth=AuthConfig(htpasswd=v["auth.htpasswd"], realm=v["auth.realm"]),
        upstream=UpstreamConfig(
            proxy=v["upstream.proxy"],
            no_proxy=v["upstream.no_proxy"],
            ca_certificate=v["upstream.ca_certificate"],
            verify=v["upstream.verify"],
            rules=v["upstream.rules"],
        ),
        mitm=MitmConfig(
            enabled=v["mitm.enabled"],
            ca_cert=v["mitm.ca_cert"],
            ca_key=v["mitm.ca_key"],
            intercept=v["mitm.intercept"],
            passthrough=v["mitm.passthrough"],
            upstream_ca_bundle=v["mitm.upstream_ca_bundle"],
            verify_upstream=v["mitm.verify_upstream"],
            name_constraints=v["mitm.name_constraints"],
            http2=v["mitm.http2"],
            http2_max_streams=v["mitm.http2_max_streams"],
        ),
        metrics=MetricsConfig(listen=v["metrics.listen"], path=v["metrics.path"]),
        log=LogConfig(access_log=v["log.access_log"], format=v["log.format"]),
        reverse=ReverseConfig(
            listen=v["reverse.listen"],
            allowed_client_cidrs=v["reverse.allowed_client_cidrs"],
            http2=v["reverse.http2"],
            sticky_secret=v["reverse.sticky_secret"],
        ),
        routes=_routes(parser, path, baseDir),
        path=None if path == "<config>" else os.path.abspath(path),
        overrides=tuple(sorted((overrides or {}).items())),
    )
    _checkWorkers(config, path)
    _checkReverse(config, path, parser)
    if not allowOpenProxy:
        refuseOpenProxy(config, path)
    return config


def defaultConfig() -> Config:
    """The built-in defaults (README, etc/proxygate.ini); relative paths: the current folder."""
    return parseConfig("")


def _checkReadable(config: Config, path: str) -> None:
    """Files the proxy must read at start: fail now, naming the key, not later in a traceback."""
    for section, key, filename in (
        ("auth", "htpasswd", config.auth.htpasswd),
        ("upstream", "ca_certificate", config.upstream.ca_certificate),
        ("mitm", "upstream_ca_bundle", config.mitm.upstream_ca_bundle),
        *((f"route {r.name}", "ca_bundle", r.ca_bundle) for r in config.routes),
    ):
        if filename is None:
            continue
        try:
            with open(filename, "rb"):
                pass
        except OSError as e:
            raise ConfigError(f"{path}: [{section}] {key}: cannot read {filename}: {e.strerror}")


def loadConfig(
    path: str | None,
    *,
    allowOpenProxy: bool = False,
    overrides: dict[tuple[str, str], str] | None = None,
) -> Config:
    """
    Read the INI file at C{path} (None: the built-in defaults), and check that
    the files it names for reading exist; any problem is a L{ConfigError}.
    """
    if path is None:
        if not overrides:
            return defaultConfig()
        return parseConfig("", allowOpenProxy=allowOpenProxy, overrides=overrides)
    try:
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
    config = parseConfig(text, path, allowOpenProxy=allowOpenProxy, overrides=overrides)
    _checkReadable(config, path)
    return config
