"""
HTTPS and WSS loopback origins for the TLS interception (MITM) tests.

- L{OriginPKI} is a throwaway CA made with L{gateway.tls.ca.createCA}, and leaves minted by
  L{gateway.tls.mint.mintLeaf}: one for C{localhost} (served when the client sends that SNI)
  and one for IP 127.0.0.1 (served without SNI, as clients never send SNI for IP literals).
  C{OriginPKI(folder, names=("wrong.example",))} makes an origin whose certificate matches
  neither, for the bad-certificate tests.
- L{HTTPSOrigin} is a threaded HTTPS/1.1 origin serving L{tests.support.origin.OriginHandler}
  (C{/bytes/N}, C{/echo}, C{/sink} POST sink, C{/status/N}, C{/chunked/N}, ...) and a
  C{/slowsink} that stalls after 4 MiB (upload backpressure), counting the
  TLS connections it accepted (to see pooling through the proxy).
- L{WSSEcho} is a C{wss://} echo server (the C{websockets} sync server in a thread).

Everything binds 127.0.0.1 on port 0; every thread is a daemon; every wait is bounded.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from websockets.sync.server import serve

from gateway.tls.ca import CertificateAuthority, createCA
from gateway.tls.mint import mintLeaf, newLeafKey
from tests.support.origin import OriginHandler
from tests.support.tlsorigin import TLSHTTPServer

__all__ = ["HTTPSOrigin", "OriginPKI", "WSSEcho"]


class OriginPKI:
    """
    A throwaway CA (C{ca.pem}; or C{ca}, another PKI's) and leaves for C{names} in C{folder};
    the first name is the certificate served without SNI, an SNI equal to another name
    selects that one.
    """

    def __init__(
        self,
        folder: Path,
        names: tuple[str, ...] = ("127.0.0.1", "localhost"),
        ca: CertificateAuthority | None = None,
    ) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.ca = ca if ca is not None else createCA(f"mitmorigin test CA {folder.name}")
        self.caCert = folder / "ca.pem"
        self.caCert.write_bytes(self.ca.pem())
        key = newLeafKey()
        self.keyFile = folder / "leaf.key"
        self.keyFile.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        now = datetime.now(UTC)
        self.certFiles: dict[str, Path] = {}
        for name in names:
            leaf = mintLeaf(self.ca, key, name, now)
            path = folder / f"leaf-{name.replace(':', '_')}.pem"
            path.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
            self.certFiles[name] = path
        self.names = names

    def _context(self, name: str) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.certFiles[name], self.keyFile)
        ctx.set_alpn_protocols(["http/1.1"])
        return ctx

    def serverContext(self) -> ssl.SSLContext:
        """A server context that picks the leaf by SNI (the first name without one)."""
        default = self._context(self.names[0])
        others = {name: self._context(name) for name in self.names[1:]}

        def pick(sslObject, serverName, context) -> None:
            if serverName in others:
                sslObject.context = others[serverName]

        default.sni_callback = pick
        return default


class _Handler(OriginHandler):
    """L{OriginHandler} plus C{/slowsink}: reads 4 MiB, stalls 3 s, then reads the rest."""

    def _handle(self) -> None:
        if not self.path.startswith("/slowsink"):
            super()._handle()
            return
        remaining = int(self.headers.get("Content-Length") or 0)
        total = 0
        while remaining:
            chunk = self.rfile.read(min(remaining, 1 << 16))
            if not chunk:
                break
            remaining -= len(chunk)
            before, total = total, total + len(chunk)
            if before < 4 << 20 <= total:
                time.sleep(3)
        body = b'{"bytes": %d}' % total
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = _handle


class HTTPSOrigin(TLSHTTPServer):
    """L{OriginHandler} over TLS on 127.0.0.1, counting connections and handshakes."""

    allow_reuse_address = True
    connectionTimeout = 60.0

    def __init__(self, pki: OriginPKI) -> None:
        self.requests: list = []
        self.connections = 0
        self.handshakes = 0
        self._lock = threading.Lock()  # set before the serving thread starts
        super().__init__(_Handler, pki.serverContext())

    def accepted(self, request: socket.socket) -> None:
        with self._lock:
            self.connections += 1
        super().accepted(request)
        # The handler writes the head and the body separately: without this, Nagle and the
        # peer's delayed ACK add 40 ms to every response.
        request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def handshaken(self) -> None:
        with self._lock:
            self.handshakes += 1


class WSSEcho:
    """Echoes every WebSocket message (text or binary, up to 64 MiB) over wss://."""

    def __init__(self, pki: OriginPKI) -> None:
        self.connections = 0
        self.server = serve(
            self._echo,
            "127.0.0.1",
            0,
            ssl=pki.serverContext(),
            max_size=64 << 20,
            compression=None,
            ping_interval=None,
            open_timeout=10,
            close_timeout=2,
        )
        self.port = self.server.socket.getsockname()[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def _echo(self, ws) -> None:
        self.connections += 1
        for message in ws:
            ws.send(message)

    def close(self) -> None:
        self.server.shutdown()
