"""
What every connection of one proxy service shares: configuration turned into ready-to-use
objects (policies, precomputed header bytes), the origin pool, the dialer, metrics and logs.

Built once per service, so the per-request path reads attributes instead of re-deriving
anything from the configuration.
"""

from __future__ import annotations

from twisted.logger import Logger

from ..accesslog import AccessLog
from ..config import Config, ConfigError
from ..interfaces import localNetworks
from ..metrics import Metrics
from ..policy import DestinationPolicy
from ..tls.contexts import CAError
from .chain import Upstream
from .dial import Dialer
from .origin import OriginPool

__all__ = ["Runtime"]


class Runtime:
    log = Logger(namespace="proxygate")

    def __init__(
        self,
        config: Config,
        reactor,
        metrics: Metrics,
        accessLog: AccessLog | None,
        authenticator=None,
    ) -> None:
        p = config.proxy
        self.config = config
        self.reactor = reactor
        self.metrics = metrics
        self.accessLog = accessLog
        self.authenticator = authenticator
        where = config.path or "<defaults>"
        try:
            self.upstream = Upstream(config.upstream)
        except CAError as e:
            raise ConfigError(f"{where}: [upstream] ca_certificate: {e}")
        self.interceptor = None
        if config.mitm.enabled:
            from .mitm import Interceptor

            try:
                self.interceptor = Interceptor(config.mitm, metrics)
            except CAError as e:
                bundle = config.mitm.upstream_ca_bundle
                key = "upstream_ca_bundle" if bundle and bundle in str(e) else "ca_cert/ca_key"
                raise ConfigError(f"{where}: [mitm] {key}: {e}")
        self.clientCIDRs = p.allowed_client_cidrs
        self.connectPorts = p.connect_ports
        self.destinations = DestinationPolicy(p.allow_destinations, p.deny_destinations)
        if self.destinations.usesSelf():
            # `self` in deny_destinations: this host's interface addresses, read now.
            self.destinations = self.destinations.withLocalNetworks(localNetworks())
        self.maxHeaderSize = p.max_header_size
        self.maxHeaders = 100
        self.maxConnections = p.max_connections
        self.headerTimeout = p.header_timeout
        self.idleTimeout = p.idle_timeout
        self.forwardedFor = p.forwarded_for
        self.connections: set = set()
        self.pool = OriginPool(reactor)
        self.dialer = Dialer(reactor, self.destinations, p.connect_timeout)
        via = p.via.encode("ascii") if p.via else b""
        if via:
            self.viaRequest = {
                b"HTTP/1.1": b"Via: 1.1 " + via + b"\r\n",
                b"HTTP/1.0": b"Via: 1.0 " + via + b"\r\n",
            }
            self.viaResponse = self.viaRequest
        else:
            self.viaRequest = {}
            self.viaResponse = {}

    def setSelfAddresses(self, addresses) -> None:
        """The listeners' real addresses, known only once they listen: never dial them."""
        self.destinations = self.destinations.withSelfAddresses(addresses)
        self.dialer.policy = self.destinations
