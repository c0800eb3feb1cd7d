"""
Tests for gateway.seam.dispatchDirectly: a private epoll reactor (not the one the other tests
run on), driven by hand with iterate(), over real loopback sockets.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
from twisted.internet import protocol
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.selectreactor import SelectReactor
from twisted.logger import globalLogPublisher
from twisted.python import context, log

from gateway.seam import dispatchDirectly
from tests.support import REPO


class Recorder(protocol.Protocol):
    """Echoes, and notes the legacy log context it was called in; 'boom' raises."""

    def dataReceived(self, data):
        self.factory.systems.append(context.get(log.ILogContext, {}).get("system"))
        if data == b"boom":
            raise RuntimeError("handler failure")
        self.transport.write(data.upper())


class RecorderFactory(protocol.Factory):
    protocol = Recorder

    def __init__(self):
        self.systems = []


def _serve(reactor):
    factory = RecorderFactory()
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    return factory, port.getHost().port


def _roundTrip(reactor, portNumber, payload: bytes) -> bytes:
    """Send payload, iterate the reactor until an answer or EOF arrives (bounded)."""
    peer = socket.create_connection(("127.0.0.1", portNumber), timeout=5)
    peer.setblocking(False)
    try:
        peer.sendall(payload)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            reactor.iterate(0.01)
            try:
                return peer.recv(1024)
            except BlockingIOError:
                continue
        raise AssertionError("no answer within 5 s")
    finally:
        peer.close()


@pytest.fixture
def epoll():
    reactor = EPollReactor()
    yield reactor
    for selectable in list(reactor.getReaders()) + list(reactor.getWriters()):
        reactor.removeReader(selectable)
        reactor.removeWriter(selectable)
        if hasattr(selectable, "socket"):
            selectable.socket.close()
    reactor._poller.close()
    for fd in reactor._internalReaders:
        fd.connectionLost(None)


def test_twistedDispatchSetsALogContext(epoll):
    """The cost this module removes: Twisted tags every event with the protocol's prefix."""
    factory, portNumber = _serve(epoll)
    assert _roundTrip(epoll, portNumber, b"abc") == b"ABC"
    assert factory.systems == ["Recorder,0,127.0.0.1"]


def test_directDispatchDeliversWithoutTheContext(epoll):
    assert dispatchDirectly(epoll)
    factory, portNumber = _serve(epoll)
    assert _roundTrip(epoll, portNumber, b"abc") == b"ABC"
    assert _roundTrip(epoll, portNumber, b"again") == b"AGAIN"
    assert factory.systems == ["-", "-"]  # the default: legacy lines say [-]


def test_directDispatchLogsAFailingHandlerAndServesOn(epoll):
    """A raising dataReceived is logged and drops its connection only."""
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        assert dispatchDirectly(epoll)
        _, portNumber = _serve(epoll)
        assert _roundTrip(epoll, portNumber, b"boom") == b""  # closed: EOF
        assert _roundTrip(epoll, portNumber, b"next") == b"NEXT"
    finally:
        globalLogPublisher.removeObserver(events.append)
    # log.err (legacy) inside _doReadOrWrite: its event holds the failure as "failure"
    failures = [e.get("log_failure") or e.get("failure") for e in events]
    assert any(f is not None and f.check(RuntimeError) for f in failures)


def test_otherReactorsAreLeftAlone():
    reactor = SelectReactor()
    try:
        before = reactor.doIteration
        assert not dispatchDirectly(reactor)
        assert reactor.doIteration == before
    finally:
        for fd in reactor._internalReaders:
            fd.connectionLost(None)


def test_twistdPluginInstallsIt(tmp_path):
    """`twistd proxygate` builds its service through the plugin, which switches the loop."""
    script = (
        "from twisted.internet import epollreactor; epollreactor.install()\n"
        "from twisted.plugins.proxygate import Options, serviceMaker\n"
        "options = Options(); options.parseOptions(['--metrics-listen', ''])\n"
        "serviceMaker.makeService(options)\n"
        "from twisted.internet import reactor\n"
        "print(reactor.doIteration.__qualname__)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert out.stdout.strip() == "dispatchDirectly.<locals>.doIteration", out.stderr
