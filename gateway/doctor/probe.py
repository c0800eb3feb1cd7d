"""
The fetch, step by step, over plain blocking sockets: TCP to the proxy, the proxy's answer
to CONNECT, the TLS handshake inside the tunnel, the HTTP answer. Every step is recorded
with what it saw, so the diagnosis can say which one failed and why.

TLS runs on memory BIOs over whatever carries it, so TLS inside a tunnel through an
https:// proxy (TLS in TLS) is the same code as TLS over TCP. Nothing here prints: results
are values, and the credentials only ever go into a Proxy-Authorization field.
"""

from __future__ import annotations

import base64
import socket
import ssl
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from ..message import bracketed
from .settings import ProxyURL, Trust
from .x509 import certificateNames, fingerprint

__all__ = ["Answer", "Fetch", "Step", "TLSInfo", "Target", "fetch", "fetchCA", "leafOf", "verifies"]

USER_AGENT = "proxygate-doctor/1"
_HEAD_LIMIT = 65536
_BODY_LIMIT = 4096


@dataclass(frozen=True)
class Target:
    scheme: str
    host: str
    port: int
    path: str

    @property
    def authority(self) -> str:
        return f"{bracketed(self.host)}:{self.port}"

    @property
    def url(self) -> str:
        default = 443 if self.scheme == "https" else 80
        port = "" if self.port == default else f":{self.port}"
        return f"{self.scheme}://{bracketed(self.host)}{port}{self.path}"


@dataclass(frozen=True)
class Answer:
    """An HTTP response head, and the start of its body when the proxy made it."""

    status: int
    reason: str
    headers: tuple[tuple[str, str], ...]
    body: str = ""

    def header(self, name: str) -> str | None:
        values = [v for n, v in self.headers if n.lower() == name.lower()]
        return ", ".join(values) if values else None


@dataclass(frozen=True)
class TLSInfo:
    verified: bool
    verifyCode: int | None = None
    verifyMessage: str | None = None
    #: Names and fingerprint of the server's certificate (read unverified after a failure).
    issuer: str | None = None
    subject: str | None = None
    leafFingerprint: str | None = None


@dataclass
class Step:
    name: str  # proxy-tcp | proxy-tls | connect | tcp | tls | http
    ok: bool
    detail: str
    ms: float
    #: What kind of failure: refused | timeout | dns | unreachable | closed | bundle |
    #: verify | tls | protocol | status
    error: str | None = None


@dataclass
class Fetch:
    target: Target
    proxy: ProxyURL | None
    steps: list[Step] = field(default_factory=list)
    connectAnswer: Answer | None = None
    tls: TLSInfo | None = None
    #: The last HTTP answer: the origin's, or the proxy's to a plain http:// request.
    answer: Answer | None = None

    @property
    def failed(self) -> Step | None:
        return next((s for s in self.steps if not s.ok), None)


class StepFailed(Exception):
    def __init__(self, error: str, detail: str) -> None:
        super().__init__(detail)
        self.error = error
        self.detail = detail


# -- transports -------------------------------------------------------------------------------


class _Socket:
    """A connected socket with a push-back buffer."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.pending = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self, size: int = 65536) -> bytes:
        if self.pending:
            data, self.pending = self.pending, b""
            return data
        return self.sock.recv(size)

    def close(self) -> None:
        self.sock.close()


class _TLS:
    """TLS over a L{_Socket} or another L{_TLS}, on memory BIOs."""

    def __init__(self, lower, context: ssl.SSLContext, serverName: str) -> None:
        self.lower = lower
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname=serverName)
        self.pending = b""

    def _flush(self) -> None:
        data = self.outgoing.read()
        if data:
            self.lower.send(data)

    def _fill(self) -> None:
        data = self.lower.recv(65536)
        if data:
            self.incoming.write(data)
        else:
            self.incoming.write_eof()

    def handshake(self) -> None:
        while True:
            try:
                self.tls.do_handshake()
                self._flush()
                return
            except ssl.SSLWantReadError:
                self._flush()
                self._fill()

    def send(self, data: bytes) -> None:
        self.tls.write(data)
        self._flush()

    def recv(self, size: int = 65536) -> bytes:
        if self.pending:
            data, self.pending = self.pending, b""
            return data
        while True:
            try:
                return self.tls.read(size)
            except ssl.SSLWantReadError:
                self._flush()
                self._fill()
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""

    def peerCertificate(self) -> bytes | None:
        return self.tls.getpeercert(binary_form=True)

    def close(self) -> None:
        self.lower.close()


def _context(trust: Trust | None, cadata: str | None = None) -> ssl.SSLContext:
    """A verifying client context over exactly C{trust} (or C{cadata}); None: no checks."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.set_alpn_protocols(["http/1.1"])
    if trust is None and cadata is None:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif cadata is not None:
        context.load_verify_locations(cadata=cadata)
    elif trust.cafile or trust.capath:
        context.load_verify_locations(trust.cafile, trust.capath)
    return context


def _connectTCP(host: str, port: int, timeout: float) -> _Socket:
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except socket.gaierror as e:
        raise StepFailed("dns", f"the name {host} does not resolve ({e.strerror})")
    except ConnectionRefusedError:
        raise StepFailed("refused", f"connection to {host}:{port} refused: nothing listens there")
    except TimeoutError:
        raise StepFailed("timeout", f"no answer from {host}:{port} within {timeout:g} s")
    except OSError as e:
        raise StepFailed("unreachable", f"{host}:{port} cannot be reached ({e.strerror or e})")
    sock.settimeout(timeout)
    return _Socket(sock)


def _readAnswer(channel, withBody: bool) -> Answer:
    """One response head (and up to 4 KiB of its body when C{withBody})."""
    buffer = b""
    while b"\r\n\r\n" not in buffer and b"\n\n" not in buffer:
        if len(buffer) > _HEAD_LIMIT:
            raise StepFailed("protocol", "the answer's head is larger than 64 KiB")
        data = channel.recv(65536)
        if not data:
            if not buffer:
                raise StepFailed("closed", "the connection was closed without an answer")
            raise StepFailed("protocol", "the connection was closed in the middle of an answer")
        buffer += data
    end = buffer.find(b"\r\n\r\n")
    head, rest = (buffer[:end], buffer[end + 4 :]) if end != -1 else buffer.split(b"\n\n", 1)
    lines = head.decode("latin-1").replace("\r\n", "\n").split("\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise StepFailed("protocol", f"not an HTTP answer: {lines[0][:60]!r}")
    headers = []
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if colon:
            headers.append((name.strip(), value.strip()))
    answer = Answer(int(parts[1]), parts[2] if len(parts) > 2 else "", tuple(headers))
    if not withBody:
        channel.pending = rest
        return answer
    return _readRest(channel, answer, rest)


def _basic(proxy: ProxyURL) -> bytes:
    if proxy.user is None:
        return b""
    token = base64.b64encode(f"{proxy.user}:{proxy.password or ''}".encode()).decode("ascii")
    return f"Proxy-Authorization: Basic {token}\r\n".encode("ascii")


def _request(method: str, target: str, host: str, extra: bytes = b"") -> bytes:
    return (
        (
            f"{method} {target} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: {USER_AGENT}\r\n"
            f"Accept: */*\r\n"
        ).encode()
        + extra
        + (b"Connection: close\r\n\r\n" if method != "CONNECT" else b"\r\n")
    )


class _Run:
    """One attempt: the steps up to an open channel to the origin (TLS done for https)."""

    def __init__(self, target: Target, proxy: ProxyURL | None, timeout: float) -> None:
        self.target = target
        self.proxy = proxy
        self.timeout = timeout
        self.result = Fetch(target, proxy)
        self.channel = None

    def step(self, name: str, action) -> None:
        """Run one step: record what it saw; a failure is recorded, then raised."""
        start = time.monotonic()
        try:
            detail = action()
        except StepFailed as e:
            failure = e
        except TimeoutError:
            failure = StepFailed("timeout", f"no answer within {self.timeout:g} s")
        except OSError as e:
            failure = StepFailed("closed", f"the connection failed ({e.strerror or e})")
        else:
            self.result.steps.append(Step(name, True, detail, (time.monotonic() - start) * 1000))
            return
        elapsed = (time.monotonic() - start) * 1000
        self.result.steps.append(Step(name, False, failure.detail, elapsed, failure.error))
        raise failure

    def open(self, context: ssl.SSLContext | None) -> None:
        """TCP (to the proxy or the origin), CONNECT, TLS: raises StepFailed on a failure."""
        target, proxy = self.target, self.proxy
        if proxy is None:
            self.step("tcp", lambda: self._tcp(target.host, target.port))
        else:
            self.step("proxy-tcp", lambda: self._tcp(proxy.host, proxy.port))
            if proxy.scheme == "https":
                self.step("proxy-tls", lambda: self._proxyTLS(context))
            if target.scheme == "https":
                self.step("connect", self._connect)
        if target.scheme == "https":
            self.step("tls", lambda: self._tls(context))

    def _tcp(self, host: str, port: int) -> str:
        self.channel = _connectTCP(host, port, self.timeout)
        peer = self.channel.sock.getpeername()
        return f"connected to {host}:{port} ({peer[0]})"

    def _proxyTLS(self, context) -> str:
        channel = _TLS(self.channel, context or _context(None), self.proxy.host)
        self._handshake(channel, f"the proxy {self.proxy.host}")
        self.channel = channel
        return f"TLS with the proxy {self.proxy.host}"

    def _connect(self) -> str:
        self.channel.send(
            _request("CONNECT", self.target.authority, self.target.authority, _basic(self.proxy))
        )
        first = _readAnswer(self.channel, withBody=False)
        if first.status // 100 == 2:
            self.result.connectAnswer = first
            return f"CONNECT {self.target.authority}: {first.status} {first.reason}".rstrip()
        # Not a tunnel: the body says why (the proxy made it; it is small).
        answer = _readRest(self.channel, first, b"")
        self.result.connectAnswer = answer
        raise StepFailed(
            "status", f"CONNECT {self.target.authority}: {answer.status} {answer.reason}".rstrip()
        )

    def _tls(self, context) -> str:
        channel = _TLS(self.channel, context or _context(None), self.target.host)
        self._handshake(channel, self.target.host)
        self.channel = channel
        der = channel.peerCertificate()
        names = certificateNames(der) if der else None
        self.result.tls = TLSInfo(
            context is not None and context.verify_mode == ssl.CERT_REQUIRED,
            issuer=names.issuer if names else None,
            subject=names.subject if names else None,
            leafFingerprint=fingerprint(der) if der else None,
        )
        version = channel.tls.version()
        issuer = f", certificate issued by {names.issuer}" if names else ""
        return f"{version} with {self.target.host}{issuer}"

    def _handshake(self, channel: _TLS, who: str) -> None:
        try:
            channel.handshake()
        except ssl.SSLCertVerificationError as e:
            self.result.tls = TLSInfo(False, e.verify_code, e.verify_message)
            raise StepFailed(
                "verify", f"the certificate of {who} does not verify: {e.verify_message}"
            )
        except (ssl.SSLError, ConnectionError) as e:
            reason = getattr(e, "reason", None) or str(e)
            raise StepFailed("tls", f"the TLS handshake with {who} failed: {reason}")

    def get(self) -> Answer:
        target, proxy = self.target, self.proxy
        if target.scheme == "http" and proxy is not None:
            wire = _request("GET", target.url, target.authority, _basic(proxy))
        else:
            wire = _request("GET", target.path, target.authority)
        self.channel.send(wire)
        answer = _readAnswer(self.channel, withBody=True)
        self.result.answer = answer
        return answer

    def close(self) -> None:
        if self.channel is not None:
            try:
                self.channel.close()
            except OSError:
                pass


def _readRest(channel, first: Answer, pending: bytes) -> Answer:
    """C{first} with up to 4 KiB of its body (C{pending}: body bytes already read)."""
    length = first.header("content-length")
    want = min(int(length), _BODY_LIMIT) if length and length.isdigit() else _BODY_LIMIT
    body = pending
    try:
        while len(body) < want:
            data = channel.recv(65536)
            if not data:
                break
            body += data
    except (OSError, ssl.SSLError):
        pass
    return Answer(first.status, first.reason, first.headers, body[:want].decode("utf-8", "replace"))


# -- what the CLI calls ---------------------------------------------------------------------


def fetch(target: Target, proxy: ProxyURL | None, trust: Trust, timeout: float) -> Fetch:
    """The whole fetch with C{trust}: every step it got to, and what each one saw."""
    run = _Run(target, proxy, timeout)
    try:
        try:
            context = _context(trust)
        except (OSError, ssl.SSLError) as e:
            context = None
            bundleProblem = f"{trust.label} ({trust.cafile or trust.capath}) cannot be used: " + (
                getattr(e, "strerror", None) or getattr(e, "reason", None) or str(e)
            )
        else:
            bundleProblem = None
        if bundleProblem and target.scheme == "https":
            run.result.steps.append(Step("tls", False, bundleProblem, 0.0, "bundle"))
            return run.result
        run.open(context)

        def get() -> str:
            answer = run.get()
            said = f"GET {target.path}: {answer.status} {answer.reason}".rstrip()
            if answer.status >= 400:
                raise StepFailed("status", said)
            return said

        run.step("http", get)
    except StepFailed:
        pass
    finally:
        run.close()
    return run.result


def verifies(
    target: Target,
    proxy: ProxyURL | None,
    trust: Trust | None,
    timeout: float,
    cadata: str | None = None,
) -> tuple[bool | None, str]:
    """
    Whether a TLS handshake with C{target} (through C{proxy}) verifies against C{trust}:
    (True, ""), (False, why), or (None, why) when it could not get as far as TLS.
    """
    run = _Run(target, proxy, timeout)
    try:
        run.open(_context(trust, cadata))
        return True, ""
    except (OSError, ssl.SSLError) as e:
        return None, f"the bundle cannot be read ({getattr(e, 'strerror', None) or e})"
    except StepFailed as e:
        return (False if e.error == "verify" else None), e.detail
    finally:
        run.close()


def leafOf(target: Target, proxy: ProxyURL | None, timeout: float) -> TLSInfo | None:
    """The server certificate's names, read without verifying it (after a failed check)."""
    run = _Run(target, proxy, timeout)
    try:
        run.open(None)
    except StepFailed:
        return None
    finally:
        run.close()
    return run.result.tls


def fetchCA(base: str, timeout: float) -> tuple[str | None, str]:
    """
    proxygate's CA from its metrics listener (C{base} + /ca.pem): (PEM text, "") or
    (None, why not). Plain HTTP on purpose: it is how proxygate serves it.
    """
    parts = urlsplit(base if "://" in base else f"http://{base}")
    if parts.scheme != "http" or not parts.hostname:
        return None, f"{base} is not an http:// address"
    try:
        port = parts.port or 80
    except ValueError:
        return None, f"{base} has a bad port"
    try:
        channel = _connectTCP(parts.hostname, port, timeout)
    except StepFailed as e:
        return None, e.detail
    try:
        channel.send(_request("GET", "/ca.pem", f"{parts.hostname}:{port}"))
        answer = _readAnswer(channel, withBody=True)
    except (StepFailed, OSError) as e:
        return None, getattr(e, "detail", None) or str(e)
    finally:
        channel.close()
    if answer.status != 200 or "BEGIN CERTIFICATE" not in answer.body:
        return None, f"GET /ca.pem answered {answer.status} {answer.reason}".rstrip()
    return answer.body, ""
