"""
The PROXY protocol on haproxy: listeners (gateway/proxyprotocol.py): the parser, the
hand-over to the client protocol (in process, with a clock), and end to end: hand-written
v1 and v2 headers from an allowed and a denied address (status, X-Forwarded-For at the
origin, access log, metrics), with workers too. The real HAProxy in front of two proxygate
processes is in test_haproxy.py.
"""

from __future__ import annotations

import json
import socket
import struct
import time

import pytest
import pytest_twisted
from twisted.internet import reactor, task, tcp, threads
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport

from gateway.config import ConfigError, parseConfig, serverEndpoint
from gateway.proxyprotocol import (
    V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderError,
    ProxyHeaderFactory,
    parseProxyHeader,
)
from tests.support import LOOPBACK_INI, freePort, rawRequest, waitFor


def v1(source: str, sport: int = 40000, dest: str | None = None, dport: int = 3128) -> bytes:
    family = "TCP6" if ":" in source else "TCP4"
    if dest is None:
        dest = "::1" if ":" in source else "127.0.0.1"
    return f"PROXY {family} {source} {dest} {sport} {dport}\r\n".encode()


def v2(source: str, sport: int = 40000, dest: str | None = None, dport: int = 3128) -> bytes:
    if dest is None:
        dest = "::1" if ":" in source else "127.0.0.1"
    if ":" in source:
        body = socket.inet_pton(socket.AF_INET6, source) + socket.inet_pton(socket.AF_INET6, dest)
        family = 0x21
    else:
        body = socket.inet_aton(source) + socket.inet_aton(dest)
        family = 0x11
    body += struct.pack("!HH", sport, dport)
    return V2_SIGNATURE + struct.pack("!BBH", 0x21, family, len(body)) + body


# -- the parser --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected", "rest"),
    [
        (v1("10.1.2.3", 5555), ProxyHeader(1, ("10.1.2.3", 5555), ("127.0.0.1", 3128)), b""),
        (
            v1("2001:db8::1", 1, "2001:db8::2", 2),
            ProxyHeader(1, ("2001:db8::1", 1), ("2001:db8::2", 2)),
            b"",
        ),
        (b"PROXY UNKNOWN\r\nGET", ProxyHeader(1), b"GET"),
        (b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n", ProxyHeader(1), b""),
        (v2("10.1.2.3", 5555), ProxyHeader(2, ("10.1.2.3", 5555), ("127.0.0.1", 3128)), b""),
        (v2("2001:db8::1", 7), ProxyHeader(2, ("2001:db8::1", 7), ("::1", 3128)), b""),
        # LOCAL (a health check from the balancer itself), with a TLV to skip
        (V2_SIGNATURE + b"\x20\x00\x00\x03abc" + b"GET", ProxyHeader(2), b"GET"),
        # TLVs after the addresses are skipped
        (
            V2_SIGNATURE
            + b"\x21\x11\x00\x10"
            + socket.inet_aton("1.2.3.4") * 2
            + b"\x00\x01\x00\x02"
            + b"\x04\x00\x01x",
            ProxyHeader(2, ("1.2.3.4", 1), ("1.2.3.4", 2)),
            b"",
        ),
    ],
)
def test_parsesHeaders(data: bytes, expected: ProxyHeader, rest: bytes) -> None:
    """C{rest}: what follows the header (the client's first bytes)."""
    assert parseProxyHeader(data) == (expected, len(data) - len(rest))


@pytest.mark.parametrize("header", [v1("10.1.2.3"), v2("10.1.2.3"), v2("2001:db8::5")])
def test_everyPrefixNeedsMore(header: bytes) -> None:
    """A header arriving a byte at a time is never refused before it is complete."""
    for end in range(len(header)):
        assert parseProxyHeader(header[:end]) == (None, 0)
    assert parseProxyHeader(header)[1] == len(header)


@pytest.mark.parametrize(
    "data",
    [
        b"GET http://example.com/ HTTP/1.1\r\n\r\n",
        b"CONNECT example.com:443 HTTP/1.1\r\n\r\n",
        b"\x16\x03\x01\x00",  # a TLS ClientHello: the client skipped the balancer
        b"PROXY TCP4 10.1.2.3 127.0.0.1 1\r\n",  # a field missing
        b"PROXY TCP4 evil.example 127.0.0.1 1 2\r\n",  # not an address
        b"PROXY TCP4 ::1 127.0.0.1 1 2\r\n",  # the wrong family
        b"PROXY TCP4 10.1.2.3 127.0.0.1 1 99999\r\n",  # port out of range
        b"PROXY TCP4 10.1.2.3 127.0.0.1 -1 2\r\n",
        b"PROXY TCP5 10.1.2.3 127.0.0.1 1 2\r\n",
        b"PROXY " + b"1" * 120,  # no CRLF within 107 bytes
        V2_SIGNATURE + b"\x31\x11\x00\x0c" + b"\x00" * 12,  # version 3
        V2_SIGNATURE + b"\x22\x11\x00\x0c" + b"\x00" * 12,  # command 2
        V2_SIGNATURE + b"\x21\x12\x00\x0c" + b"\x00" * 12,  # UDP
        V2_SIGNATURE + b"\x21\x31\x00\xd8" + b"\x00" * 216,  # a UNIX socket source
        V2_SIGNATURE + b"\x21\x11\x00\x04" + b"\x00" * 4,  # addresses cut short
    ],
)
def test_refusesWhatIsNotAValidHeader(data: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        parseProxyHeader(data)


# -- the hand-over, in process -----------------------------------------------------------------


class Recording(Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.peerAtConnect = None

    def connectionMade(self) -> None:
        self.peerAtConnect = self.transport.getPeer()

    def dataReceived(self, data: bytes) -> None:
        self.received += data


class RecordingFactory(Factory):
    def __init__(self) -> None:
        self.built: list[Recording] = []

    def buildProtocol(self, addr) -> Recording:
        p = Recording()
        self.built.append(p)
        return p


def readerOn(clock, timeout: float = 30.0):
    inner = RecordingFactory()
    refusals: list[tuple[object, str]] = []
    factory = ProxyHeaderFactory(
        inner, clock=clock, timeout=lambda: timeout, refused=lambda p, why: refusals.append(why)
    )
    reader = factory.buildProtocol(None)
    transport = StringTransport()
    transport.protocol = reader
    reader.makeConnection(transport)
    return inner, reader, transport, refusals


def test_clientProtocolIsMadeOnlyOnceTheHeaderIsRead() -> None:
    """The peer the client protocol sees at connectionMade is the header's source."""
    clock = task.Clock()
    inner, reader, transport, refusals = readerOn(clock)
    for byte in v2("10.1.2.3", 5555):
        assert not inner.built
        reader.dataReceived(bytes([byte]))
    (client,) = inner.built
    transport.protocol.dataReceived(b"GET / HTTP/1.1\r\n")  # as TCP delivers: to .protocol
    assert (client.peerAtConnect.host, client.peerAtConnect.port) == ("10.1.2.3", 5555)
    assert transport.getPeer().host == "10.1.2.3"
    # The transport is the client's now: its bytes go straight to it.
    assert transport.protocol is client
    assert client.transport is transport
    assert client.received == b"GET / HTTP/1.1\r\n"
    assert not refusals and not clock.getDelayedCalls()


def test_bytesInTheHeadersReadReachTheClient() -> None:
    inner, reader, _, _ = readerOn(task.Clock())
    reader.dataReceived(v1("10.9.9.9") + b"GET http://x/ HTTP/1.1\r\n\r\n")
    assert inner.built[0].received == b"GET http://x/ HTTP/1.1\r\n\r\n"


def test_localCommandKeepsTheRealPeer() -> None:
    inner, reader, transport, _ = readerOn(task.Clock())
    real = transport.getPeer()
    reader.dataReceived(V2_SIGNATURE + b"\x20\x00\x00\x00")
    assert inner.built[0].peerAtConnect == real


def test_noHeaderWithinTheTimeoutIsRefused() -> None:
    clock = task.Clock()
    inner, reader, transport, refusals = readerOn(clock, timeout=5)
    reader.dataReceived(b"PROXY TCP4 10.")
    clock.advance(4.9)
    assert not transport.disconnecting
    clock.advance(0.2)
    assert transport.disconnecting and not inner.built
    assert refusals == ["no PROXY protocol header within header_timeout"]


def test_badHeaderIsRefusedAndNothingReachesTheClient() -> None:
    clock = task.Clock()
    inner, reader, transport, refusals = readerOn(clock)
    reader.dataReceived(b"GET http://example.com/ HTTP/1.1\r\n\r\n")
    assert transport.disconnecting and not inner.built and transport.value() == b""
    assert refusals == ["the connection did not start with a PROXY protocol header"]
    assert not clock.getDelayedCalls()
    reader.dataReceived(b"more")  # after the refusal: ignored
    assert not inner.built


@pytest_twisted.inlineCallbacks
def test_handOverLeavesAPlainTCPTransport():
    """
    On real sockets: after the header the client protocol's transport is the TCP
    connection itself, so writeNow's direct send applies (no wrapper in between).
    """
    inner = RecordingFactory()
    port = yield serverEndpoint(reactor, "haproxy:tcp:0:interface=127.0.0.1").listen(inner)
    try:
        number = port.getHost().port

        def send() -> None:
            with socket.create_connection(("127.0.0.1", number), timeout=5) as s:
                s.sendall(v1("10.1.2.3", 1234) + b"hello")
                time.sleep(0.3)

        yield threads.deferToThread(send)
        (client,) = inner.built
        assert isinstance(client.transport, tcp.Connection)
        assert client.peerAtConnect.host == "10.1.2.3"
        assert client.received == b"hello"
    finally:
        yield port.stopListening()


def test_haproxyListenersInTheConfiguration() -> None:
    """haproxy: wraps tcp:, tcp6: and ssl:, is refused around itself, and may have workers."""
    c = parseConfig("[proxy]\nworkers = 2\nlisten = haproxy:tcp:0:interface=127.0.0.1")
    assert c.proxy.listen == ("haproxy:tcp:0:interface=127.0.0.1",)
    with pytest.raises(ConfigError, match="haproxy: cannot wrap"):
        parseConfig("[proxy]\nlisten = haproxy:haproxy:tcp:0")
    # Reachable from the network, every address allowed, no password: an open proxy, as
    # without the prefix.
    with pytest.raises(ConfigError, match="open proxy"):
        parseConfig("[proxy]\nlisten = haproxy:tcp:3128\nallowed_client_cidrs = 0.0.0.0/0")
    assert parseConfig(
        "[proxy]\nlisten = haproxy:tcp:3128:interface=127.0.0.1\nallowed_client_cidrs = 0.0.0.0/0"
    )


# -- end to end ------------------------------------------------------------------------------


PROXIED_INI = (
    LOOPBACK_INI
    + """allowed_client_cidrs = 10.1.2.0/24 2001:db8::/32
forwarded_for = on
"""
)


PROXIED_LISTEN = "haproxy:tcp:0:interface=127.0.0.1"


def startProxied(startProxy, tmp_path, extra: str = ""):
    log = tmp_path / f"access-{freePort()}.log"
    ini = PROXIED_INI + extra + f"\n[log]\naccess_log = {log}\nformat = json\n"
    p = startProxy(ini, listen=PROXIED_LISTEN)
    p.accessPath = log
    return p


def accessRecords(p) -> list[dict]:
    p.settle()
    time.sleep(1.1)  # the file is flushed once a second
    return [json.loads(line) for line in p.accessPath.read_text().splitlines() if line]


def getThrough(port: int, header: bytes, url: str) -> bytes:
    return rawRequest(
        port, header + f"GET {url} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    )


@pytest.mark.parametrize("make", [v1, v2], ids=["v1", "v2"])
def test_allowedAndDeniedAddresses(startProxy, tmp_path, origin, make) -> None:
    """
    The header's address is the client: the balancer (127.0.0.1) is not in
    allowed_client_cidrs, 10.1.2.3 is, 192.0.2.9 is not.
    """
    p = startProxied(startProxy, tmp_path)
    allowed = getThrough(p.port, make("10.1.2.3"), origin.url("/echo"))
    assert allowed.startswith(b"HTTP/1.1 200"), allowed
    doc = json.loads(allowed.split(b"\r\n\r\n", 1)[1])
    forwarded = [v for k, v in doc["headers"] if k.lower() == "x-forwarded-for"]
    assert forwarded == ["10.1.2.3"]

    before = len(origin.requests)
    denied = getThrough(p.port, make("192.0.2.9"), origin.url("/echo"))
    assert denied.startswith(b"HTTP/1.1 403"), denied
    assert b"not allowed" in denied
    assert len(origin.requests) == before

    records = accessRecords(p)
    served = [r for r in records if r["code"] == 200]
    refused = [r for r in records if r["code"] == 403]
    assert [r["client"] for r in served] == ["10.1.2.3"]
    assert [(r["client"], r["action"]) for r in refused] == [("192.0.2.9", "TCP_DENIED")]
    assert "127.0.0.1" not in {r["client"] for r in records}
    assert p.metric("proxygate_denied_total", reason="client") == 1


def test_ipv6SourceAndAByteAtATimeHeader(startProxy, tmp_path, origin) -> None:
    p = startProxied(startProxy, tmp_path)
    data = v1("2001:db8::7") + (
        f"GET {origin.url('/echo')} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    )
    with socket.create_connection(("127.0.0.1", p.port), timeout=5) as s:
        for i in range(0, 60):
            s.sendall(data[i : i + 1])
            time.sleep(0.002)
        s.sendall(data[60:])
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200"), answer
    assert b'"X-Forwarded-For", "2001:db8::7"' in answer


def test_connectionWithoutAHeaderIsClosedAndLogged(startProxy, tmp_path, origin) -> None:
    p = startProxied(startProxy, tmp_path)
    answer = rawRequest(p.port, f"GET {origin.url('/')} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert answer == b""
    (record,) = accessRecords(p)
    assert record["client"] == "127.0.0.1" and record["action"] == "TCP_DENIED"
    assert "PROXY protocol header" in record["reason"]
    assert p.metric("proxygate_denied_total", reason="client") == 1


def test_tunnelLogsTheProxiedClient(startProxy, tmp_path, server) -> None:
    from tests.support.tunnel import echoHandler

    echo = server(echoHandler)
    p = startProxied(startProxy, tmp_path)
    with socket.create_connection(("127.0.0.1", p.port), timeout=5) as s:
        s.sendall(v2("10.1.2.44") + f"CONNECT 127.0.0.1:{echo.port} HTTP/1.1\r\n\r\n".encode())
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
        s.sendall(b"ping")
        assert s.recv(4) == b"ping"
    records = waitFor(lambda: [r for r in accessRecords(p) if r["method"] == "CONNECT"])
    assert [r["client"] for r in records] == ["10.1.2.44"]


def test_workersShareHaproxyListeners(startProxy, origin) -> None:
    """Each worker adopts its copy of the haproxy: socket and reads the header itself."""
    p = startProxy(PROXIED_INI + "workers = 2\n[log]\nformat = json\n", listen=PROXIED_LISTEN)
    assert waitFor(lambda: "worker 1 (pid" in p.log() and "serving" in p.log(), 15), p.log()
    answers = [getThrough(p.port, v1(f"10.1.2.{n}"), origin.url("/echo")) for n in range(1, 41)]
    assert all(a.startswith(b"HTTP/1.1 200") for a in answers)
    assert getThrough(p.port, v1("192.0.2.1"), origin.url("/")).startswith(b"HTTP/1.1 403")

    def records():
        lines = p.accessLines()
        return len(lines) >= 41 and lines

    byProcess: dict[str, set[str]] = {}
    for line in waitFor(records, 10):
        process = "worker1" if ",worker1]" in line else "master"
        record = json.loads(line.split("] ", 1)[1])
        byProcess.setdefault(process, set()).add(record["client"])
    assert set(byProcess) == {"master", "worker1"}, byProcess
    assert set.union(*byProcess.values()) == {f"10.1.2.{n}" for n in range(1, 41)} | {"192.0.2.1"}


def test_headerBeforeTLSOnAnSSLListener(startProxy, tmp_path, origin) -> None:
    """haproxy:ssl: the header comes in clear, then TLS (what HAProxy sends to a TLS server)."""
    import ssl

    from tests.support.tlsorigin import makeCA

    pki = makeCA(tmp_path / "pki")
    p = startProxy(
        PROXIED_INI,
        listen=f"haproxy:ssl:0:interface=127.0.0.1:privateKey={pki.key}:certKey={pki.cert}",
    )
    context = ssl.create_default_context(cafile=str(pki.caCert))
    with socket.create_connection(("127.0.0.1", p.port), timeout=5) as raw:
        raw.sendall(v2("10.1.2.9"))
        with context.wrap_socket(raw, server_hostname="localhost") as s:
            request = f"GET {origin.url('/echo')} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            s.sendall(request.encode())
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
    assert answer.startswith(b"HTTP/1.1 200"), answer
    assert b'"X-Forwarded-For", "10.1.2.9"' in answer
