"""
CONNECT: check the target, dial it, answer 200, and splice.

The 200 is written raw, with no Content-Length or Transfer-Encoding (RFC 9110 §9.3.6), and
the bytes the client sent right behind the CONNECT head (an eager TLS ClientHello) are the
first bytes relayed, never dropped.
"""

from __future__ import annotations

import time

from ..accesslog import AccessRecord, hierarchy
from ..http1.headers import parseAuthority
from ..http1.parse import HTTPError, RequestHead
from ..policy import portAllowed
from .dial import DialFailure
from .responses import errorResponse
from .tunnel import Splice, TunnelOrigin

__all__ = ["startConnect"]

ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"


class ConnectAttempt:
    """A CONNECT from the moment its head is parsed to the end of its tunnel."""

    def __init__(self, client, head: RequestHead, user: str | None) -> None:
        self.client = client
        self.rt = client.rt
        self.head = head
        self.user = user
        self.host = ""
        self.port = 0
        self.ip = "-"
        self.code = 0
        self.finished = False
        self.responseStarted = False
        self.splice: Splice | None = None
        self.origin: TunnelOrigin | None = None
        self.started = self.rt.reactor.seconds()
        self.wallStart = time.time()
        self.reason: str | None = None
        self.route = None
        self.established = False  # the 200 has been written
        self._creator = None

    def begin(self) -> None:
        rt = self.rt
        try:
            self.host, self.port = parseAuthority(self.head.target, None)
        except HTTPError as e:
            self._fail(400, f"Bad CONNECT target: {e.reason}.", None)
            return
        if not portAllowed(rt.connectPorts, self.port):
            rt.metrics.denied.labels("port").inc()
            self._fail(
                403,
                f"CONNECT to port {self.port} is not allowed by this proxy.",
                None,
                action="TCP_DENIED",
                result="denied",
            )
            return
        decision = rt.destinations.checkName(self.host, self.port)
        if not decision.allowed:
            rt.metrics.denied.labels(decision.reason or "destination").inc()
            self._fail(
                403,
                f"Destination denied: {decision.detail}",
                None,
                action="TCP_DENIED",
                result="denied",
            )
            return
        mitm = rt.interceptor
        if mitm is not None and mitm.intercepts(self.host):
            self._intercept(mitm)
            return
        self._dial()

    def _dial(self) -> None:
        rt = self.rt
        self.origin = TunnelOrigin()
        # Until the tunnel is up, early bytes stay in the client's buffer, unread further.
        self.route = rt.upstream.routeFor(self.host, self.port)
        if self.route is None:
            d = rt.dialer.connect(self.host, self.port, self.origin)
        else:
            d = self.route.dialThrough(
                rt.dialer, self.host, self.port, self.origin, timeout=rt.dialer.connectTimeout
            )
        d.addCallbacks(self._connected, self._dialFailed)

    def _connected(self, ip: str) -> None:
        self.ip = ip
        if self.finished:
            self.origin.transport.loseConnection()
            return
        rt = self.rt
        self.code = 200
        self.responseStarted = True
        rt.metrics.live.tunnels += 1
        if not self.established:
            self.client.transport.write(ESTABLISHED)
        self.splice = Splice(
            self.client, self.origin.transport, self.origin.pauser, rt.metrics, self._ended
        )
        self.origin.attach(self.splice)
        self.client.startSplice(self.splice)

    def _intercept(self, mitm) -> None:
        """
        Decrypt this tunnel: answer 200, switch the client connection to TLS with a
        certificate for the SNI name (or the CONNECT host), and serve the requests inside
        it on the forward path. The origin is dialled per request, over verified TLS.
        """
        try:
            self._creator = mitm.serverCreator(self.host)
        except ValueError as e:
            self._fail(400, f"Bad CONNECT target: {e}.", None)
            return
        # Only TLS can be decrypted. The first byte the client sends says which it is
        # (0x16: a TLS handshake record); anything else (ws://, plain HTTP, SSH...) becomes
        # a blind tunnel, as if the host were not intercepted.
        self.established = True
        self.client.transport.write(ESTABLISHED)
        self.client.peekFirstByte(self)

    def firstByte(self, byte: bytes) -> None:
        """The client's first byte inside the tunnel arrived: decrypt, or relay blind."""
        if byte == b"\x16":
            self.code = 200
            self.finished = True
            self.rt.metrics.live.tunnelEnded("intercepted")
            self._log("TCP_TUNNEL")
            self.client.startMitm(self.host, self.port, self._creator, self.user)
        else:
            self._dial()

    def _dialFailed(self, failure) -> None:
        if self.finished:
            return
        why = DialFailure(failure.value)
        why.count(self.rt.metrics)
        action = "TCP_DENIED" if why.action == "TCP_DENIED" else "TCP_TUNNEL"
        self._fail(why.status, why.message, why.proxyStatus, action=action, result=why.result)

    def _fail(
        self,
        status: int,
        message: str,
        proxyStatus: str | None,
        *,
        action: str = "TCP_TUNNEL",
        result: str = "error",
    ) -> None:
        """No tunnel: answer and close (early tunnel bytes may follow the head)."""
        self.code = status
        self.reason = message
        self.finished = True
        self.rt.metrics.live.tunnelEnded(result if status != 400 else "bad_request")
        if self.established:
            # The 200 is out: the tunnel can only end (HTTP bytes here would be tunnel data).
            self.client.transport.loseConnection()
        else:
            self.client.transport.write(errorResponse(status, message, proxyStatus=proxyStatus))
        self.client.exchangeDone(True)
        self._log(action)

    def _ended(self) -> None:
        self.finished = True
        rt = self.rt
        rt.metrics.live.tunnels -= 1
        rt.metrics.live.tunnelEnded("ok")
        self._log("TCP_TUNNEL")

    def clientLost(self) -> None:
        """Client gone before the tunnel was up."""
        if self.finished:
            return
        self.finished = True
        self.reason = "client closed the connection"
        self.rt.metrics.live.tunnelEnded("client_gone")
        if self.origin is not None and self.origin.transport is not None:
            self.origin.transport.loseConnection()
        self._log("TCP_TUNNEL_ABORTED")

    def _log(self, action: str) -> None:
        rt = self.rt
        elapsed = rt.reactor.seconds() - self.started
        rt.metrics.request("forward", b"CONNECT", self.code, elapsed)
        if rt.accessLog is None:
            return
        sent = self.splice.fromOriginBytes if self.splice is not None else 0
        host = f"[{self.host}]" if ":" in self.host else self.host
        rt.accessLog.record(
            AccessRecord(
                start=self.wallStart,
                elapsed=elapsed,
                client=self.client.peerHost,
                code=self.code,
                size=sent,
                method="CONNECT",
                url=f"{host}:{self.port}" if self.host else "-",
                user=self.user,
                action=action,
                hierarchy=hierarchy(self.ip, self.route is not None),
                contentType="-",
                mode="tunnel",
                reason=self.reason,
                version=self.head.version.decode("ascii"),
            )
        )


def startConnect(client, head: RequestHead, user: str | None) -> ConnectAttempt:
    attempt = ConnectAttempt(client, head, user)
    client.exchange = attempt
    attempt.begin()
    return attempt
