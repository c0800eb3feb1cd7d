"""
A worker process of ``[proxy] workers = N``: ``python -m gateway.worker INDEX``, started
by the master (L{gateway.workers.WorkerPool}), never by hand.

It reads its start-up payload (configuration, inherited listening sockets, the master's
addresses) from stdin, serves on the inherited sockets exactly as the master does, and
sends its log and its metrics to the master over stdout. SIGTERM drains and stops it, as
does the end of stdin (the master is gone); SIGHUP (or the master's C{H}) reloads the
configuration file, as the master does (L{gateway.reload}).
"""

from __future__ import annotations

import json
import os
import pickle
import sys

from prometheus_client import generate_latest
from twisted.internet import defer, error, protocol, task
from twisted.logger import Logger, eventAsText, globalLogBeginner
from twisted.python.failure import Failure

from .workers import FrameReader, InheritedListener, frame, workerConfig

log = Logger(namespace="proxygate.workers")


def _readFrame(fd: int) -> bytes:
    """One frame, read without buffering ahead (the rest of stdin is the reactor's)."""

    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = os.read(fd, n - len(data))
            if not chunk:
                raise SystemExit("proxygate worker: the master closed the pipe before start-up")
            data += chunk
        return data

    return exactly(int.from_bytes(exactly(4), "big"))


class _Master(protocol.Protocol):
    """The pipes to the master: its requests on stdin, our frames on stdout."""

    def __init__(self, reactor) -> None:
        self.reactor = reactor
        self.service = None
        self.frames = FrameReader(self.frameReceived)
        self.connected = False
        self.stopping = False

    def connectionMade(self) -> None:
        self.connected = True

    def send(self, payload: bytes) -> None:
        if self.connected:
            self.transport.write(frame(payload))

    def dataReceived(self, data: bytes) -> None:
        self.frames.feed(data)

    def frameReceived(self, payload: bytes) -> None:
        if self.service is None:
            return
        if payload == b"M":
            self.send(b"M" + generate_latest(self.service.metrics.registry))
        elif payload == b"H":
            self.service.reload()

    def connectionLost(self, reason) -> None:
        self.connected = False
        if not self.stopping:  # the master is gone: stop (draining) too
            try:
                self.reactor.stop()
            except error.ReactorNotRunning:  # already stopping (SIGTERM)
                pass

    @defer.inlineCallbacks
    def close(self):
        """Send what is still buffered (the last log lines), then close the pipes."""
        if self.connected:
            self.transport.loseConnection()
        deadline = self.reactor.seconds() + 2.0
        while self.connected and self.reactor.seconds() < deadline:
            yield task.deferLater(self.reactor, 0.01, lambda: None)

    def observe(self, event: dict) -> None:
        """A log observer: every event goes to the master, formatted here."""
        namespace = event.get("log_namespace", "-")
        level = event.get("log_level")
        levelName = level.name if level is not None else "info"
        record = {
            "t": event.get("log_time"),
            "n": namespace,
            "l": levelName,
            "s": event.get("log_system") or f"{namespace}#{levelName}",
            "x": eventAsText(event, includeTimestamp=False, includeSystem=False),
        }
        self.send(b"L" + json.dumps(record).encode("utf-8"))


def main() -> None:
    start = pickle.loads(_readFrame(0))

    from twisted.internet import reactor, stdio

    from .seam import dispatchDirectly
    from .service import GatewayService

    dispatchDirectly(reactor)

    # Frames go out on a private copy of stdout; whatever else writes to fd 1 (a stray
    # print) lands on stderr, which the master logs, instead of corrupting the frames.
    out = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    master = _Master(reactor)
    stdio.StandardIO(master, stdin=0, stdout=out, reactor=reactor)
    globalLogBeginner.beginLoggingTo([master.observe], redirectStandardIO=False)

    service = GatewayService(
        start["config"], reactor, drainGrace=start["drainGrace"], ownsProcess=True
    )
    service.listenReactor = InheritedListener(reactor, start["fds"])
    # A reload reads the master's file and runs it as the master runs its workers.
    service.reloader.prepare = workerConfig
    master.service = service
    failed: list[Failure] = []

    def run() -> None:
        try:
            service.startService()
        except Exception:
            failed.append(Failure())
            log.failure("proxygate worker {index} could not start", failed[0], index=start["index"])
            reactor.stop()
            return
        service.runtime.setSelfAddresses(start["selfAddresses"])
        master.send(b"R")

    def stop() -> defer.Deferred:
        master.stopping = True
        d = defer.maybeDeferred(service.stopService) if service.running else defer.succeed(None)
        d.addErrback(lambda failure: log.failure("proxygate worker stop", failure))
        return d.addCallback(lambda _: master.close())

    reactor.addSystemEventTrigger("before", "shutdown", stop)
    reactor.callWhenRunning(run)
    reactor.run()
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
