"""
Fixtures: thin wrappers over L{tests.support}, which holds the helpers themselves.

- C{startProxy(ini, **kwargs)} starts proxygate (L{ProxyProcess}) for one test and stops it
  at teardown; C{proxy} is one shared by the read-only tests of a module.
- C{origin} is the session's plain HTTP origin, C{rawOrigin} a recording socket origin,
  C{server} makes raw TCP origins with a handler of the test's, C{sink} is an upload sink.
- C{closedPort} is a loopback port where connecting is refused, for the session;
  C{blackhole} one where connecting never completes, for a module.
"""

from __future__ import annotations

import socket

import pytest

from tests.support import (
    LOOPBACK_INI,
    Origin,
    ProxyProcess,
    RawOrigin,
    SinkOrigin,
    closedPort,
    nonAcceptingPort,
)
from tests.support.tunnel import TCPServer


@pytest.fixture
def server():
    """Raw TCP origins (L{TCPServer}) for one test; the test gives each its handler."""
    made = []

    def make(handler, host: str = "127.0.0.1", **kwargs):
        s = TCPServer(handler, host, **kwargs)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


@pytest.fixture
def startProxy(tmp_path):
    started: list[ProxyProcess] = []

    def start(ini: str = LOOPBACK_INI, **kwargs) -> ProxyProcess:
        p = ProxyProcess(tmp_path, ini, **kwargs).start()
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory):
    """A proxy for read-only tests of one module (loopback destinations allowed)."""
    p = ProxyProcess(tmp_path_factory.mktemp("proxy"), LOOPBACK_INI).start()
    yield p
    p.stop()


@pytest.fixture(scope="session")
def origin():
    o = Origin()
    yield o
    o.close()


@pytest.fixture(scope="module")
def sink():
    """An upload sink (L{SinkOrigin}) for one module."""
    s = SinkOrigin()
    yield s
    s.close()


@pytest.fixture
def rawOrigin():
    o = RawOrigin()
    yield o
    o.close()


@pytest.fixture(scope="module")
def blackhole():
    """
    A loopback port where a connection never completes (L{nonAcceptingPort}), for a module;
    checked: a kernel that still completes connections there skips the test.
    """
    with nonAcceptingPort() as port:
        probe = socket.socket()
        probe.settimeout(0.2)  # a SYN that is answered on loopback is answered at once
        try:
            probe.connect(("127.0.0.1", port))
            pytest.skip("cannot make a non-accepting loopback port on this kernel")
        except OSError:  # timed out: the SYN was dropped
            pass
        finally:
            probe.close()
        yield port


@pytest.fixture(scope="session", name="closedPort")
def closedPortFixture():
    """A loopback port where connecting is refused (bound, never listening), for the session."""
    with closedPort() as port:
        yield port
