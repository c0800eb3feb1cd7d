"""
TLS origins for the tunnel, WebSocket and HTTPS-listener tests.

- L{makeCA} creates a throwaway CA (with C{cryptography}) and a leaf certificate for
  C{localhost}, 127.0.0.1 and ::1, written as PEM files in a folder of the caller's.
- L{HTTPSOrigin} is a threaded HTTPS/1.1 origin on 127.0.0.1 serving that leaf: C{/}
  answers a short text, C{/bytes/N} the deterministic payload (L{tests.support.payload}).
- L{WebSocketEcho} is a WebSocket echo server (the C{websockets} package's sync server in a
  thread), plain or TLS, that echoes every message back, text or binary, up to 64 MiB.

Everything binds loopback on port 0 (C{port} is the one it got), and every thread is a
daemon.
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from websockets.sync.server import serve

from tests.support.payload import payloadChunks

__all__ = [
    "HELLO",
    "HTTPSOrigin",
    "TLSFiles",
    "TLSHTTPServer",
    "WebSocketEcho",
    "commonName",
    "keyPEM",
    "makeCA",
]

HELLO = b"hello over tls\n"


class TLSFiles:
    """Paths of a throwaway CA and of one leaf signed by it."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.caCert = folder / "ca.pem"
        self.caKey = folder / "ca.key"
        self.cert = folder / "localhost.pem"
        self.key = folder / "localhost.key"

    def serverContext(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.cert, self.key)
        return ctx

    def clientContext(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.caCert))
        return ctx


def commonName(common: str) -> x509.Name:
    """A certificate name with only a common name."""
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def keyPEM(key) -> bytes:
    """A private key as unencrypted PKCS#8 PEM."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def makeCA(folder: Path) -> TLSFiles:
    """A CA and a C{localhost} leaf (DNS localhost, IP 127.0.0.1 and ::1) in C{folder}."""
    folder.mkdir(parents=True, exist_ok=True)
    files = TLSFiles(folder)
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(days=1), now + datetime.timedelta(days=30)

    caKey = ec.generate_private_key(ec.SECP256R1())
    caName = commonName("proxygate test CA")
    ca = (
        x509.CertificateBuilder()
        .subject_name(caName)
        .issuer_name(caName)
        .public_key(caKey.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(caKey.public_key()), False)
        .sign(caKey, hashes.SHA256())
    )

    leafKey = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(commonName("localhost"))
        .issuer_name(caName)
        .public_key(leafKey.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address("::1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(caKey.public_key()), False
        )
        .sign(caKey, hashes.SHA256())
    )

    files.caCert.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.caKey.write_bytes(keyPEM(caKey))
    files.cert.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(keyPEM(leafKey))
    return files


# -- HTTPS origin ---------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "tlsorigin/1"

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        if self.path.startswith("/bytes/"):
            n = int(self.path.split("/")[2])
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(n))
            self.end_headers()
            for chunk in payloadChunks(n):
                self.wfile.write(chunk)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(HELLO)))
        self.end_headers()
        self.wfile.write(HELLO)


class TLSHTTPServer(ThreadingHTTPServer):
    """
    HTTP over TLS on a loopback address, served from a thread of its own; the TLS handshake
    runs in each connection's thread. Subclasses pick the handler and context, and may
    extend L{accepted} and L{handshaken} (to count, to tune the socket).
    """

    daemon_threads = True
    #: Socket timeout of each connection, in seconds.
    connectionTimeout = 10.0

    def __init__(self, handler, context: ssl.SSLContext, host: str = "127.0.0.1") -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, 0), handler)
        self.context = context
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return self.server_address[1]

    def accepted(self, request: socket.socket) -> None:
        """A connection, before its handshake."""
        request.settimeout(self.connectionTimeout)

    def handshaken(self) -> None:
        """A connection whose handshake succeeded."""

    def finish_request(self, request, client_address) -> None:
        self.accepted(request)
        try:
            tls = self.context.wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError):
            return
        self.handshaken()
        try:
            super().finish_request(tls, client_address)
        finally:
            try:
                tls.unwrap()
            except (OSError, ssl.SSLError, ValueError):
                pass

    def close(self) -> None:
        self.shutdown()
        self.server_close()


class HTTPSOrigin(TLSHTTPServer):
    """HTTPS on 127.0.0.1 (or ::1) with the L{makeCA} leaf."""

    def __init__(self, files: TLSFiles, host: str = "127.0.0.1") -> None:
        super().__init__(_Handler, files.serverContext(), host)


# -- WebSocket echo -------------------------------------------------------------------------


class WebSocketEcho:
    """Echoes every WebSocket message; C{tls} gives wss:// with the L{makeCA} leaf."""

    def __init__(self, files: TLSFiles | None = None, host: str = "127.0.0.1") -> None:
        self.tls = files is not None
        self.connections = 0
        self.server = serve(
            self._echo,
            host,
            0,
            ssl=files.serverContext() if files is not None else None,
            max_size=64 << 20,
            compression=None,
            ping_interval=None,
            open_timeout=10,
            close_timeout=2,
        )
        self.port = self.server.socket.getsockname()[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, host: str = "localhost", path: str = "/") -> str:
        return f"{'wss' if self.tls else 'ws'}://{host}:{self.port}{path}"

    def _echo(self, ws) -> None:
        self.connections += 1
        for message in ws:
            ws.send(message)

    def close(self) -> None:
        self.server.shutdown()
