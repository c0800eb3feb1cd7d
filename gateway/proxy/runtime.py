"""
What every connection of one proxy service shares: configuration turned into ready-to-use
objects (policies, precomputed header bytes, the upstream routes, the interceptor, the
authenticator, the access log), the origin pool, the dialer, metrics.

The request path reads these as C{rt.<attribute>} when it needs them, never a copy taken
earlier, so a reload (L{gateway.reload}) changes what new requests see by building a new
L{Settings} from the new configuration, with the same L{Settings.build} start-up uses, and
then swapping it in with L{Runtime.apply}: one step, between two reactor events.
Connections and tunnels already open keep what they hold.
"""

from __future__ import annotations

import attrs
from twisted.logger import Logger

from ..accesslog import AccessLog, AccessLogFile
from ..config import Config, ConfigError
from ..exchange.answers import answer
from ..interfaces import localNetworks
from ..metrics import Metrics
from ..policy import DestinationPolicy
from ..tls.contexts import CAError
from .chain import Upstream
from .connector import OriginConnector
from .dial import Dialer
from .origin import OriginPool
from .tunnel import Splice

__all__ = ["Runtime", "Settings"]


@attrs.frozen
class Settings:
    """Everything a configuration becomes for the request path, built before it is used."""

    config: Config
    clientCIDRs: tuple
    connectPorts: tuple
    destinations: DestinationPolicy
    maxHeaderSize: int
    maxConnections: int
    headerTimeout: float
    idleTimeout: float
    connectTimeout: float
    forwardedFor: bool
    viaRequest: dict
    viaResponse: dict
    upstream: Upstream
    interceptor: object
    authenticator: object
    accessLog: AccessLog | None
    accessLogFile: AccessLogFile | None

    @classmethod
    def build(cls, config: Config, rt: Runtime) -> Settings:
        """
        The settings of C{config} for C{rt} (whose current settings, if any, lend what
        need not be made again: the CA and its minted certificates, the open access log
        file). Everything is checked here; nothing running is touched.

        @raise ConfigError: naming the file, section and key of what cannot be used.
        """
        current: Settings | None = getattr(rt, "settings", None)
        where = config.path or "<defaults>"
        p = config.proxy
        try:
            upstream = Upstream(config.upstream)
        except CAError as e:
            raise ConfigError(f"{where}: [upstream] ca_certificate: {e}")
        interceptor = _interceptor(config, rt.metrics, current, where)
        authenticator = _authenticator(config, rt.reactor, where)
        destinations = DestinationPolicy(p.allow_destinations, p.deny_destinations)
        if destinations.usesSelf():
            # `self` in deny_destinations: this host's interface addresses, read now.
            destinations = destinations.withLocalNetworks(localNetworks())
        if rt.selfAddresses:
            destinations = destinations.withSelfAddresses(rt.selfAddresses)
        via = p.via.encode("ascii") if p.via else b""
        # The Via field per protocol version of the message it goes on (RFC 9110 §7.6.3),
        # as shared lists, never mutated.
        viaRequest = {}
        if via:
            viaRequest = {
                b"HTTP/1.1": [(b"Via", b"1.1 " + via)],
                b"HTTP/1.0": [(b"Via", b"1.0 " + via)],
                b"HTTP/2": [(b"Via", b"2 " + via)],
            }
        # The inbound gateway's [route *] sections are the service's (reloadRoutes, called by
        # the reload right after these settings are applied): their backends keep their state.
        # Last: the only step that opens something to undo if a later one failed.
        accessLog, accessLogFile = _accessLog(config, current, where)
        return cls(
            config=config,
            clientCIDRs=p.allowed_client_cidrs,
            connectPorts=p.connect_ports,
            destinations=destinations,
            maxHeaderSize=p.max_header_size,
            maxConnections=p.max_connections,
            headerTimeout=p.header_timeout,
            idleTimeout=p.idle_timeout,
            connectTimeout=p.connect_timeout,
            forwardedFor=p.forwarded_for,
            viaRequest=viaRequest,
            viaResponse=viaRequest,
            upstream=upstream,
            interceptor=interceptor,
            authenticator=authenticator,
            accessLog=accessLog,
            accessLogFile=accessLogFile,
        )

    def release(self, replacement: Settings | None = None) -> None:
        """Close what these settings opened and C{replacement} does not keep."""
        if self.accessLogFile is not None and (
            replacement is None or replacement.accessLogFile is not self.accessLogFile
        ):
            self.accessLogFile.flush()
            self.accessLogFile.close()


def _interceptor(config: Config, metrics: Metrics, current: Settings | None, where: str):
    previous = current.interceptor if current is not None else None
    if not config.mitm.enabled and previous is None:
        return None
    from .mitm import Interceptor

    try:
        return Interceptor(config.mitm, metrics, previous)
    except CAError as e:
        bundle = config.mitm.upstream_ca_bundle
        key = "upstream_ca_bundle" if bundle and bundle in str(e) else "ca_cert/ca_key"
        raise ConfigError(f"{where}: [mitm] {key}: {e}")


def _authenticator(config: Config, reactor, where: str):
    if not config.auth.htpasswd:
        return None
    from ..auth import Authenticator, HtpasswdError

    try:
        return Authenticator(config.auth.htpasswd, config.auth.realm, reactor=reactor)
    except HtpasswdError as e:
        raise ConfigError(f"{where}: [auth] htpasswd: {e}")


def _accessLog(
    config: Config, current: Settings | None, where: str
) -> tuple[AccessLog | None, AccessLogFile | None]:
    target = config.log.access_log
    if target is None:
        return None, None
    if target == "-":
        return AccessLog(config.log.format), None
    logFile = current.accessLogFile if current is not None else None
    if logFile is None or logFile.path != target:
        try:
            logFile = AccessLogFile(target)
        except OSError as e:
            raise ConfigError(
                f"{where}: [log] access_log: cannot open {target}: {e.strerror or e}"
            ) from None
    return AccessLog(config.log.format, observer=logFile.observe), logFile


class Runtime:
    """
    The service's shared state. Its configuration-derived attributes are those of
    L{Settings} (C{rt.clientCIDRs}, C{rt.upstream}, ...), set together by L{apply}.

    Also the environment of every exchange (L{gateway.exchange.exchange.Exchange}): its
    clock (C{now}), metrics, access log, connector, the proxy's own fields, the proxy's own
    answers (C{answer}) and the splice of two streams (C{splice}).
    """

    log = Logger(namespace="proxygate")
    answer = staticmethod(answer)

    def __init__(self, config: Config, reactor, metrics: Metrics) -> None:
        self.reactor = reactor
        self.now = reactor.seconds
        self.metrics = metrics
        self.maxHeaders = 100
        self.connections: set = set()
        self.pool = OriginPool(reactor)
        self.h2pool = None  # origin HTTP/2 connections (gateway.h2.pool), made on first use
        self.selfAddresses: frozenset = frozenset()
        self.dialer = Dialer(reactor, DestinationPolicy((), ()), config.proxy.connect_timeout)
        self.connector = OriginConnector(self)
        self.apply(Settings.build(config, self))

    def splice(self, client, origin, onEnd) -> Splice:
        """Relay two streams (a 101's two sides) until both are gone."""
        return Splice(client, origin, self.reactor, self.idleTimeout, onEnd)

    def apply(self, settings: Settings) -> None:
        """Make C{settings} what every new request sees, all at once."""
        self.settings = settings
        for name, value in attrs.asdict(settings, recurse=False).items():
            setattr(self, name, value)
        self.dialer.policy = settings.destinations
        self.dialer.connectTimeout = settings.connectTimeout

    def setSelfAddresses(self, addresses) -> None:
        """The listeners' real addresses, known only once they listen: never dial them."""
        self.selfAddresses = frozenset(addresses)
        self.destinations = self.destinations.withSelfAddresses(addresses)
        self.settings = attrs.evolve(self.settings, destinations=self.destinations)
        self.dialer.policy = self.destinations

    def close(self) -> None:
        """Stopping: close what the settings opened (the access log file)."""
        self.settings.release()
