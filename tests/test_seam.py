"""
gateway.seam: the one module that reaches into Twisted's private internals. On the Twisted
setup.cfg pins, every shape it relies on is there; on one that moved, this fails loudly
(and the fast paths fall back to Twisted's public API, slower but correct).
"""

from __future__ import annotations

import socket

import pytest
from twisted.internet.abstract import FileDescriptor
from twisted.internet.testing import StringTransport

from gateway import seam


def test_installedTwistedHasEveryShape() -> None:
    """A new Twisted that changed a private shape seam.py uses must be looked at."""
    assert seam.problems() == []


def test_aMovedShapeIsReported(monkeypatch) -> None:
    monkeypatch.delattr(FileDescriptor, "dataBuffer")
    assert "twisted.internet.tcp.Connection.dataBuffer" in seam.problems()


def test_writeNowTakesThePublicPathForOtherTransports() -> None:
    transport = StringTransport()
    seam.writeNow(transport, b"hello")
    assert transport.value() == b"hello"


def test_writeNowSendsAtOnceOnAnIdleTCPConnection() -> None:
    """On a plain TCP transport with nothing queued, the bytes are in the kernel on return."""
    from twisted.internet import tcp

    a, b = socket.socketpair()
    try:
        a.setblocking(False)
        transport = tcp.Connection.__new__(tcp.Connection)
        FileDescriptor.__init__(transport)
        transport.socket = a
        transport.connected = True
        transport.disconnecting = False
        seam.writeNow(transport, b"now")
        assert b.recv(10) == b"now"
        assert transport.dataBuffer == b"" and not transport._tempDataLen
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("name", ["clearExitSignal", "exitSignal"])
def test_exitSignalHelpersTolerateAnyReactor(name) -> None:
    class Plain:
        pass

    getattr(seam, name)(Plain())
