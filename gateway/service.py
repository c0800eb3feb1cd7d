"""
The proxy as a Twisted service: what `twistd proxygate` runs, and what an existing Twisted
application attaches with C{makeService(config).setServiceParent(application)}.

The service owns everything it opens: the proxy listeners, the metrics listener, every
client and origin connection, the access log file. Stopping it stops accepting, lets
exchanges in flight finish and tunnels run for a grace period, then closes what is left.
"""

from __future__ import annotations

import signal

from twisted.application.service import MultiService
from twisted.internet import defer, task
from twisted.logger import Logger

from .accesslog import AccessLog, fileObserver
from .config import Config, ConfigError, loadConfig, serverEndpoint
from .metrics import Metrics, metricsHandler
from .metricsserver import Handler, MetricsServerFactory, routePath, staticHandler
from .proxy.client import ClientFactory
from .proxy.runtime import Runtime
from .proxy.tunnel import ABORT_GRACE
from .tls.groups import checkGroups

__all__ = ["GatewayService", "ListenError", "makeService"]


class ListenError(Exception):
    """A configured listener could not be opened (address in use, permission...)."""


class GatewayService(MultiService):
    """
    @ivar runtime: what the connections share (metrics, pool, policies).
    @ivar ports: the listening ports once started, proxy listeners first.
    @ivar proxyPorts, metricsPorts: the same, split by role.
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
        self.config = config
        self.reactor = reactor
        self.drainGrace = drainGrace
        self.exitOnListenFailure = exitOnListenFailure
        self.metrics = Metrics()
        self.proxyPorts: list = []
        self.metricsPorts: list = []
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
        return self.proxyPorts + self.metricsPorts

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
        if self.config.usesTLS():
            # Under twistd the process was started so that this holds (see the plugin);
            # an application embedding the service is told when it does not.
            checkGroups()

    def _listen(self) -> None:
        """
        Open every listener now, synchronously: a proxy that says it started must be
        listening, and a port in use must fail start-up with one clear line.
        """
        factory = ClientFactory(self.runtime)
        for description in self.config.proxy.listen:
            self.proxyPorts.append(self._listenOne(description, factory, self.listenReactor))
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
        return ds

    def hangup(self) -> None:
        """SIGHUP: re-read the htpasswd file, here and in the worker processes."""
        if self.authenticator is not None:
            self.authenticator.reload()
        if self.workers is not None:
            self.workers.hangup()

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
            if conn.splice is not None:
                conn.splice.abort()
            else:
                conn.transport.abortConnection()
        rt.pool.closeAll()
        # Let the aborts run their connectionLost before reporting stopped; a tunnel that
        # cannot flush (its reader stopped reading) is cut off by its splice in ABORT_GRACE.
        deadline = self.reactor.seconds() + ABORT_GRACE + 0.5
        while rt.connections and self.reactor.seconds() < deadline:
            yield task.deferLater(self.reactor, 0.01, lambda: None)
        if workersStopped is not None:
            yield workersStopped
        if self.exitOnListenFailure and getattr(self.reactor, "_exitSignal", None) in (
            signal.SIGTERM,
            signal.SIGINT,
        ):
            # Run by twistd (the only caller that owns the process): SIGTERM/SIGINT asked
            # for this drained stop, which is a clean exit (status 0), not a death by signal
            # (twistd >= 20.3 re-raises the signal it stopped on unless this is cleared).
            self.reactor._exitSignal = None
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
