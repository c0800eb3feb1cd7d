# -*- test-case-name: tests.test_tls_layer -*-
"""
TLS between a Twisted transport and a protocol, on the standard library's C{ssl} module
over memory BIOs.

Why not C{twisted.protocols.tls}: on an intercepted tunnel every byte is decrypted and
encrypted again, and Twisted's layer costs more than the cryptography. It delivers one
C{dataReceived} per 16 KB record, turns every write into a reactor call that aggregates
small writes, and reaches OpenSSL through pyOpenSSL's cffi wrappers (a zeroed buffer per
C{recv}, a Python exception per "want read"). Profiled on the Datakit scenario (170 KB
POSTs through MITM), that layer was most of the proxy's CPU; the C{ssl} module's
C{SSLObject} does the same work in C, and this layer delivers every record a socket read
decrypted as one string and encrypts every write as it comes.

What it does and does not do, so callers need not look further:
 - Plaintext written before the handshake completes is kept and sent after it.
 - Flow control is the transport's: a producer is registered on the transport below (all
   writes go straight through, this layer keeps nothing back), and pausing this layer
   pauses reading from the socket.
 - A close_notify from the peer ends the connection (as Twisted's TLS does): the protocol
   sees C{connectionLost} with C{ConnectionDone}. There is no half-close; C{TLS = True}
   tells the relays so.
 - A handshake or record failure (a certificate that fails verification, an alert from the
   peer, garbage) aborts the connection; the protocol's C{connectionLost} gets the
   C{ssl.SSLError}, and L{describeFailure} turns it into one line for a 502.
 - A protocol that provides Twisted's C{IHandshakeListener} hears C{handshakeCompleted()}
   when the handshake is done, and C{negotiatedProtocol} is known from then on:
   L{AwaitHandshake} uses it to pick a connection's protocol by the ALPN the peer chose.
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Callable
from typing import Protocol as TypingProtocol

from twisted.internet import defer, error
from twisted.internet.interfaces import IHandshakeListener, IProtocol, IPushProducer, ITransport
from twisted.python.failure import Failure
from zope.interface import implementer

from ..seam import replaceProtocol, widenReads, writeNow

__all__ = [
    "AwaitHandshake",
    "TLSCreator",
    "TLSFactory",
    "TLSLayer",
    "describeFailure",
    "sslReason",
    "startTLS",
    "wrapEndpoint",
]

#: Decrypted bytes asked for per C{SSLObject.read}: more than one TLS record (16 KB), so
#: one call drains a record, and small enough that the buffer allocated per call is cheap.
_READ_SIZE = 65536


class TLSCreator(TypingProtocol):
    """Makes the C{SSLObject} for one connection (server or client side)."""

    def newTLS(self, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO) -> ssl.SSLObject: ...


class HandshakeEOF(error.ConnectionLost):
    """The peer closed the connection before the TLS handshake completed."""


@implementer(IProtocol, ITransport, IPushProducer)
class TLSLayer:
    """
    Speaks TLS on C{transport} (below) for C{protocol} (above): C{protocol.transport} is
    this layer, and the transport below delivers its events here.
    """

    #: Read by the relays (L{gateway.proxy.tunnel}): this transport cannot half-close.
    TLS = True

    def __init__(self, creator: TLSCreator, protocol) -> None:
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = creator.newTLS(self._incoming, self._outgoing)
        self.wrappedProtocol = protocol
        self.transport = None
        self.connected = False
        self.disconnecting = False
        self._handshakeDone = False
        self._pending: list[bytes] = []  # plaintext written before the handshake completed
        self._closeAfterHandshake = False
        self._failure: Failure | None = None
        self._closeNotified = False  # the peer ended TLS cleanly
        self._lost = False

    # -- below: the transport's protocol ------------------------------------------------

    def makeConnection(self, transport) -> None:
        """Attach to C{transport} and start the handshake (a client sends its hello now)."""
        self.transport = transport
        widenReads(transport)
        self.connected = True
        self.wrappedProtocol.makeConnection(self)
        if not self._lost:
            self._handshake()

    def dataReceived(self, data: bytes) -> None:
        if self._failure is not None or self._lost:
            return
        self._incoming.write(data)
        if not self._handshakeDone:
            self._handshake()
            if not self._handshakeDone or self.disconnecting:
                return
        self._readRecords()

    def readConnectionLost(self) -> None:
        """
        The peer ended its half of the TCP connection: TLS has no use for the other half
        (close_notify, not FIN, ends a TLS direction), so close.
        """
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure) -> None:
        if self._lost:
            return
        self._lost = True
        self.connected = False
        if self._failure is not None:
            reason = self._failure
        elif self._closeNotified:
            # Ended by close_notify: complete, however the TCP connection went after it.
            reason = Failure(error.ConnectionDone())
        elif not self._handshakeDone and reason.check(error.ConnectionDone, error.ConnectionLost):
            reason = Failure(HandshakeEOF("the peer closed the connection during the handshake"))
        protocol, self.wrappedProtocol = self.wrappedProtocol, None
        protocol.connectionLost(reason)

    # -- TLS ------------------------------------------------------------------------------

    def _handshake(self) -> None:
        try:
            self._tls.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except ssl.SSLError as e:
            self._fail(e)
            return
        self._handshakeDone = True
        self._flush()
        if IHandshakeListener.providedBy(self.wrappedProtocol):
            self.wrappedProtocol.handshakeCompleted()
            if self._lost or self.disconnecting:
                return
        if self._pending:
            pending, self._pending = self._pending, []
            self.write(b"".join(pending))
        if self._closeAfterHandshake:
            self.loseConnection()

    def _readRecords(self) -> None:
        """Decrypt everything that arrived and deliver it as one string."""
        chunks = []
        closed = False
        tls = self._tls
        incoming = self._incoming
        try:
            while True:
                chunk = tls.read(_READ_SIZE)
                if not chunk:
                    closed = True
                    break
                chunks.append(chunk)
                if not incoming.pending and not tls.pending():
                    break  # all consumed: skip the read that would only say "want read"
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:
            closed = True
        except ssl.SSLError as e:
            if chunks:
                self.wrappedProtocol.dataReceived(b"".join(chunks))
            self._fail(e)
            return
        if chunks:
            self.wrappedProtocol.dataReceived(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        if self._outgoing.pending:
            self._flush()  # post-handshake messages (key updates) and alerts
        if closed and not self._lost:
            # The peer's close_notify: answer with ours (unless sent already) and close.
            self._closeNotified = True
            if self.disconnecting:
                self.transport.loseConnection()
            else:
                self.loseConnection()

    def _flush(self) -> None:
        data = self._outgoing.read()
        if data:
            writeNow(self.transport, data)

    def _fail(self, e: Exception) -> None:
        """A TLS failure: send the alert OpenSSL queued, close, and report C{e} up."""
        if self._failure is None:
            self._failure = Failure(e)
        self.disconnecting = True
        self._flush()
        self.transport.loseConnection()

    # -- above: the protocol's transport ----------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.disconnecting or self._lost or not data:
            return
        if not self._handshakeDone:
            self._pending.append(bytes(data))
            return
        try:
            self._tls.write(data)
        except ssl.SSLError as e:
            self._fail(e)
            return
        writeNow(self.transport, self._outgoing.read())

    def writeSequence(self, data) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        """
        Send close_notify after what was written; close the transport once the peer has
        answered with its own (or closed), delivering what it still sends meanwhile, as
        Twisted's TLS does. close_notify ends one direction: a relay passing on an end of
        stream (L{gateway.proxy.tunnel}) must not lose what the peer sends after it.
        """
        if self.disconnecting or self._lost:
            return
        if not self._handshakeDone:
            if self._pending:
                self._closeAfterHandshake = True  # written data goes out first
                return
            self.abortConnection()  # nothing to say: do not wait for a handshake
            return
        self.disconnecting = True
        try:
            self._tls.unwrap()
        except ssl.SSLError:
            # SSLWantReadError: ours is out, the peer's is to come (see _readRecords).
            self._flush()
            return
        self._flush()
        self.transport.loseConnection()  # the peer's close_notify had already come

    def abortConnection(self) -> None:
        self.disconnecting = True
        if self.transport is not None:
            self.transport.abortConnection()

    def getPeer(self):
        return self.transport.getPeer()

    def getHost(self):
        return self.transport.getHost()

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.transport.setTcpNoDelay(enabled)

    def registerProducer(self, producer, streaming: bool) -> None:
        self.transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        if self.transport is not None:
            self.transport.unregisterProducer()

    def pauseProducing(self) -> None:
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.transport.resumeProducing()

    def stopProducing(self) -> None:
        self.transport.stopProducing()

    @property
    def negotiatedProtocol(self) -> bytes | None:
        """The ALPN protocol agreed on, if any (as Twisted's TLS transports give it)."""
        selected = self._tls.selected_alpn_protocol() if self._handshakeDone else None
        return selected.encode("ascii") if selected else None


def startTLS(protocol, creator: TLSCreator) -> TLSLayer:
    """
    Switch the connected C{protocol} to TLS: from now on its transport is a TLS layer over
    the transport it had. The transport below may itself be a TLS layer (an intercepted
    tunnel on an ssl: listener).
    """
    below = protocol.transport
    layer = TLSLayer(creator, protocol)
    replaceProtocol(below, layer)
    layer.transport = below
    layer.connected = True
    widenReads(below)
    protocol.transport = layer
    layer._handshake()
    return layer


def wrapEndpoint(creator: TLSCreator) -> Callable:
    """
    For L{gateway.proxy.dial.Dialer.connect}'s C{wrap}: a function of a TCP endpoint giving
    an endpoint whose connections speak TLS (made by C{creator}) for the protocol dialled.
    """
    return lambda endpoint: _TLSEndpoint(endpoint, creator)


class _TLSEndpoint:
    def __init__(self, endpoint, creator: TLSCreator) -> None:
        self._endpoint = endpoint
        self._creator = creator

    def connect(self, factory):
        d = self._endpoint.connect(TLSFactory(factory, self._creator))
        return d.addCallback(lambda layer: layer.wrappedProtocol)


class TLSFactory:
    """Wraps the protocols C{factory} builds in TLS made by C{creator} (client or server)."""

    def __init__(self, factory, creator: TLSCreator) -> None:
        self._factory = factory
        self._creator = creator

    def doStart(self) -> None:
        self._factory.doStart()

    def doStop(self) -> None:
        self._factory.doStop()

    def buildProtocol(self, addr):
        protocol = self._factory.buildProtocol(addr)
        return None if protocol is None else TLSLayer(self._creator, protocol)


_SSL_DECORATION = re.compile(r"^\[[^\]]*\]\s*|\s*\(_ssl\.c:\d+\)$")

#: X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
_NAME_MISMATCH = (62, 64)


def describeFailure(reason: Failure | None) -> str | None:
    """
    One line saying why TLS failed, for a 502 body or a log, if C{reason} is a TLS failure
    (from L{TLSLayer}); otherwise L{None}.
    """
    if reason is None:
        return None
    value = reason.value
    if isinstance(value, ssl.SSLCertVerificationError):
        if value.verify_code in _NAME_MISMATCH:
            return f"the certificate does not match the host name ({value.verify_message})"
        return f"certificate verify failed: {value.verify_message}"
    if isinstance(value, ssl.SSLError):
        return sslReason(value) or "handshake failed"
    if isinstance(value, HandshakeEOF):
        return value.args[0]
    return None


def sslReason(e: ssl.SSLError) -> str:
    """OpenSSL's reason in C{e}, without the library tag and the C{_ssl.c} line number."""
    return _SSL_DECORATION.sub("", str(e))


@implementer(IHandshakeListener)
class AwaitHandshake:
    """
    Stands in for the protocol of a TLS connection (L{TLSLayer}) until its handshake is
    done, so that the protocol can be chosen by the ALPN the peer agreed to: C{done} fires
    with the layer (read C{negotiatedProtocol}), or fails with why the connection ended
    first; then L{switch} attaches the chosen protocol. Bytes that arrive in between are
    handed to it.
    """

    def __init__(self) -> None:
        self.done: defer.Deferred = defer.Deferred()
        self.transport: TLSLayer | None = None
        self._received: list[bytes] = []
        self._protocol = None

    def makeConnection(self, transport) -> None:
        self.transport = transport

    def handshakeCompleted(self) -> None:
        if not self.done.called:
            self.done.callback(self.transport)

    def dataReceived(self, data: bytes) -> None:
        if self._protocol is not None:
            self._protocol.dataReceived(data)
        else:
            self._received.append(data)

    def connectionLost(self, reason: Failure) -> None:
        if self._protocol is not None:
            self._protocol.connectionLost(reason)
        elif not self.done.called:
            self.done.errback(reason)

    def switch(self, protocol) -> None:
        """From now on the layer's protocol is C{protocol} (connected now)."""
        layer = self.transport
        self._protocol = protocol
        if layer.wrappedProtocol is self:
            layer.wrappedProtocol = protocol
        protocol.makeConnection(layer)
        received, self._received = self._received, []
        if received:
            protocol.dataReceived(b"".join(received))
