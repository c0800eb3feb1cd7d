"""
Loopback origins for the tunnel and WebSocket tests.

- L{makeCA} creates a throwaway CA (with C{cryptography}) and a leaf certificate for
  C{localhost}, 127.0.0.1 and ::1, written as PEM files in a folder of the caller's.
- L{HTTPSOrigin} is a threaded HTTPS/1.1 origin on 127.0.0.1 serving that leaf: C{/}
  answers a short text, C{/bytes/N} the deterministic payload of conftest.
- L{WebSocketEcho} is a WebSocket echo server (the C{websockets} package's sync server in a
  thread), plain or TLS, that echoes every message back, text or binary, up to 64 MiB.

Everything binds loopback only on a free port, and every thread is a daemon.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import socket
import ssl
import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from conftest import payloadChunks
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from websocket import ABNF
from websockets.sync.server import serve

__all__ = ["HTTPSOrigin", "TLSFiles", "WebSocketEcho", "makeCA"]

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


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _pem(key) -> bytes:
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
    caName = _name("proxygate test CA")
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
        .subject_name(_name("localhost"))
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
    files.caKey.write_bytes(_pem(caKey))
    files.cert.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(_pem(leafKey))
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


# -- raw TCP origins and tunnel helpers -------------------------------------------------------


class TCPServer:
    """
    A loopback TCP server running C{handler(conn)} in a thread per connection; the first
    bytes each connection received are recorded by handlers that want to (C{self.seen}).
    """

    def __init__(self, handler, host: str = "127.0.0.1", backlog: int = 1024) -> None:
        self.handler = handler
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.bind((host, 0))
        self.sock.listen(backlog)
        self.host = host
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.conns: list[socket.socket] = []
        self.seen: list[bytes] = []
        self.events: list[str] = []
        self._stop = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def authority(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            conn.settimeout(None)
            if self.handler is None:
                self.conns.append(conn)  # hold it open, never read
                continue
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        try:
            self.handler(self, conn)
        except OSError as e:
            self.events.append(f"error: {e!r}")
        finally:
            conn.close()

    def close(self) -> None:
        self._stop = True
        self.sock.close()
        for c in self.conns:
            c.close()
        self.conns.clear()


def echoHandler(server: TCPServer, conn: socket.socket) -> None:
    """Echo until EOF, then half-close back."""
    while True:
        data = conn.recv(1 << 16)
        if not data:
            break
        conn.sendall(data)
    conn.shutdown(socket.SHUT_WR)


def readHead(sock: socket.socket, limit: int = 65536) -> tuple[int, list[tuple[str, str]], bytes]:
    """Read one response head: (status, [(name, value)], bytes that came after it)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(4096)
        if not data:
            raise ConnectionError(f"closed before a complete head: {buf!r}")
        buf += data
        if len(buf) > limit:
            raise ValueError("head too large")
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.append((name.strip(), value.strip()))
    return status, headers, rest


def openTunnel(
    proxyPort: int,
    authority: str,
    *,
    early: bytes = b"",
    timeout: float = 10.0,
    extra: bytes = b"",
) -> tuple[socket.socket, int, list[tuple[str, str]], bytes]:
    """CONNECT through the proxy: (socket, status, headers, bytes after the head)."""
    sock = socket.create_connection(("127.0.0.1", proxyPort), timeout=timeout)
    head = f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n".encode() + extra + b"\r\n"
    sock.sendall(head + early)
    try:
        status, headers, rest = readHead(sock)
    except Exception:
        sock.close()
        raise
    return sock, status, headers, rest


def recvExactly(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        data = sock.recv(min(1 << 20, n - len(out)))
        if not data:
            raise ConnectionError(f"EOF after {len(out)} of {n} bytes")
        out += data
    return bytes(out)


def recvAll(sock: socket.socket) -> bytes:
    out = bytearray()
    while True:
        data = sock.recv(1 << 16)
        if not data:
            return bytes(out)
        out += data


# -- a hand-written WebSocket client for the absolute-form upgrade ---------------------------

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def acceptFor(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()


class FrameReader:
    """Reads the server's (unmasked) frames from a socket, starting with leftover bytes."""

    def __init__(self, sock: socket.socket, rest: bytes = b"") -> None:
        self.sock = sock
        self.buf = bytearray(rest)

    def _need(self, n: int) -> bytes:
        while len(self.buf) < n:
            data = self.sock.recv(1 << 20)
            if not data:
                raise ConnectionError("EOF inside a frame")
            self.buf += data
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def frame(self) -> tuple[bool, int, bytes]:
        b0, b1 = self._need(2)
        assert not b1 & 0x80, "a server frame must not be masked"
        length = b1 & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", self._need(2))
        elif length == 127:
            (length,) = struct.unpack("!Q", self._need(8))
        return bool(b0 & 0x80), b0 & 0x0F, self._need(length)

    def message(self) -> tuple[int, bytes]:
        fin, opcode, data = self.frame()
        parts = [data]
        while not fin:
            fin, _, data = self.frame()
            parts.append(data)
        return opcode, b"".join(parts)


def frameBytes(data: bytes, opcode: int = ABNF.OPCODE_BINARY) -> bytes:
    return ABNF.create_frame(data, opcode).format()


def upgradeRequest(port: int, key: str, path: str = "/", host: str = "127.0.0.1") -> bytes:
    return (
        f"GET http://{host}:{port}{path} HTTP/1.1\r\n"
        f"Host: {host}:{port}\r\n"
        "Upgrade: websocket\r\n"
        "Connection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n"
        "\r\n"
    ).encode()
