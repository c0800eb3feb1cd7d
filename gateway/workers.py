"""
Several reactor processes on the same listening sockets: ``[proxy] workers = N``.

The process twistd runs is the master, and serves too (worker 0). For each proxy listener
it binds N sockets to the same address with SO_REUSEPORT, so the kernel spreads new
connections over N accept queues; it adopts one and hands one to each worker process
(``python -m gateway.worker``, L{gateway.worker}) as an inherited file descriptor. Binding
everything in the master means a port in use fails start-up before any worker exists,
``tcp:0`` gives one port for all, and a restarted worker takes over the very socket (and
the connections queued on it) of the one that died. The master loads or creates the MITM
CA before it starts any worker, and the workers load the same files.

Master and worker talk over the worker's standard streams, in length-prefixed frames:

- master -> worker (stdin): the start-up payload (pickled), then C{M} (send your metrics)
  or C{H} (SIGHUP, once the master's own reload succeeded: re-read the configuration file
  and apply it, as the master did).
- worker -> master (stdout): C{R} (serving), C{M} + its Prometheus text exposition,
  C{L} + one log event as JSON, which the master logs (its system tagged C{,workerN}),
  access lines included, so there is one log whatever its destination.
- worker stderr: anything printed outside the log (a traceback before logging starts).

A worker drains and exits on SIGTERM, and when its stdin closes (the master is gone). The
master's /metrics asks every worker for its exposition and adds them to its own, sample by
sample (L{mergedMetricsHandler}): one scrape shows the totals. Three kinds of figure are not
added up, since a sum would mean nothing: the standard C{process_*} metrics (start time,
memory, file descriptors of each process) keep one series per process with a C{worker}
label ("0" is the master); C{proxygate_build_info} (the same in every process) and
C{proxygate_config_reloads_total} (a SIGHUP is one reload of the service, which the master
counts) are the master's.
"""

from __future__ import annotations

import json
import os
import pickle
import site
import socket
import struct
import sys
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import attrs
from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, error, protocol, task
from twisted.internet.abstract import isIPv6Address
from twisted.logger import Logger, LogLevel, globalLogPublisher

from .config import Config
from .metrics import expose
from .tls.groups import childEnvironment

if TYPE_CHECKING:
    from .http1.parse import RequestHead
    from .metricsserver import Answer, Handler

__all__ = [
    "FrameReader",
    "InheritedListener",
    "SharedListener",
    "WorkerPool",
    "frame",
    "mergeExpositions",
    "mergedMetricsHandler",
    "workerConfig",
]

#: Seconds before a worker that died is started again.
RESTART_DELAY = 1.0
#: At most this many restarts of one worker within RESTART_WINDOW seconds; then it stays down.
MAX_RESTARTS = 5
RESTART_WINDOW = 60.0
#: Seconds a scrape waits for a worker's figures; a worker that does not answer is left out.
SCRAPE_TIMEOUT = 2.0

_LENGTH = struct.Struct("!I")


def frame(payload: bytes) -> bytes:
    return _LENGTH.pack(len(payload)) + payload


class FrameReader:
    """Cuts a byte stream into the frames L{frame} made, and hands each to C{onFrame}."""

    def __init__(self, onFrame: Callable[[bytes], None]) -> None:
        self.onFrame = onFrame
        self.buffer = bytearray()

    def feed(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        while len(buffer) >= 4:
            (size,) = _LENGTH.unpack_from(buffer)
            if len(buffer) < 4 + size:
                break
            payload = bytes(buffer[4 : 4 + size])
            del buffer[: 4 + size]
            self.onFrame(payload)


# -- listening sockets ---------------------------------------------------------------------------


class _Listener:
    """
    What a TCP server endpoint asks of a reactor (listenTCP), with another way to get the
    listening socket. An ssl: listener (L{gateway.tls.listener}) is TLS over listenTCP, so
    it shares sockets the same way.
    """

    def __init__(self, reactor) -> None:
        self.reactor = reactor

    def _adopt(self, sock: socket.socket, factory):
        try:
            return self.reactor.adoptStreamPort(sock.fileno(), sock.family, factory)
        finally:
            sock.close()  # the port listens on a duplicate


def bindShared(interface: str, port: int, backlog: int, count: int) -> list[socket.socket]:
    """
    C{count} listening sockets on one address, all with SO_REUSEPORT. A first probe bind
    without SO_REUSEPORT makes a port that anything holds (another proxygate with workers
    included) an error, as it is with one process, and picks the port for C{tcp:0}.
    """
    family = socket.AF_INET6 if isIPv6Address(interface) else socket.AF_INET
    sockets: list[socket.socket] = []
    try:
        if family == socket.AF_INET6:
            address = socket.getaddrinfo(
                interface, port, family, socket.SOCK_STREAM, 0, socket.AI_NUMERICHOST
            )[0][4]
        else:
            address = (interface, port)
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
            address = probe.getsockname()
        for _ in range(count):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(address)
            sock.listen(backlog)
            sock.setblocking(False)
    except OSError as e:
        for sock in sockets:
            sock.close()
        raise error.CannotListenError(interface, port, e) from None
    return sockets


class SharedListener(_Listener):
    """
    The master's: binds one socket per process on each listener's address, adopts the
    first and keeps the others, C{spares[i]} being worker i+1's, one per listener in order.
    """

    def __init__(self, reactor, count: int) -> None:
        super().__init__(reactor)
        self.spares: list[list[socket.socket]] = [[] for _ in range(count - 1)]

    def listenTCP(self, port, factory, backlog=50, interface=""):
        first, *others = bindShared(interface, port, backlog, len(self.spares) + 1)
        for spare, sock in zip(self.spares, others, strict=True):
            spare.append(sock)
        return self._adopt(first, factory)

    def close(self, index: int | None = None) -> None:
        """
        Close the master's copies of worker C{index}'s sockets (all workers' when None):
        once its worker has closed its own too, the kernel stops queueing connections there.
        """
        for number, spare in enumerate(self.spares, 1):
            if index is None or index == number:
                for sock in spare:
                    sock.close()
                spare.clear()


class InheritedListener(_Listener):
    """A worker's: adopts the sockets the master passed down, one per listener in order."""

    def __init__(self, reactor, fds: list[int]) -> None:
        super().__init__(reactor)
        self.fds = list(fds)

    def listenTCP(self, port, factory, backlog=50, interface=""):
        return self._adopt(socket.socket(fileno=self.fds.pop(0)), factory)


# -- metrics -------------------------------------------------------------------------------------


#: Families that describe the service as a whole: the master's value is the value.
MASTER_ONLY = frozenset({"proxygate_build_info", "proxygate_config_reloads"})
#: Families that describe one process: one series per process (a C{worker} label).
PER_PROCESS_PREFIX = "process_"
#: Gauges that are a state every process has of its own, not a count to add up: each
#: process runs its own health checks and passive marking of the inbound gateway's backends,
#: so a backend is shown up (1) only while every process takes it, and down (0) as soon as
#: one has marked it down.
_LOWEST = frozenset({"proxygate_backend_up"})


def mergeExpositions(texts: list[str], processes: list[str] | None = None) -> list[Metric]:
    """
    Prometheus text expositions of several processes as one: samples with the same name
    and labels are added (counters, histogram buckets, sums and counts, and the gauges,
    which count open connections and tunnels), but for the state gauges of L{_LOWEST},
    which keep the lowest value; C{_created} timestamps keep the earliest.
    The first text is the master's: L{MASTER_ONLY} families are taken from it alone. With
    C{processes} (a name per text), C{process_*} samples get a C{worker} label instead of
    being added.
    """
    merged: dict[tuple[str, str], tuple[Metric, dict]] = {}
    for position, text in enumerate(texts):
        for family in text_string_to_metric_families(text):
            if position and family.name in MASTER_ONLY:
                continue
            extra = {}
            if processes is not None and family.name.startswith(PER_PROCESS_PREFIX):
                extra = {"worker": processes[position]}
            key = (family.name, family.type)
            if key not in merged:
                merged[key] = (Metric(family.name, family.documentation, family.type), {})
            samples = merged[key][1]
            for sample in family.samples:
                labels = {**sample.labels, **extra} if extra else sample.labels
                sampleKey = (sample.name, tuple(sorted(labels.items())))
                seen = samples.get(sampleKey)
                if seen is None:
                    samples[sampleKey] = (labels, sample.value)
                elif sample.name.endswith("_created") or sample.name in _LOWEST:
                    samples[sampleKey] = (seen[0], min(seen[1], sample.value))
                else:
                    samples[sampleKey] = (seen[0], seen[1] + sample.value)
    families = []
    for metric, samples in merged.values():
        for (name, _), (labels, value) in samples.items():
            metric.add_sample(name, labels, value)
        families.append(metric)
    return families


class _Families:
    """A registry stand-in for the encoders: collect() gives ready families."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self):
        return iter(self.families)


_UNAVAILABLE = (500, b"text/plain; charset=utf-8", b"metrics unavailable, see the log\n")


def mergedMetricsHandler(registry, pool: WorkerPool) -> Handler:
    """
    The master's scrape route with workers: its own figures plus every worker's that
    answers within SCRAPE_TIMEOUT, so the answer is a Deferred. A failure to merge is
    logged here (it says what failed) and answered with a 500.
    """

    def scrape(head: RequestHead) -> defer.Deferred[Answer]:
        own = generate_latest(registry).decode("utf-8")

        def render(texts: list[str | None]) -> Answer:
            answered = [(str(i), text) for i, text in enumerate(texts, 1) if text is not None]
            families = mergeExpositions(
                [own, *(text for _, text in answered)], ["0", *(i for i, _ in answered)]
            )
            families += pool.families(processes=1 + len(answered))
            return (200, *expose(head, _Families(families)))

        def failed(failure) -> Answer:
            pool.log.failure("merging the workers' metrics", failure)
            return _UNAVAILABLE

        return pool.scrape().addCallback(render).addErrback(failed)

    return scrape


# -- the worker processes ------------------------------------------------------------------------


def workerConfig(config: Config) -> Config:
    """
    What a worker runs: the master's configuration as one process, without a metrics
    listener (the master serves the totals), its access lines sent to the master's log.
    """
    return attrs.evolve(
        config,
        proxy=attrs.evolve(config.proxy, workers=1),
        metrics=attrs.evolve(config.metrics, listen=()),
        log=attrs.evolve(config.log, access_log=None if config.log.access_log is None else "-"),
    )


def _childEnvironment() -> dict[str, str]:
    """
    The master's environment; the folder holding the C{gateway} package is added to
    PYTHONPATH (last) when a plain C{python -m gateway.worker} would not find it.
    """
    env = childEnvironment(dict(os.environ))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    known = {os.path.abspath(p) for p in [*paths, os.getcwd(), *site.getsitepackages()]}
    if site.ENABLE_USER_SITE:
        known.add(os.path.abspath(site.getusersitepackages()))
    if root not in known:
        env["PYTHONPATH"] = os.pathsep.join([*paths, root])
    return env


class _WorkerProcess(protocol.ProcessProtocol):
    """One run of one worker: its pipes, its pending scrapes, its end."""

    def __init__(self, slot: _Slot, payload: bytes) -> None:
        self.slot = slot
        self.payload = payload
        self.pid: int | None = None
        self.ready = False
        self.listening = True  # its stdin is open
        self.exited = False
        self.pending: deque[defer.Deferred] = deque()
        self.frames = FrameReader(self.frameReceived)
        self.errors = b""

    def connectionMade(self) -> None:
        self.pid = self.transport.pid
        self.transport.writeToChild(0, frame(self.payload))

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == 1:
            self.frames.feed(data)
        elif childFD == 2:
            self.errors += data
            *lines, self.errors = self.errors.split(b"\n")
            for line in lines:
                self.printed(line)

    def printed(self, line: bytes) -> None:
        self.slot.pool.log.warn(
            "proxygate worker {index} (pid {pid}): {line}",
            index=self.slot.index,
            pid=self.pid,
            line=line.decode("utf-8", "replace").rstrip(),
        )

    def childConnectionLost(self, childFD: int) -> None:
        if childFD == 0:
            self.listening = False
        elif childFD == 2 and self.errors:
            self.printed(self.errors)
            self.errors = b""

    def frameReceived(self, payload: bytes) -> None:
        kind, body = payload[:1], payload[1:]
        if kind == b"L":
            self.slot.pool.relayLog(self.slot.index, json.loads(body))
        elif kind == b"M":
            while self.pending:
                d = self.pending.popleft()
                if not d.called:  # else it timed out: this is its late answer
                    d.callback(body.decode("utf-8"))
                    break
        elif kind == b"R":
            self.ready = True
            self.slot.pool.log.info(
                "proxygate worker {index} (pid {pid}) serving", index=self.slot.index, pid=self.pid
            )

    def send(self, message: bytes) -> None:
        if self.listening:
            self.transport.writeToChild(0, frame(message))

    def scrape(self, reactor) -> defer.Deferred:
        if not (self.ready and self.listening):
            return defer.succeed(None)
        d = defer.Deferred()
        self.pending.append(d)
        self.send(b"M")
        d.addTimeout(SCRAPE_TIMEOUT, reactor, onTimeoutCancel=lambda result, timeout: None)
        return d

    def processEnded(self, reason) -> None:
        self.exited = True
        self.listening = False
        while self.pending:
            d = self.pending.popleft()
            if not d.called:
                d.callback(None)
        self.slot.ended(self, reason)


class _Slot:
    """Worker number C{index}: its sockets stay with the master; its process may be restarted."""

    def __init__(self, pool: WorkerPool, index: int) -> None:
        self.pool = pool
        self.index = index
        self.process: _WorkerProcess | None = None
        self.starts: deque[float] = deque()
        self.restartCall = None

    @property
    def alive(self) -> bool:
        return self.process is not None and not self.process.exited

    def spawn(self) -> None:
        self.restartCall = None
        pool = self.pool
        sockets = pool.listener.spares[self.index - 1]
        fds = list(range(3, 3 + len(sockets)))
        payload = pool.payload(self.index, fds)
        self.starts.append(pool.reactor.seconds())
        childFDs: dict[int, int | str] = {0: "w", 1: "r", 2: "r"}
        childFDs.update({fd: sock.fileno() for fd, sock in zip(fds, sockets, strict=True)})
        self.process = _WorkerProcess(self, payload)
        pool.reactor.spawnProcess(
            self.process,
            sys.executable,
            [sys.executable, "-m", "gateway.worker", str(self.index)],
            env=_childEnvironment(),
            childFDs=childFDs,
        )

    def ended(self, process: _WorkerProcess, reason) -> None:
        pool = self.pool
        if pool.stopping:
            return
        now = pool.reactor.seconds()
        while self.starts and self.starts[0] < now - RESTART_WINDOW:
            self.starts.popleft()
        status = reason.value
        if len(self.starts) > MAX_RESTARTS:
            pool.log.critical(
                "proxygate worker {index} (pid {pid}) ended ({status}); restarted too often "
                "(over {max} times in {window:.0f} s): left down, its share of the listening "
                "sockets closed",
                index=self.index,
                pid=process.pid,
                status=status,
                max=MAX_RESTARTS,
                window=RESTART_WINDOW,
            )
            pool.listener.close(self.index)
            return
        pool.log.error(
            "proxygate worker {index} (pid {pid}) ended ({status}); restarting in {delay} s",
            index=self.index,
            pid=process.pid,
            status=status,
            delay=RESTART_DELAY,
        )
        pool.restarts += 1
        self.restartCall = pool.reactor.callLater(RESTART_DELAY, self.spawn)


class WorkerPool:
    """
    The master's side of ``workers = N``: the shared sockets, N-1 worker processes (started,
    restarted when they die, stopped with the service), their metrics and their log.
    """

    log = Logger(namespace="proxygate.workers")

    def __init__(self, service, count: int) -> None:
        self.service = service
        self.reactor = service.reactor
        self.listener = SharedListener(self.reactor, count)
        self.slots = [_Slot(self, index) for index in range(1, count)]
        self.selfAddresses: frozenset = frozenset()
        self.stopping = False
        self.restarts = 0

    def payload(self, index: int, fds: list[int]) -> bytes:
        return pickle.dumps(
            {
                "index": index,
                # The service's configuration now: a worker restarted after a reload runs
                # the reloaded one.
                "config": workerConfig(self.service.config),
                "fds": fds,
                "selfAddresses": self.selfAddresses,
                "drainGrace": self.service.drainGrace,
            }
        )

    def start(self, selfAddresses) -> None:
        """Start the workers, once the master listens (and knows every address it serves)."""
        self.selfAddresses = frozenset(selfAddresses)
        self.stopping = False
        for slot in self.slots:
            slot.spawn()

    def scrape(self) -> defer.Deferred:
        """Every worker's exposition text, None for one that did not answer in time."""
        return defer.gatherResults(
            [
                slot.process.scrape(self.reactor) if slot.alive else defer.succeed(None)
                for slot in self.slots
            ]
        )

    def families(self, processes: int) -> list[Metric]:
        return [
            GaugeMetricFamily(
                "proxygate_workers",
                "Processes serving the proxy whose figures this scrape includes (master too).",
                value=processes,
            ),
            CounterMetricFamily(
                "proxygate_worker_restarts",
                "Worker processes restarted after they ended unexpectedly.",
                value=self.restarts,
            ),
        ]

    def relayLog(self, index: int, record: dict) -> None:
        """A worker's log event, into the master's log (access lines into its access log)."""
        event = {
            "log_time": record["t"],
            "log_namespace": record["n"],
            "log_level": LogLevel.levelWithName(record["l"]),
            "log_system": f"{record['s']},worker{index}",
            "log_format": "{text}",
            "text": record["x"],
            "worker": index,
        }
        accessFile = self.service.runtime.accessLogFile
        if record["n"] == "proxygate.access" and accessFile is not None:
            accessFile.observe(event)
        else:
            globalLogPublisher(event)

    def hangup(self) -> None:
        for slot in self.slots:
            if slot.alive:
                slot.process.send(b"H")

    @defer.inlineCallbacks
    def stop(self):
        """
        SIGTERM every worker (each drains as the master does) and wait for them, at most
        the drain grace and a little more; then SIGKILL what is left.
        """
        self.stopping = True
        self.listener.close()
        for slot in self.slots:
            if slot.restartCall is not None and slot.restartCall.active():
                slot.restartCall.cancel()
            self._signal(slot, "TERM")
        yield self._exited(self.service.drainGrace + self.service.abortGrace + 5.0)
        for slot in self.slots:
            if slot.alive:
                self.log.warn(
                    "proxygate worker {index} (pid {pid}) did not stop: killed",
                    index=slot.index,
                    pid=slot.process.pid,
                )
                self._signal(slot, "KILL")
        yield self._exited(2.0)

    @defer.inlineCallbacks
    def _exited(self, seconds: float):
        deadline = self.reactor.seconds() + seconds
        while any(slot.alive for slot in self.slots) and self.reactor.seconds() < deadline:
            yield task.deferLater(self.reactor, 0.05, lambda: None)

    @staticmethod
    def _signal(slot: _Slot, name: str) -> None:
        if slot.alive:
            try:
                slot.process.transport.signalProcess(name)
            except error.ProcessExitedAlready:
                pass
