"""
The proxy as a Twisted service: what `twistd proxygate` runs, and what an existing Twisted
application attaches with C{makeService(config).setServiceParent(application)}.

The service owns everything it opens: the proxy listeners, the inbound gateway's listeners
(C{[reverse] listen}) with their routes and health checks, the metrics listener, every
client, origin and backend connection, the access log file. Stopping it stops accepting, lets
exchanges in flight finish and tunnels run for a grace period, then closes what is left.
"""

from __future__ import annotations

import signal

from twisted.application.service import MultiService
from twisted.internet import defer, task
from twisted.logger import Logger

from .accesslog import AccessLog, fileObserver
from .config import Config, ConfigError, endpointParts, loadConfig, serverEndpoint
from .metrics import Metrics, metricsHandler
from .metricsserver import Handler, MetricsServerFactory, routePath, staticHandler
from .proxy.client import ClientFactory
from .proxy.runtime import Runtime
from .proxy.tunnel import ABORT_GRACE
from .seam import clearExitSignal, exitSignal

__all__ = ["GatewayService", "ListenError", "makeService"]


class ListenError(Exception):
    """A configured listener could not be opened (address in use, permission...)."""


class GatewayService(MultiService):
    """
    @ivar runtime: what the connections share (metrics, pool, policies).
    @ivar reverse: what the inbound gateway's connections share (its routes, the backends'
        pool), or None without C{[reverse] listen}.
    @ivar ports: the listening ports once started, proxy listeners first.
    @ivar proxyPorts, metricsPorts, reversePorts: the same, split by role.
    """

    log = Logger(namespace="proxygate")

    def __init__(
        self,
        config: Config,
        reactor=None,
        *,
        drainGrace: float = 10.0,
        exitOnListenFailure: bool = False,
    ) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor
        if config.reverse.listen:
            from .inbound.runtime import settleStickySecret

            # Before anything copies the configuration (the workers get it pickled): every
            # process must set and follow the same sticky cookies.
            config = settleStickySecret(config)
        self.config = config
        self.reactor = reactor
        self.drainGrace = drainGrace
        #: What a tunnel that cannot flush gets after the drain grace (its splice cuts it).
        self.abortGrace = ABORT_GRACE
        self.exitOnListenFailure = exitOnListenFailure
        self.metrics = Metrics()
        self.proxyPorts: list = []
        self.metricsPorts: list = []
        self.reversePorts: list = []
        self.metricsFactory: MetricsServerFactory | None = None
        self._logFile = None
        self._flusher = None
        self._authReloader = None
        authenticator = None
        if config.auth.htpasswd:
            from .auth import Authenticator, HtpasswdError

            try:
                authenticator = Authenticator(
                    config.auth.htpasswd, config.auth.realm, reactor=reactor
                )
            except HtpasswdError as e:
                raise ConfigError(f"{config.path or '<defaults>'}: [auth] htpasswd: {e}")
        self.authenticator = authenticator
        self.runtime = Runtime(config, reactor, self.metrics, self._openAccessLog(), authenticator)
        self.reverse = None
        self.healthChecker = None
        if config.reverse.listen:
            from .inbound.runtime import Inbound
            from .proxy.reverse import ReverseRuntime

            inbound = Inbound(config, reactor.seconds)
            inbound.watch(self.metrics)
            self.reverse = ReverseRuntime(self.runtime, config, inbound)
            self.healthChecker = inbound.healthChecker(reactor)
            self.healthChecker.setServiceParent(self)
        # [proxy] workers > 1: worker processes share the proxy listeners (gateway.workers).
        self.listenReactor = reactor
        self.workers = None
        if config.proxy.workers > 1:
            from .workers import WorkerPool

            self.workers = WorkerPool(self, config.proxy.workers)
            self.listenReactor = self.workers.listener

    def _openAccessLog(self) -> AccessLog | None:
        target = self.config.log.access_log
        if target is None:
            return None
        if target == "-":
            return AccessLog(self.config.log.format)
        self._logFile = open(target, "a", encoding="utf-8")  # noqa: SIM115 - owned until stop
        return AccessLog(self.config.log.format, observer=fileObserver(self._logFile))

    @property
    def ports(self) -> list:
        return self.proxyPorts + self.metricsPorts + self.reversePorts

    def startService(self) -> None:
        super().startService()
        try:
            self._listen()
        except ListenError as e:
            if self.exitOnListenFailure:
                raise SystemExit(f"proxygate: {e}")
            raise
        addresses = set()
        for port in self.ports:
            host = port.getHost()
            addresses.add((host.host if host.host not in ("0.0.0.0", "::") else None, host.port))
        self.runtime.setSelfAddresses(addresses)
        if self._logFile is not None:
            self._flusher = task.LoopingCall(self._logFile.flush)
            self._flusher.clock = self.reactor
            self._flusher.start(1.0, now=False)
        if self.authenticator is not None:
            self._authReloader = task.LoopingCall(self.authenticator.maybeReload)
            self._authReloader.clock = self.reactor
            # maybeReload stats at most once a second; ticking twice as often keeps a change
            # from waiting up to two seconds when a tick lands just before the throttle ends.
            self._authReloader.start(0.5, now=False)
        for port in self.proxyPorts:
            h = port.getHost()
            self.log.info("proxygate listening on {host}:{port}", host=h.host, port=h.port)
        for port in self.reversePorts:
            h = port.getHost()
            self.log.info(
                "proxygate gateway listening on {host}:{port} ({routes} routes)",
                host=h.host,
                port=h.port,
                routes=len(self.config.routes),
            )
        if self.reverse is not None and self.config.reverse.http2:
            self.log.info(
                "[reverse] http2 = on: takes effect once proxygate speaks HTTP/2; "
                "the gateway serves HTTP/1.1 until then"
            )
        if self.reverse is None and self.config.routes:
            self.log.warn("[route] sections are not served: [reverse] listen is empty")
        for port in self.metricsPorts:
            h = port.getHost()
            self.log.info(
                "proxygate metrics on http://{host}:{port}{path}",
                host=h.host,
                port=h.port,
                path=self.config.metrics.path,
            )
        if self.workers is not None:
            self.workers.start(addresses)

    def _listen(self) -> None:
        """
        Open every listener now, synchronously: a proxy that says it started must be
        listening, and a port in use must fail start-up with one clear line.
        """
        factory = ClientFactory(self.runtime)
        for description in self.config.proxy.listen:
            self.proxyPorts.append(self._listenOne(description, factory, self.listenReactor))
        if self.reverse is not None:
            from .proxy.reverse import ReverseFactory

            # After the proxy's, in the same order in every process: workers adopt the
            # shared sockets in the order the master bound them.
            for description in self.config.reverse.listen:
                scheme = "https" if endpointParts(description)[0] == "ssl" else "http"
                gateway = ReverseFactory(self.reverse, scheme)
                self.reversePorts.append(self._listenOne(description, gateway, self.listenReactor))
        if self.config.metrics.listen:
            # A slow or idle scrape connection gets what a proxy client gets for its head.
            self.metricsFactory = MetricsServerFactory(
                self._metricsRoutes(),
                timeout=self.config.proxy.header_timeout,
                reactor=self.reactor,
            )
            for description in self.config.metrics.listen:
                self.metricsPorts.append(self._listenOne(description, self.metricsFactory))

    def _listenOne(self, description: str, factory, reactor=None):
        if reactor is None:
            reactor = self.reactor
        d = serverEndpoint(reactor, _withBacklog(description)).listen(factory)
        result: list = []
        d.addBoth(result.append)
        if not result:
            raise ListenError(f"listener {description!r} did not start synchronously")
        port = result[0]
        if isinstance(port, Exception) or hasattr(port, "value"):
            error = getattr(port, "value", port)
            self._closePorts()
            raise ListenError(f"cannot listen on {description!r}: {error}")
        return port

    def _metricsRoutes(self) -> dict[bytes, Handler]:
        """What the metrics listener serves: the scrape path, and the MITM CA when there is one."""
        if self.workers is None:
            scrape = metricsHandler(self.metrics.registry)
        else:
            from .workers import mergedMetricsHandler

            scrape = mergedMetricsHandler(self.metrics.registry, self.workers)
        routes = {routePath(self.config.metrics.path): scrape}
        interceptor = self.runtime.interceptor
        if interceptor is not None:
            # Users fetch the CA to trust it: curl http://127.0.0.1:9530/ca.pem
            routes[b"/ca.pem"] = staticHandler(b"application/x-pem-file", interceptor.ca.pem())
            routes[b"/ca.der"] = staticHandler(b"application/x-x509-ca-cert", interceptor.ca.der())
        return routes

    def _closePorts(self) -> list:
        ds = [defer.maybeDeferred(p.stopListening) for p in self.ports]
        if self.workers is not None:
            self.workers.listener.close()
        self.proxyPorts = []
        self.metricsPorts = []
        self.reversePorts = []
        return ds

    def hangup(self) -> None:
        """SIGHUP: re-read the htpasswd file, here and in the worker processes."""
        if self.authenticator is not None:
            self.authenticator.reload()
        if self.workers is not None:
            self.workers.hangup()

    def reloadRoutes(self, config: Config) -> None:
        """
        Serve the routes of C{config} from now on: the hook for a reload of the whole INI
        (SIGHUP), in each process. Backends that stay keep their up/down state, removed
        routes leave the metrics, the health checks follow the new routes, the sticky secret
        stays unless the file sets one. Requests in flight finish on the routes they started
        on. C{[reverse] listen} itself needs a restart: without a gateway, nothing happens.
        """
        if self.reverse is None:
            return
        from .inbound.runtime import Inbound, settleStickySecret

        config = settleStickySecret(config, running=self.config)
        old = self.reverse.inbound
        new = Inbound(config, self.reactor.seconds, previous=old)
        new.watch(self.metrics, previous=old)
        self.reverse.inbound = new
        self.reverse.clientCIDRs = config.reverse.allowed_client_cidrs
        if self.healthChecker is not None:
            self.healthChecker.disownServiceParent()
        self.healthChecker = new.healthChecker(self.reactor)
        self.healthChecker.setServiceParent(self)

    @defer.inlineCallbacks
    def stopService(self):
        yield defer.maybeDeferred(super().stopService)
        workersStopped = self.workers.stop() if self.workers is not None else None
        yield defer.DeferredList(self._closePorts())
        if self.metricsFactory is not None:
            # Scrapers keep their connections alive: close them, after any answer under way.
            self.metricsFactory.closeConnections()
        for timer in (self._flusher, self._authReloader):
            if timer is not None and timer.running:
                timer.stop()
        rt = self.runtime
        for conn in list(rt.connections):
            conn.drain()
        deadline = self.reactor.seconds() + self.drainGrace
        while rt.connections and self.reactor.seconds() < deadline:
            yield task.deferLater(self.reactor, 0.05, lambda: None)
        for conn in list(rt.connections):
            conn.shutdown()
        rt.pool.closeAll()
        if self.reverse is not None:
            self.reverse.pool.closeAll()
        # Let the aborts run their connectionLost before reporting stopped; a tunnel that
        # cannot flush (its reader stopped reading) is cut off by its splice in ABORT_GRACE.
        deadline = self.reactor.seconds() + ABORT_GRACE + 0.5
        while rt.connections and self.reactor.seconds() < deadline:
            yield task.deferLater(self.reactor, 0.01, lambda: None)
        if workersStopped is not None:
            yield workersStopped
        if self.exitOnListenFailure and exitSignal(self.reactor) in (signal.SIGTERM, signal.SIGINT):
            # Run by twistd (the only caller that owns the process): SIGTERM/SIGINT asked
            # for this drained stop, which is a clean exit (status 0), not a death by signal.
            clearExitSignal(self.reactor)
        if self._logFile is not None:
            self._logFile.flush()
            self._logFile.close()
            self._logFile = None


#: Listen backlog when the endpoint string names none. Twisted's default (50) drops the SYNs
#: of a burst of new connections (or of clients arriving during a slowloris), and each
#: dropped SYN costs its client a one-second retransmission; the kernel caps this at
#: net.core.somaxconn anyway.
LISTEN_BACKLOG = 1024
_BACKLOG_ENDPOINTS = ("tcp:", "tcp6:", "ssl:", "unix:")


def _withBacklog(description: str) -> str:
    lowered = description.lower()
    if lowered.startswith(_BACKLOG_ENDPOINTS) and "backlog=" not in lowered:
        return f"{description}:backlog={LISTEN_BACKLOG}"
    return description


def makeService(config: Config | str | None = None, reactor=None, **kwargs) -> GatewayService:
    """
    Build the proxy service from a L{Config}, a path to an INI file, or None (the built-in
    defaults). Nothing listens until the service is started.
    """
    if not isinstance(config, Config):
        config = loadConfig(config)
    return GatewayService(config, reactor, **kwargs)
