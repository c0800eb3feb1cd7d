"""
An HTTPS origin that speaks HTTP/2 (ALPN h2) and falls back to HTTP/1.1, on loopback.

For the HTTP/2 end-to-end tests: a client (curl --http2, grpcio, the h2 library) reaches it
directly or through an intercepting proxygate, which mirrors the client's ALPN offer, so
what this origin chose says what the proxy offered.

- L{H2Origin}: TLS with ALPN ["h2", "http/1.1"] (or ["http/1.1"] with C{http2=False}) and the
  certificates of mitmorigin's L{OriginPKI}. An h2 connection is served by a small loop on the
  h2 library (one thread per connection, all streams multiplexed, flow control respected);
  an http/1.1 one by mitmorigin's handler (conftest's OriginHandler), so both protocols
  serve the same paths where HTTP/1.1 can:
    - C{GET /bytes/N}: N bytes of conftest's deterministic payload (C{/bytes/62914560} is the
      60 MB body of the slow-reader test), with content-length;
    - C{POST /echo}: the request body back, streamed as it arrives (h2: every DATA frame is
      answered as it comes, so a bidirectional stream works);
    - C{GET /trailers} (h2 only): a body and trailers (C{grpc-status: 0}, C{x-trailer: yes});
    - anything else: 200 "h2 origin\\n".
  It records every h2 request (C{h2requests}: method, path, headers, trailers), every
  HTTP/1.1 one (C{requests}, as mitmorigin does), streams reset by the client (C{resets})
  and the ALPN protocol each connection chose (C{alpn}).

- L{GracefulH2Connection}: the h2 library's connection, but a GOAWAY NO_ERROR leaves it open
  (h2 closes its state on any GOAWAY), so a test client can see its open streams finish
  as RFC 9113 §6.8 says they do.

Everything binds 127.0.0.1 on a free port; threads are daemons; every socket wait is bounded.
"""

from __future__ import annotations

import select
import socket
import ssl

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions

from tests.support import payloadChunks
from tests.support.mitmorigin import HTTPSOrigin, OriginPKI

__all__ = ["GracefulH2Connection", "H2Origin", "h2fetch"]

HELLO = b"h2 origin\n"


class GracefulH2Connection(h2.connection.H2Connection):
    """h2's connection, kept open by a GOAWAY NO_ERROR (sent or received): streams finish."""

    def close_connection(self, error_code=0, additional_data=None, last_stream_id=None):
        state = self.state_machine.state
        super().close_connection(error_code, additional_data, last_stream_id)
        if error_code == h2.errors.ErrorCodes.NO_ERROR:
            self.state_machine.state = state

    def _receive_goaway_frame(self, frame):
        state = self.state_machine.state
        result = super()._receive_goaway_frame(frame)
        if frame.error_code == h2.errors.ErrorCodes.NO_ERROR:
            self.state_machine.state = state
        return result


class _Body:
    """A response body being sent on one stream, as far as the windows allow."""

    def __init__(self, chunks, trailers=None) -> None:
        self.chunks = iter(chunks)
        self.pending = b""
        self.trailers = trailers
        self.done = False


class _H2Connection:
    """One h2 connection of the origin, served in its thread."""

    def __init__(self, origin: H2Origin, sock: ssl.SSLSocket) -> None:
        self.origin = origin
        self.sock = sock
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None)
        )
        self.bodies: dict[int, _Body] = {}
        self.echo: set[int] = set()
        self.requests: dict[int, dict] = {}

    def serve(self) -> None:
        conn = self.conn
        conn.initiate_connection()
        # A generous connection window: the 60 MB test measures the proxy, not this.
        conn.increment_flow_control_window(16 * 1024 * 1024)
        self._flush()
        idle = 0.0
        while True:
            sendable = self._sendBodies()
            self._flush()
            if self.sock.pending():
                ready = True
            else:
                ready = bool(select.select([self.sock], [], [], 0 if sendable else 0.5)[0])
            if not ready:
                if not sendable:
                    idle += 0.5
                    if idle > self.origin.idleTimeout:
                        return
                continue
            idle = 0.0
            try:
                data = self.sock.recv(65536)
            except (OSError, ssl.SSLError):
                return
            if not data:
                return
            try:
                events = conn.receive_data(data)
            except h2.exceptions.ProtocolError:
                self._flush()
                return
            for event in events:
                self._event(event)
            if conn.state_machine.state.name == "CLOSED" and not self.bodies:
                self._flush()
                return

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def _event(self, event) -> None:
        conn = self.conn
        if isinstance(event, h2.events.RequestReceived):
            headers = dict(event.headers)
            record = {
                "protocol": "h2",
                "method": headers.get(b":method", b"").decode(),
                "path": headers.get(b":path", b"").decode(),
                "headers": list(event.headers),
            }
            self.origin.h2requests.append(record)
            self.requests[event.stream_id] = record
            self._respond(event.stream_id, record)
        elif isinstance(event, h2.events.DataReceived):
            conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            if event.stream_id in self.echo and event.data:
                body = self.bodies.setdefault(event.stream_id, _Body(()))
                body.pending += event.data
        elif isinstance(event, h2.events.StreamEnded):
            if event.stream_id in self.echo:
                self.echo.discard(event.stream_id)
                self.bodies.setdefault(event.stream_id, _Body(())).done = True
        elif isinstance(event, h2.events.TrailersReceived):
            self.requests.get(event.stream_id, {})["trailers"] = list(event.headers)
        elif isinstance(event, h2.events.StreamReset):
            self.bodies.pop(event.stream_id, None)
            self.echo.discard(event.stream_id)
            self.origin.resets.append(event.stream_id)

    def _respond(self, streamId: int, record: dict) -> None:
        conn = self.conn
        path = record["path"]
        if path.startswith("/bytes/"):
            n = int(path.split("/")[2].split("?")[0])
            conn.send_headers(
                streamId,
                [
                    (b":status", b"200"),
                    (b"content-type", b"application/octet-stream"),
                    (b"content-length", b"%d" % n),
                ],
            )
            body = _Body(payloadChunks(n))
            body.done = True
            self.bodies[streamId] = body
        elif path.startswith("/echo"):
            conn.send_headers(streamId, [(b":status", b"200")])
            self.echo.add(streamId)
            self.bodies[streamId] = _Body(())
        elif path.startswith("/trailers"):
            conn.send_headers(streamId, [(b":status", b"200"), (b"content-type", b"text/plain")])
            body = _Body(
                [b"body before trailers\n"], [(b"grpc-status", b"0"), (b"x-trailer", b"yes")]
            )
            body.done = True
            self.bodies[streamId] = body
        else:
            conn.send_headers(
                streamId,
                [(b":status", b"200"), (b"content-length", b"%d" % len(HELLO))],
            )
            conn.send_data(streamId, HELLO, end_stream=True)

    def _sendBodies(self) -> bool:
        """Send what the windows allow, about 1 MB per call: True if it stopped at that."""
        conn = self.conn
        budget = 1 << 20
        for streamId, body in list(self.bodies.items()):
            while budget > 0:
                if not body.pending:
                    body.pending = next(body.chunks, b"")
                if not body.pending:
                    if body.done:
                        if body.trailers:
                            conn.send_headers(streamId, body.trailers, end_stream=True)
                        else:
                            conn.end_stream(streamId)
                        del self.bodies[streamId]
                    break
                try:
                    window = conn.local_flow_control_window(streamId)
                except h2.exceptions.StreamClosedError:
                    del self.bodies[streamId]
                    break
                size = min(window, conn.max_outbound_frame_size, len(body.pending), budget)
                if size <= 0:
                    break
                conn.send_data(streamId, body.pending[:size])
                body.pending = body.pending[size:]
                budget -= size
        return budget <= 0


class H2Origin(HTTPSOrigin):
    """
    HTTPS on 127.0.0.1 with ALPN h2 (served on the h2 library) and http/1.1 (mitmorigin's
    handler). C{http2=False}: http/1.1 only.
    """

    #: Seconds an h2 connection may sit idle before the origin closes it.
    idleTimeout = 30.0

    def __init__(self, pki: OriginPKI, http2: bool = True) -> None:
        self.alpn: list[str | None] = []
        self.h2requests: list[dict] = []
        self.resets: list[int] = []
        self.http2 = http2
        self._h2sockets: list[ssl.SSLSocket] = []
        super().__init__(pki)
        self.protocols = ["h2", "http/1.1"] if http2 else ["http/1.1"]
        self.context.set_alpn_protocols(self.protocols)
        sni = self.context.sni_callback

        def pick(sslObject, serverName, context) -> None:
            if sni is not None:
                sni(sslObject, serverName, context)
            sslObject.context.set_alpn_protocols(self.protocols)

        self.context.sni_callback = pick

    def onlyHTTP11(self) -> None:
        """From now on choose http/1.1 only, and drop the h2 connections open now."""
        self.protocols = ["http/1.1"]
        self.context.set_alpn_protocols(self.protocols)
        with self._lock:
            sockets, self._h2sockets = self._h2sockets, []
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def finish_request(self, request, client_address) -> None:
        self.accepted(request)
        try:
            tls = self.context.wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError):
            return
        self.handshaken()
        protocol = tls.selected_alpn_protocol()
        with self._lock:
            self.alpn.append(protocol)
        try:
            if protocol == "h2":
                with self._lock:
                    self._h2sockets.append(tls)
                tls.settimeout(self.connectionTimeout)
                try:
                    _H2Connection(self, tls).serve()
                except (OSError, ssl.SSLError):
                    pass
                return
            # HTTP/1.1: the base class's handler on this TLS socket.
            self.RequestHandlerClass(tls, client_address, self)
        finally:
            try:
                tls.close()
            except OSError:
                pass

    def url(self, path: str = "/", host: str = "localhost") -> str:
        return f"https://{host}:{self.port}{path}"


def h2fetch(
    port: int,
    path: str,
    caFile,
    *,
    host: str = "localhost",
    proxyPort: int | None = None,
    method: str = "GET",
    body: bytes = b"",
    headers: tuple[tuple[bytes, bytes], ...] = (),
    timeout: float = 20.0,
):
    """
    One request over HTTP/2 (the h2 library on a blocking TLS socket, ALPN h2 only), direct
    or through a CONNECT proxy on 127.0.0.1:C{proxyPort}: (status, headers, body, trailers).
    """
    from tests.support.tunnel import readHead

    sock = socket.create_connection(("127.0.0.1", proxyPort or port), timeout=timeout)
    try:
        if proxyPort is not None:
            authority = f"{host}:{port}"
            sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
            status, _, rest = readHead(sock)
            if status != 200 or rest:
                raise ConnectionError(f"CONNECT answered {status}")
        ctx = ssl.create_default_context(cafile=str(caFile))
        ctx.set_alpn_protocols(["h2"])
        tls = ctx.wrap_socket(sock, server_hostname=host)
        if tls.selected_alpn_protocol() != "h2":
            raise ConnectionError(f"ALPN chose {tls.selected_alpn_protocol()!r}, not h2")
        conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        conn.initiate_connection()
        request = [
            (b":method", method.encode()),
            (b":scheme", b"https"),
            (b":authority", f"{host}:{port}".encode()),
            (b":path", path.encode()),
            *headers,
        ]
        conn.send_headers(1, request, end_stream=not body)
        if body:
            conn.send_data(1, body, end_stream=True)  # small bodies only (one window)
        tls.sendall(conn.data_to_send())
        status, got, parts, trailers = None, [], [], []
        while True:
            data = tls.recv(65536)
            if not data:
                raise ConnectionError("closed before the response ended")
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    got = list(event.headers)
                    status = int(dict(got)[b":status"])
                elif isinstance(event, h2.events.DataReceived):
                    parts.append(event.data)
                    conn.acknowledge_received_data(event.flow_controlled_length, 1)
                elif isinstance(event, h2.events.TrailersReceived):
                    trailers = list(event.headers)
                elif isinstance(event, h2.events.StreamEnded):
                    conn.close_connection()
                    tls.sendall(conn.data_to_send())
                    return status, got, b"".join(parts), trailers
                elif isinstance(event, h2.events.StreamReset):
                    raise ConnectionError(f"stream reset: {event.error_code!r}")
            tls.sendall(conn.data_to_send())
    finally:
        sock.close()
