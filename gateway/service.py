"""
The proxy as a Twisted service: what `twistd proxygate` runs, and what an existing Twisted
application attaches with C{makeService(config).setServiceParent(application)}.

The service owns everything it opens: the proxy listeners, the inbound gateway's listeners
(C{[reverse] listen}) with their routes and health checks, the metrics listener, every
client, origin and backend connection, the access log file. Stopping it stops accepting, lets
exchanges in flight finish and tunnels run for a grace period (the metrics listener still
answers, /healthz with 503), then closes what is left. L{GatewayService.reload} applies an
edited configuration file without a restart (L{gateway.reload}).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time

from twisted.application.service import MultiService
from twisted.internet import defer, task
from twisted.logger import Logger

from .accesslog import AccessRecord
from .config import Config, endpointParts, innerEndpoint, loadConfig, serverEndpoint
from .metrics import Metrics, metricsHandler
from .metricsserver import Answer, Handler, MetricsServerFactory, routePath
from .proxy.client import ClientFactory
from .proxy.runtime import Runtime
from .proxy.tunnel import ABORT_GRACE
from .proxyprotocol import ProxyHeaderFactory
from .reload import Reloader, SignalHandlers
from .seam import clearExitSignal, exitSignal
from .tls.groups import checkGroups

__all__ = ["GatewayService", "ListenError", "makeService"]


class ListenError(Exception):
    """
    A configured listener could not be opened (address in use, permission...). Its text
    is short, the reason first: a daemonizing twistd passes at most 100 bytes of a
    start-up failure to the launching process, which prints them on its stderr.
    """

    def __init__(self, description: str, error: Exception) -> None:
        socketError = getattr(error, "socketError", None)
        reason = getattr(socketError, "strerror", None) or str(error)
        super().__init__(f"{reason}: {description}")
        self.description = description
        self.detail = f"cannot listen on {description!r}: {error}"


_TEXT = b"text/plain; charset=utf-8"
_NOT_FOUND: Answer = (404, _TEXT, b"not found\n")


class GatewayService(MultiService):
    """
    @ivar runtime: what the connections share (metrics, pool, policies).
    @ivar reverse: what the inbound gateway's connections share (its routes, the backends'
        pool), or None without C{[reverse] listen}.
    @ivar ports: the listening ports once started, proxy listeners first.
    @ivar proxyPorts, metricsPorts, reversePorts: the same, split by role.
    @ivar draining: stopping: no new connections, the open ones finishing.
    @ivar exitOnListenFailure: a listener that cannot open ends the process with one line
        (twistd -n) instead of raising L{ListenError} (to its caller: an application, or a
        daemonizing twistd, which reports it to the launching process).
    @ivar ownsProcess: run by twistd or as a worker, not embedded: the process's signals
        and exit status are the service's.
    """

    log = Logger(namespace="proxygate")

    def __init__(
        self,
        config: Config,
        reactor=None,
        *,
        drainGrace: float | None = None,
        exitOnListenFailure: bool = False,
        pidfile: str | None = None,
        ownsProcess: bool = False,
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
        # [proxy] drain_grace, unless the embedding application chose one.
        self.drainGrace = config.proxy.drain_grace if drainGrace is None else drainGrace
        #: What a tunnel that cannot flush gets after the drain grace (its splice cuts it).
        self.abortGrace = ABORT_GRACE
        self.exitOnListenFailure = exitOnListenFailure
        #: A daemonizing twistd's pid file, removed before a failed start is reported.
        self.pidfile = pidfile
        self.ownsProcess = ownsProcess
        self.draining = False
        self.metrics = Metrics()
        self.proxyPorts: list = []
        self.metricsPorts: list = []
        self.reversePorts: list = []
        self.metricsFactory: MetricsServerFactory | None = None
        self._flusher = None
        self._authReloader = None
        self.runtime = Runtime(config, reactor, self.metrics)
        self.reloader = Reloader(self)
        self.signals = SignalHandlers(reactor, self.hangup, self.reopenLogs)
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

    @property
    def authenticator(self):
        """The authenticator of the running configuration (None without [auth])."""
        return self.runtime.authenticator

    @property
    def ports(self) -> list:
        return self.proxyPorts + self.metricsPorts + self.reversePorts

    def startService(self) -> None:
        super().startService()
        self.draining = False
        try:
            self._listen()
        except ListenError as e:
            if self.exitOnListenFailure:
                raise SystemExit(f"proxygate: {e.detail}")
            # Raised to the application, or to a daemonizing twistd, which passes only the
            # short text to its launcher: the whole of it goes to the log.
            self.log.critical("proxygate: {detail}", detail=e.detail)
            if self.pidfile:
                # twistd removes it only after telling the launcher, which may have returned
                # (and its caller looked for the file) by then: gone first.
                with contextlib.suppress(OSError):
                    os.remove(self.pidfile)
            raise
        addresses = set()
        for port in self.ports:
            host = port.getHost()
            addresses.add((host.host if host.host not in ("0.0.0.0", "::") else None, host.port))
        self.runtime.setSelfAddresses(addresses)
        self._flusher = self._every(1.0, self._flushAccessLog)
        # maybeReload stats at most once a second; ticking twice as often keeps a change
        # from waiting up to two seconds when a tick lands just before the throttle ends.
        self._authReloader = self._every(0.5, self._checkHtpasswd)
        self.signals.install(owned=self.ownsProcess)
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
        if self.config.usesTLS():
            # Under twistd the process was started so that this holds (see the plugin);
            # an application embedding the service is told when it does not.
            checkGroups()

    def _every(self, seconds: float, f) -> task.LoopingCall:
        call = task.LoopingCall(f)
        call.clock = self.reactor
        call.start(seconds, now=False)
        return call

    def _flushAccessLog(self) -> None:
        logFile = self.runtime.accessLogFile
        if logFile is not None:
            logFile.flush()

    def _checkHtpasswd(self) -> None:
        authenticator = self.runtime.authenticator
        if authenticator is not None:
            authenticator.maybeReload()

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
                # h2 for the browsers that offer it, http/1.1 for the rest (and WebSockets).
                alpn = ("h2", "http/1.1") if scheme == "https" and self.config.reverse.http2 else ()
                self.reversePorts.append(
                    self._listenOne(description, gateway, self.listenReactor, alpn)
                )
        if self.config.metrics.listen:
            # A slow or idle scrape connection gets what a proxy client gets for its head.
            self.metricsFactory = MetricsServerFactory(
                self._metricsRoutes(),
                timeout=self.config.proxy.header_timeout,
                reactor=self.reactor,
            )
            for description in self.config.metrics.listen:
                self.metricsPorts.append(self._listenOne(description, self.metricsFactory))

    def _listenOne(self, description: str, factory, reactor=None, alpn: tuple = ()):
        if reactor is None:
            reactor = self.reactor
        endpoint = serverEndpoint(reactor, _withBacklog(description), self._proxied, alpn)
        d = endpoint.listen(factory)
        result: list = []
        d.addBoth(result.append)
        if not result:
            raise ListenError(f"listener {description!r} did not start synchronously")
        port = result[0]
        if isinstance(port, Exception) or hasattr(port, "value"):
            error = getattr(port, "value", port)
            self._closePorts()
            raise ListenError(description, error)
        return port

    def _proxied(self, factory) -> ProxyHeaderFactory:
        """The factory of a haproxy: listener: the PROXY header is due within header_timeout."""
        return ProxyHeaderFactory(
            factory,
            clock=self.reactor,
            timeout=lambda: self.runtime.headerTimeout,
            refused=self._proxyHeaderRefused,
        )

    def _proxyHeaderRefused(self, peer, problem: str) -> None:
        """A connection closed for want of a PROXY header: counted and logged, as a refusal."""
        rt = self.runtime
        rt.metrics.denied.labels("client").inc()
        if rt.accessLog is not None:
            rt.accessLog.record(
                AccessRecord(
                    start=time.time(),
                    elapsed=0.0,
                    client=getattr(peer, "host", "-"),
                    code=0,
                    size=0,
                    method="-",
                    url="-",
                    user=None,
                    action="TCP_DENIED",
                    hierarchy="HIER_NONE/-",
                    contentType="-",
                    mode="local",
                    reason=problem,
                )
            )

    def _metricsRoutes(self) -> dict[bytes, Handler]:
        """
        What the metrics listener serves: the scrape path, /healthz, and the MITM CA while
        interception is on (looked up per request: a reload may turn it on or off).
        """
        if self.workers is None:
            scrape = metricsHandler(self.metrics.registry)
        else:
            from .workers import mergedMetricsHandler

            scrape = mergedMetricsHandler(self.metrics.registry, self.workers)
        return {
            routePath(self.config.metrics.path): scrape,
            b"/healthz": self._health,
            # Users fetch the CA to trust it: curl http://127.0.0.1:9530/ca.pem
            b"/ca.pem": self._caHandler(b"application/x-pem-file", "pem"),
            b"/ca.der": self._caHandler(b"application/x-x509-ca-cert", "der"),
        }

    def _health(self, head) -> Answer:
        """For load balancers and Kubernetes probes: 503 once draining has begun."""
        if self.draining:
            return 503, _TEXT, b"draining\n"
        return 200, _TEXT, b"ok\n"

    def _caHandler(self, contentType: bytes, form: str) -> Handler:
        def serve(head) -> Answer:
            interceptor = self.runtime.interceptor
            if interceptor is None or not interceptor.config.enabled:
                return _NOT_FOUND
            return 200, contentType, getattr(interceptor.ca, form)()

        return serve

    def _closePorts(self, metrics: bool = True) -> list:
        ports = self.proxyPorts + self.reversePorts + (self.metricsPorts if metrics else [])
        ds = [defer.maybeDeferred(p.stopListening) for p in ports]
        if self.workers is not None:
            self.workers.listener.close()
        self.proxyPorts = []
        if metrics:
            self.metricsPorts = []
        self.reversePorts = []
        return ds

    def reload(self) -> bool:
        """
        Re-read the configuration file and apply it (L{gateway.reload}); True if applied.
        Also reopens the access log file. The embedding application's way to do what SIGHUP
        does under twistd.
        """
        ok = self.reloader.reload()
        self.reopenLogs()
        return ok

    def reopenLogs(self) -> None:
        """Reopen the access log file by its name (after logrotate renamed it): SIGUSR1."""
        logFile = self.runtime.accessLogFile
        if logFile is not None:
            logFile.reopen()

    def hangup(self) -> None:
        """
        SIGHUP: reload here, then in the worker processes (each reads the file itself), only
        when it worked here: a bad file is reported once, and every process keeps running
        the same configuration.
        """
        if self.reload() and self.workers is not None:
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
        rt = self.runtime
        self.draining = True
        self.log.info(
            "proxygate draining: not accepting; {count} connections get {grace} s to finish",
            count=len(rt.connections),
            grace=self.drainGrace,
        )
        self.signals.uninstall()
        workersStopped = self.workers.stop() if self.workers is not None else None
        # The metrics listener stays open while draining: /healthz says 503 to the probes.
        yield defer.DeferredList(self._closePorts(metrics=False))
        for timer in (self._flusher, self._authReloader):
            if timer is not None and timer.running:
                timer.stop()
        for conn in list(rt.connections):
            conn.drain()
        deadline = self.reactor.seconds() + self.drainGrace
        while rt.connections and self.reactor.seconds() < deadline:
            yield task.deferLater(self.reactor, 0.05, lambda: None)
        for conn in list(rt.connections):
            conn.shutdown()
        rt.pool.closeAll()
        if rt.h2pool is not None:
            rt.h2pool.closeAll()
        if self.reverse is not None:
            self.reverse.pool.closeAll()
        # Let the aborts run their connectionLost before reporting stopped; a tunnel that
        # cannot flush (its reader stopped reading) is cut off by its splice in ABORT_GRACE.
        deadline = self.reactor.seconds() + ABORT_GRACE + 0.5
        while rt.connections and self.reactor.seconds() < deadline:
            yield task.deferLater(self.reactor, 0.01, lambda: None)
        if workersStopped is not None:
            yield workersStopped
        yield defer.DeferredList(self._closePorts())
        if self.metricsFactory is not None:
            # Scrapers keep their connections alive: close them, after any answer under way.
            self.metricsFactory.closeConnections()
        if self.ownsProcess and exitSignal(self.reactor) in (signal.SIGTERM, signal.SIGINT):
            # Run by twistd (the only caller that owns the process): SIGTERM/SIGINT asked
            # for this drained stop, which is a clean exit (status 0), not a death by signal.
            clearExitSignal(self.reactor)
        rt.close()


#: Listen backlog when the endpoint string names none. Twisted's default (50) drops the SYNs
#: of a burst of new connections (or of clients arriving during a slowloris), and each
#: dropped SYN costs its client a one-second retransmission; the kernel caps this at
#: net.core.somaxconn anyway.
LISTEN_BACKLOG = 1024
_BACKLOG_ENDPOINTS = ("tcp:", "tcp6:", "ssl:", "unix:")


def _withBacklog(description: str) -> str:
    lowered = innerEndpoint(description).lower()
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
