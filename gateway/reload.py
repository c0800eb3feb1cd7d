# -*- test-case-name: tests.test_reload -*-
"""
Reloading the configuration (SIGHUP) and reopening the access log (SIGHUP and SIGUSR1),
as Squid's C{-k reconfigure} and nginx's C{-s reload} do, without dropping a connection.

A reload reads the INI file again (with the command-line overrides it was started with),
builds every object the request path uses from it (L{gateway.proxy.runtime.Settings.build},
the code start-up runs), and only when all of that worked swaps them in
(L{gateway.proxy.runtime.Runtime.apply}). Requests and tunnels already under way keep
what they started with; new ones see the new rules. Anything wrong keeps the running
configuration whole, logs one line naming the file, section and key, and counts
C{proxygate_config_reloads_total{result="error"}}.

Listeners (C{[proxy] listen}, C{workers}, C{[metrics]}) are sockets bound at start: a
change to them is logged as needing a restart, and the running ones stay.

Signals: L{SignalHandlers} routes SIGHUP and SIGUSR1 to the service. A process twistd runs
for proxygate (or a worker) is the service's own, and gets them whatever was there (a
handler already installed, such as twistd's SIGUSR1 log rotation, is still called after
ours). An application embedding the service owns its signals: the service only takes a
signal whose action is still the default, which for both is to kill the process (the
reason an embedded ``.tac`` used to die on SIGHUP); the host may call C{reload()} itself.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable

import attrs
from twisted.logger import Logger

from .config import Config, ConfigError, loadConfig, refuseOpenProxy
from .proxy.runtime import Settings

__all__ = ["RESTART_KEYS", "Reloader", "SignalHandlers", "keepListeners"]

#: What a reload cannot change: sockets bound at start.
RESTART_KEYS = (
    ("proxy", "listen"),
    ("proxy", "workers"),
    ("metrics", "listen"),
    ("metrics", "path"),
)


def keepListeners(fresh: Config, running: Config) -> tuple[Config, list[str]]:
    """C{fresh} with C{running}'s listeners, and the names of the keys that differed."""
    changed = [
        f"[{section}] {key}"
        for section, key in RESTART_KEYS
        if getattr(getattr(fresh, section), key) != getattr(getattr(running, section), key)
    ]
    kept = attrs.evolve(
        fresh,
        proxy=attrs.evolve(fresh.proxy, listen=running.proxy.listen, workers=running.proxy.workers),
        metrics=running.metrics,
    )
    return kept, changed


class Reloader:
    """
    The reload of one service. C{prepare} shapes a configuration read from the file for
    this process (a worker runs the master's configuration as one process: see
    L{gateway.workers.workerConfig}).
    """

    log = Logger(namespace="proxygate")

    def __init__(self, service, prepare: Callable[[Config], Config] = lambda config: config):
        self.service = service
        self.prepare = prepare

    def reload(self) -> bool:
        """Read and apply the configuration file; True if it was applied."""
        service = self.service
        rt = service.runtime
        running: Config = service.config
        where = running.path or "<defaults>"
        try:
            fresh = self.prepare(loadConfig(running.path, overrides=dict(running.overrides)))
            fresh, changed = keepListeners(fresh, running)
            refuseOpenProxy(fresh, where)
            settings = Settings.build(fresh, rt)
        except ConfigError as e:
            rt.metrics.configReloads.labels("error").inc()
            self.log.error(
                "proxygate: configuration not reloaded, the running one is kept: {error}",
                error=str(e),
            )
            return False
        if changed:
            self.log.warn(
                "proxygate: {keys} changed in {path}: restart proxygate to apply; "
                "still listening as before",
                keys=", ".join(changed),
                path=where,
            )
        previous = rt.settings
        rt.apply(settings)
        service.reloadRoutes(fresh)  # the inbound gateway's routes, if it runs
        service.config = fresh
        previous.release(settings)
        # Pooled origin connections were dialled under the old rules (an address newly
        # denied, another upstream): new requests get new connections.
        rt.pool.closeAll()
        rt.metrics.configReloads.labels("ok").inc()
        self.log.info("proxygate: configuration reloaded from {path}", path=where)
        return True


class SignalHandlers:
    """
    SIGHUP -> C{onHangup}, SIGUSR1 -> C{onUser1}, run on the reactor's next turn (a signal
    may interrupt it anywhere). C{owned}: the process is the service's (see the module
    docstring). L{uninstall} puts back what was there, if ours is still installed.
    """

    def __init__(self, reactor, onHangup: Callable[[], None], onUser1: Callable[[], None]):
        self.reactor = reactor
        self.actions = {
            getattr(signal, "SIGHUP", None): onHangup,
            getattr(signal, "SIGUSR1", None): onUser1,
        }
        self.actions.pop(None, None)
        self.installed: dict[int, tuple[object, object]] = {}  # signum: (ours, previous)

    def install(self, owned: bool) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread may set handlers; the host's business then
        for signum, action in self.actions.items():
            current = signal.getsignal(signum)
            if current is not signal.SIG_DFL and not owned:
                continue
            handler = self._handler(action, current if callable(current) else None)
            signal.signal(signum, handler)
            self.installed[signum] = (handler, current)

    def _handler(self, action: Callable[[], None], chained):
        def handle(signum, frame) -> None:
            self.reactor.callFromThread(action)
            if chained is not None:
                chained(signum, frame)

        return handle

    def uninstall(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, (ours, previous) in self.installed.items():
            if signal.getsignal(signum) is ours:
                signal.signal(signum, previous)
        self.installed.clear()
