"""
The two sides an exchange talks to, and what they tell it.

An exchange (one request and its response) sits between a *downstream* side, where the
request came from (an HTTP/1.1 client connection, an HTTP/2 stream, a route's listener), and
an *upstream* side, where it goes (an HTTP/1.1 origin connection, possibly through an upstream
proxy, an HTTP/2 stream to the origin, a route's backend, an FTP fetch). The exchange never
sees a wire: it calls the methods below, and each side calls the exchange's events. So a new
wire is one more implementation of a side, and the exchange does not change.

Both directions are method calls rather than event and command objects (as h11 and
mitmproxy have): an exchange runs per request on a path that must stay as cheap as Squid's,
and a call costs nothing to allocate. Tests record the calls (tests/support/sides.py), which
gives the same "this event in, these actions out" playbooks.

Typing protocols only: nothing here is checked at run time, and nothing imports Twisted.
"""

from __future__ import annotations

from typing import Protocol

from ..message import Fields, Request, Response

__all__ = [
    "ByteStream",
    "Connector",
    "Downstream",
    "DownstreamEvents",
    "Side",
    "Upstream",
    "UpstreamEvents",
]


class Side(Protocol):
    """What both sides do for an exchange."""

    def sendData(self, data: bytes) -> None:
        """Body bytes, after the head: re-framed by the side for its wire."""

    def end(self, trailers: Fields | None = None) -> None:
        """The body is complete (with its trailer fields, if any)."""

    def abort(self) -> None:
        """
        Make an incomplete message visible as incomplete (HTTP/1.1: reset the connection;
        HTTP/2: RST_STREAM), never as a shorter complete one.
        """

    def pause(self) -> None:
        """Stop delivering this side's body events (its peer cannot take more)."""

    def resume(self) -> None:
        """Deliver them again."""

    def throttle(self, other: Side | None) -> None:
        """
        While this side cannot send (its buffer, window or socket is full), pause C{other};
        resume it when it can again. None ends the arrangement.
        """

    def flush(self) -> None:
        """The end of a batch of events: send anything held back to join a later write."""


class Downstream(Side, Protocol):
    """The side a request came from: it receives the response."""

    #: The client's address as the proxy knows it (after a PROXY header), for logs and
    #: X-Forwarded-For.
    client: str

    def sendHead(self, response: Response) -> None:
        """A response head; 1xx heads are informational and may repeat."""


class Upstream(Side, Protocol):
    """The side a request goes to: it receives the request."""

    #: The address dialled (for the log's hierarchy field), or "-".
    ip: str

    def sendHead(self, request: Request) -> None:
        """The request head; body bytes follow with sendData, if C{request.length} allows."""

    def release(self, reuse: bool) -> None:
        """
        The exchange is done with this side: keep it for another request if C{reuse} and
        the side's own framing allow it (a pool), else close it.
        """


class DownstreamEvents(Protocol):
    """What a downstream side tells its exchange."""

    def requestData(self, data: bytes) -> None: ...

    def requestEnd(self, trailers: Fields | None = None) -> None: ...

    def downstreamLost(self) -> None:
        """The client went away (or reset its stream) before the exchange finished."""

    def timedOut(self) -> None:
        """The downstream's idle deadline passed while the exchange was running."""


class UpstreamEvents(Protocol):
    """What an upstream side tells its exchange."""

    def upstreamReady(self, side: Upstream, reused: bool) -> None:
        """A connector found or opened the upstream side (see L{Connector})."""

    def upstreamUnavailable(self, error: Exception) -> None:
        """A connector could not open one (a dial failure, a policy refusal...)."""

    def responseHead(self, response: Response) -> None:
        """The final (or a 1xx informational) response head."""

    def responseData(self, data: bytes) -> None: ...

    def responseEnd(self, trailers: Fields | None = None) -> None: ...

    def responseFlush(self) -> None:
        """The end of one read's worth of events."""

    def upstreamFailed(self, status: int, reason: str) -> None:
        """The upstream broke its protocol (a malformed head, bad framing): 502 or cut."""

    def upstreamLost(self, reason: object) -> None:
        """The upstream closed or reset before the response was complete."""


class Connector(Protocol):
    """Finds an upstream side for a request: pooled, or dialled (direct, chained, routed)."""

    def open(self, request: Request, exchange: UpstreamEvents, fresh: bool = False) -> None:
        """
        Call C{exchange.upstreamReady} (maybe before returning, with a pooled side) or
        C{exchange.upstreamUnavailable}. C{fresh}: never a pooled side (a retry).
        """


class ByteStream(Protocol):
    """
    A connection handed over to raw bytes (CONNECT, a 101 upgrade, the TLS of an
    intercepted tunnel): the one way a connection stops speaking HTTP. Its owner delivers
    C{dataReceived}, C{readConnectionLost} and C{connectionLost} to the receiver set here.
    """

    def setReceiver(self, receiver: object) -> None: ...

    def write(self, data: bytes) -> None: ...

    def halfClose(self) -> None: ...

    def loseConnection(self) -> None: ...

    def abortConnection(self) -> None: ...
