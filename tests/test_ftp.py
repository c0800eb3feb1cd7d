"""
ftp:// through the HTTP proxy (issue 19, item 12): the FTP side of an exchange.

- Pure: ftp:// URLs (credentials, ports, ;type=, CR/LF/NUL refused), FTP replies as HTTP
  statuses, PASV and EPSV replies, content types.
- In process, over real loopback sockets against Twisted's FTP server (tests/support/ftpserver.py)
  with a recorder standing in for the exchange: files (with Content-Length from SIZE),
  listings (LIST, NLST, a directory named without its slash), missing files (404), a
  refused login (401 with a challenge), credentials from the URL and from Authorization,
  HEAD, methods that are not GET or HEAD (405), ftp_ports and ftp_data_ports, a server
  that names another host in its PASV reply (never connected to), a server that goes
  silent (504, on a task.Clock), and a 60 MB file read slowly (memory stays flat: the data
  connection is paused while the reader is behind).
- The listing is what curl gets from the same server directly.

The end-to-end tests through proxygate (curl -x and urllib with ftp_proxy) are in
tests/test_ftp_proxy.py.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.internet.utils import getProcessOutputAndValue

from gateway.ftp import (
    ANONYMOUS,
    MODE,
    Credentials,
    FTPFetch,
    FTPSettings,
    parseFTPPath,
    parseFTPTarget,
)
from gateway.ftp.replies import (
    PassiveReplyError,
    contentType,
    parsePassivePort,
    replyText,
    statusFor,
)
from gateway.http1.parse import HTTPError
from gateway.message import NO_BODY, UNKNOWN, Request
from gateway.policy import DestinationPolicy
from gateway.proxy.dial import Dialer
from tests.support.ftpserver import PASSWORD, USER, layout, listen

# -- URLs ----------------------------------------------------------------------------------


def test_parseTarget():
    t = parseFTPTarget(b"ftp://Files.Example.com/pub/a%20b.txt;type=i")
    assert (t.host, t.port, t.authority, t.path) == (
        "files.example.com", 21, b"files.example.com", b"/pub/a%20b.txt;type=i"
    )  # fmt: skip
    assert t.credentials is None and t.url() == "ftp://files.example.com/pub/a%20b.txt;type=i"


def test_parseTargetCredentialsAreDecodedAndNeverShown():
    t = parseFTPTarget(b"ftp://al%40ice:p%3Ass%2Fw%C3%A9@127.0.0.1:2121/x")
    assert t.credentials == Credentials("al@ice", "p:ss/w\xc3\xa9")  # the UTF-8 bytes
    assert (t.host, t.port, t.authority) == ("127.0.0.1", 2121, b"127.0.0.1:2121")
    for shown in (repr(t), t.url(), repr(t.credentials)):
        assert "p:ss" not in shown and "p%3Ass" not in shown


@pytest.mark.parametrize(
    "target",
    [
        b"http://x/",
        b"ftp://",
        b"ftp:///x",
        b"ftp://x:0/",
        b"ftp://[dead.beef]/",
        b"ftp://a..b/",
        b"ftp://:pw@x/",
        b"ftp://u%0d%0aDELE%20x:pw@x/",
        b"ftp://x/a%0d%0aDELE%20b",
        b"ftp://x/a%00b",
        b"ftp://x/a;type=q",
        b"ftp://x/" + b"a/" * 70,
    ],
)
def test_parseTargetRefuses(target):
    with pytest.raises(HTTPError) as e:
        parseFTPTarget(target)
    assert e.value.status == 400


@pytest.mark.parametrize(
    ("path", "directories", "name", "kind"),
    [
        (b"", (), "", None),
        (b"/", (), "", None),
        (b"/pub/", ("pub",), "", None),
        (b"/pub/file.txt", ("pub",), "file.txt", None),
        (b"/pub//deep/f", ("pub", "deep"), "f", None),
        (b"//etc/passwd", ("/", "etc"), "passwd", None),
        (b"/a%2Fb/c", ("a/b",), "c", None),
        (b"/notes.txt;type=a", (), "notes.txt", "a"),
        (b"/pub;type=d", ("pub",), "", "d"),
        (b"/pub/;TYPE=D", ("pub",), "", "d"),
        (b"/caf%C3%A9", (), "caf\xc3\xa9", None),
    ],
)
def test_parsePath(path, directories, name, kind):
    parsed = parseFTPPath(path)
    assert (parsed.directories, parsed.name, parsed.type) == (directories, name, kind)


# -- replies -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lines", "port"),
    [
        (["227 Entering Passive Mode (127,0,0,1,195,80)."], 50000),
        (["227 Entering Passive Mode 10,1,2,3,4,1"], 1025),
        (["229 Entering Extended Passive Mode (|||50001|)"], 50001),
        (["229 Entering Extended Passive Mode (!!!2121!)"], 2121),
    ],
)
def test_passivePort(lines, port):
    assert parsePassivePort(lines) == port


@pytest.mark.parametrize(
    "lines",
    [
        ["227 Entering Passive Mode (127,0,0,1,256,80)"],
        ["227 Entering Passive Mode (127,0,0,1,0,0)"],
        ["227 garbage"],
        ["229 Entering Extended Passive Mode (|||99999|)"],
        ["229 Entering Extended Passive Mode (|1|::1|2121|)"],
        ["200 OK"],
        [],
    ],
)
def test_passiveReplyRefused(lines):
    with pytest.raises(PassiveReplyError):
        parsePassivePort(lines)


def test_statusFor():
    assert statusFor(530, "login") == 401 and statusFor(532, "login") == 401
    assert statusFor(550, "path") == 404
    assert statusFor(530, "path") == 502 and statusFor(421, "login") == 502
    assert statusFor(425, "path") == 502 and statusFor(451, "path") == 502


def test_replyText():
    assert replyText(["550 no\x1b[31m such", " file"]) == "550 no [31m such file"
    assert len(replyText(["5" * 500])) == 203


def test_contentType():
    assert contentType("a.txt") == b"text/plain"
    assert contentType("a.tar.gz") == b"application/gzip"
    assert contentType("README") == b"application/octet-stream"
    assert contentType("a.bin", ascii=True) == b"text/plain"


# -- the FTP side, in process ----------------------------------------------------------------


class Recorder:
    """The exchange as the fetch sees it: records events; bodies hashed, not kept."""

    def __init__(self, keep: bool = True) -> None:
        self.keep = keep
        self.head = None
        self.body = bytearray()
        self.digest = hashlib.sha256()
        self.size = 0
        self.outcome: tuple | None = None
        self.done = defer.Deferred()
        self.flushes = 0

    def _end(self, *outcome) -> None:
        assert self.outcome is None, (self.outcome, outcome)
        self.outcome = outcome
        self.done.callback(self)

    def upstreamUnavailable(self, error) -> None:
        self._end("unavailable", error)

    def responseHead(self, response) -> None:
        assert self.head is None
        self.head = response

    def responseData(self, data: bytes) -> None:
        assert self.head is not None
        self.size += len(data)
        self.digest.update(data)
        if self.keep:
            self.body += data

    def responseFlush(self) -> None:
        self.flushes += 1

    def responseEnd(self, trailers=None) -> None:
        self._end("end")

    def upstreamFailed(self, problem) -> None:
        self._end("failed", problem.status, problem.detail, problem.code)

    def upstreamLost(self, problem) -> None:
        self._end("lost", problem.detail)

    def field(self, name: bytes) -> bytes | None:
        for n, v in self.head.fields:
            if n.lower() == name:
                return v
        return None


@pytest.fixture
def ftpRoot(tmp_path) -> Path:
    anonymous, homes = layout(tmp_path / "ftp")
    (anonymous / "pub").mkdir()
    (anonymous / "pub" / "hello.txt").write_bytes(b"hello, ftp\n")
    (anonymous / "pub" / "empty.bin").write_bytes(b"")
    (anonymous / "pub" / "data.bin").write_bytes(bytes(range(256)) * 1000)
    (anonymous / "pub" / "sub").mkdir()
    (anonymous / "readme.md").write_bytes(b"# top\n")
    (homes / USER / "private.txt").write_bytes(b"for alice only\n")
    return tmp_path / "ftp"


@pytest.fixture
def ftpServer(ftpRoot):
    port = listen(reactor, ftpRoot)
    yield port.getHost().port
    pytest_twisted.blockon(defer.maybeDeferred(port.stopListening))


def request(method: bytes, port: int, path: bytes, fields=(), host: str = "127.0.0.1"):
    return Request(
        method, "ftp", host, port, f"{host}:{port}".encode(), path, b"HTTP/1.1", list(fields)
    )


def dialer(timeout: float = 5.0) -> Dialer:
    return Dialer(reactor, DestinationPolicy((), ()), timeout)


SETTINGS = FTPSettings(ports=((1, 65535),), dataPorts=((1024, 65535),), timeout=10.0)


def fetch(req, settings=SETTINGS, credentials=None, keep=True) -> defer.Deferred:
    recorder = Recorder(keep)
    side = FTPFetch(recorder, dialer(), settings, credentials)
    side.sendHead(req)
    recorder.side = side
    return recorder.done.addTimeout(30, reactor)


@pytest_twisted.inlineCallbacks
def test_fileWithLength(ftpServer):
    r = yield fetch(request(b"GET", ftpServer, b"/pub/hello.txt"))
    assert r.outcome == ("end",)
    assert (r.head.status, r.head.length, bytes(r.body)) == (200, 11, b"hello, ftp\n")
    assert r.field(b"content-type") == b"text/plain"
    assert r.side.ip == "127.0.0.1" and r.flushes >= 1


@pytest_twisted.inlineCallbacks
def test_binaryFileIntact(ftpServer):
    r = yield fetch(request(b"GET", ftpServer, b"/pub/data.bin"))
    assert r.outcome == ("end",) and bytes(r.body) == bytes(range(256)) * 1000
    assert r.head.length == 256000 and r.field(b"content-type") == b"application/octet-stream"


@pytest_twisted.inlineCallbacks
def test_emptyFile(ftpServer):
    r = yield fetch(request(b"GET", ftpServer, b"/pub/empty.bin"))
    assert r.outcome == ("end",) and r.head.status == 200 and r.head.length == 0
    assert r.body == b""


@pytest_twisted.inlineCallbacks
def test_listing(ftpServer):
    r = yield fetch(request(b"GET", ftpServer, b"/pub/"))
    assert r.outcome == ("end",) and r.head.status == 200 and r.head.length is UNKNOWN
    assert r.field(b"content-type") == b"text/plain; charset=utf-8"
    text = bytes(r.body).decode()
    for name in ("hello.txt", "empty.bin", "data.bin", "sub"):
        assert name in text
    assert text.splitlines()[0].startswith(("-", "d"))  # ls -l lines


@pytest_twisted.inlineCallbacks
def test_directoryWithoutSlashIsListed(ftpServer):
    r = yield fetch(request(b"GET", ftpServer, b"/pub"))
    assert r.outcome == ("end",) and b"hello.txt" in r.body


@pytest_twisted.inlineCallbacks
def test_rootAndNamesOnly(ftpServer):
    r = yield fetch(request(b"GET", ftpServer, b"/"))
    assert b"pub" in r.body and b"readme.md" in r.body
    names = yield fetch(request(b"GET", ftpServer, b"/pub;type=d"))
    assert sorted(bytes(names.body).split()) == [b"data.bin", b"empty.bin", b"hello.txt", b"sub"]


@pytest_twisted.inlineCallbacks
def test_missingFileIs404(ftpServer):
    for path in (b"/pub/nope.txt", b"/nowhere/x.txt", b"/nowhere/"):
        r = yield fetch(request(b"GET", ftpServer, path))
        assert r.outcome == ("end",) and r.head.status == 404, path
        assert b"550" in r.body and r.field(b"content-type") == b"text/plain; charset=utf-8"


@pytest_twisted.inlineCallbacks
def test_refusedLoginIs401WithAChallenge(ftpServer):
    r = yield fetch(request(b"GET", ftpServer, b"/"), credentials=Credentials(USER, "wrong"))
    assert r.head.status == 401
    assert r.field(b"www-authenticate") == b'Basic realm="FTP 127.0.0.1"'
    assert b"wrong" not in r.body and b"530" in r.body


@pytest_twisted.inlineCallbacks
def test_loginFromTheURL(ftpServer):
    r = yield fetch(
        request(b"GET", ftpServer, b"/private.txt"), credentials=Credentials(USER, PASSWORD)
    )
    assert r.head.status == 200 and bytes(r.body) == b"for alice only\n"


@pytest_twisted.inlineCallbacks
def test_loginFromAuthorization(ftpServer):
    import base64

    token = base64.b64encode(f"{USER}:{PASSWORD}".encode())
    r = yield fetch(
        request(b"GET", ftpServer, b"/private.txt", [(b"Authorization", b"Basic " + token)])
    )
    assert r.head.status == 200 and bytes(r.body) == b"for alice only\n"
    anonymous = yield fetch(request(b"GET", ftpServer, b"/private.txt"))
    assert anonymous.head.status == 404  # not in the anonymous root


@pytest_twisted.inlineCallbacks
def test_head(ftpServer):
    r = yield fetch(request(b"HEAD", ftpServer, b"/pub/data.bin"))
    assert r.outcome == ("end",) and r.head.status == 200
    assert (r.head.length, r.head.statedLength) == (NO_BODY, b"256000") and r.body == b""
    listing = yield fetch(request(b"HEAD", ftpServer, b"/pub/"))
    assert listing.head.status == 200 and listing.body == b""
    missing = yield fetch(request(b"HEAD", ftpServer, b"/pub/nope"))
    assert missing.head.status == 404 and missing.body == b""


@pytest.mark.parametrize("method", [b"PUT", b"POST", b"DELETE", b"OPTIONS"])
@pytest_twisted.inlineCallbacks
def test_otherMethodsAre405(ftpServer, method):
    r = yield fetch(request(method, ftpServer, b"/pub/hello.txt"))
    assert r.head.status == 405 and r.field(b"allow") == b"GET, HEAD"
    assert r.side.control is None  # nothing was dialled


@pytest_twisted.inlineCallbacks
def test_controlPortOutsideFtpPorts(ftpServer):
    settings = FTPSettings(ports=((21, 21), (2000, 2100)))
    r = yield fetch(request(b"GET", ftpServer, b"/"), settings=settings)
    kind, status, detail, code = r.outcome
    assert (kind, status, code) == ("failed", 403, "port")
    assert detail == f"Destination denied: port {ftpServer} is not in ftp_ports (21 2000-2100)"
    assert r.side.control is None  # nothing was dialled


@pytest_twisted.inlineCallbacks
def test_dataPortOutsideFtpDataPorts(ftpServer):
    settings = FTPSettings(ports=((1, 65535),), dataPorts=((1, 1000),), timeout=10.0)
    r = yield fetch(request(b"GET", ftpServer, b"/pub/hello.txt"), settings=settings)
    assert r.outcome[:2] == ("failed", 502) and "ftp_data_ports" in r.outcome[2]


@pytest_twisted.inlineCallbacks
def test_unresolvableHostIsADialError(ftpServer):
    r = yield fetch(request(b"GET", 21, b"/", host="a..b"))
    assert r.outcome[0] == "failed" and r.outcome[3] == "dns"


@pytest_twisted.inlineCallbacks
def test_bounceAddressIsIgnored(ftpRoot):
    # A listener on the address the server names: it must never see a connection.
    trap = socket.socket()
    trap.bind(("127.0.0.2", 0))
    trap.listen(8)
    trap.setblocking(False)
    port = listen(reactor, ftpRoot, bounce="127.0.0.2")
    try:
        r = yield fetch(request(b"GET", port.getHost().port, b"/pub/hello.txt"))
        assert r.head.status == 200 and bytes(r.body) == b"hello, ftp\n"
        with pytest.raises(BlockingIOError):
            trap.accept()
    finally:
        trap.close()
        yield port.stopListening()


def test_silentServerIs504():
    """A server that accepts and never answers: 504 after the timeout (task.Clock)."""
    clock = task.Clock()

    class FakeDialer:
        reactor = clock

        def connect(self, host, port, protocol, wrap=None, checked=True):
            from twisted.internet.testing import StringTransport

            protocol.makeConnection(StringTransport())
            return defer.succeed("192.0.2.7")

    recorder = Recorder()
    side = FTPFetch(recorder, FakeDialer(), FTPSettings(ports=((21, 21),), timeout=30.0))
    side.sendHead(request(b"GET", 21, b"/pub/x.txt", host="ftp.example"))
    clock.advance(29)
    assert recorder.outcome is None
    clock.advance(2)
    assert recorder.outcome[:2] == ("failed", 504)
    assert side.ip == "192.0.2.7"


def test_answersKnownInSendHeadComeOnTheNextTurn():
    clock = task.Clock()
    recorder = Recorder()
    side = FTPFetch(recorder, dialer(), SETTINGS, reactor=clock)
    side.sendHead(request(b"PUT", 21, b"/x"))
    assert recorder.head is None
    clock.advance(0)
    assert recorder.head.status == 405


def test_modeLabel():
    assert MODE == "ftp"
    assert ANONYMOUS.user == "anonymous"


class SlowReader(Recorder):
    """Pauses the fetch past HIGH bytes held; drains RATE bytes per tick and resumes."""

    HIGH = 256 * 1024
    RATE = 2 * 1024 * 1024
    TICK = 0.05

    def __init__(self) -> None:
        super().__init__(keep=False)
        self.held = 0
        self.maxHeld = 0
        self.paused = False
        self.pauses = 0
        self.drain = task.LoopingCall(self._drain)

    def responseData(self, data: bytes) -> None:
        super().responseData(data)
        self.held += len(data)
        self.maxHeld = max(self.maxHeld, self.held)
        if self.held > self.HIGH and not self.paused:
            self.paused = True
            self.pauses += 1
            self.side.pause()

    def _drain(self) -> None:
        self.held = max(0, self.held - self.RATE)
        if self.paused and self.held <= self.HIGH // 2:
            self.paused = False
            self.side.resume()

    def _end(self, *outcome) -> None:
        if self.drain.running:
            self.drain.stop()
        super()._end(*outcome)


def _rss() -> int:
    with open(f"/proc/{os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


@pytest.mark.slow
@pytest_twisted.inlineCallbacks
def test_slowReaderKeepsMemoryFlat(ftpServer, ftpRoot):
    size = 60 * 1024 * 1024
    big = ftpRoot / "anonymous" / "pub" / "big.bin"
    with open(big, "wb") as f:
        f.write(b"head" * 1024)
        f.truncate(size)  # sparse: the disk holds almost nothing
    expected = hashlib.sha256()
    with open(big, "rb") as f:
        while chunk := f.read(1 << 20):
            expected.update(chunk)
    reader = SlowReader()
    side = FTPFetch(reader, dialer(), SETTINGS)
    reader.side = side
    before = _rss()
    peak = before
    started = time.monotonic()
    reader.drain.start(SlowReader.TICK, now=False)

    def sample() -> None:
        nonlocal peak
        peak = max(peak, _rss())

    watch = task.LoopingCall(sample)
    watch.start(0.1)
    side.sendHead(request(b"GET", ftpServer, b"/pub/big.bin"))
    try:
        yield reader.done.addTimeout(120, reactor)
    finally:
        watch.stop()
    assert reader.outcome == ("end",), reader.outcome
    assert reader.size == size and reader.digest.hexdigest() == expected.hexdigest()
    assert reader.head.length == size
    # The reader was behind most of the time: the fetch was paused, and what arrived while
    # it was paused is at most what was already read (one socket read) beyond the mark.
    assert reader.pauses > 10
    assert reader.maxHeld < SlowReader.HIGH + 512 * 1024
    assert peak - before < 40 * 1024 * 1024, (before, peak)
    assert time.monotonic() - started < 90


# -- a real client on the same server ----------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_listingMatchesCurl(ftpServer):
    out, err, code = yield getProcessOutputAndValue(
        "/usr/bin/curl", ["-sS", "--max-time", "10", f"ftp://127.0.0.1:{ftpServer}/pub/"]
    )
    assert code == 0, err
    r = yield fetch(request(b"GET", ftpServer, b"/pub/"))
    assert bytes(r.body) == out
    file, err, code = yield getProcessOutputAndValue(
        "/usr/bin/curl", ["-sS", "--max-time", "10", f"ftp://127.0.0.1:{ftpServer}/pub/data.bin"]
    )
    assert code == 0 and file == bytes(range(256)) * 1000


def test_listingTextLineEnds():
    from gateway.ftp.replies import ListingText

    text = ListingText()
    out = text.feed(b"a\r\nb\r") + text.feed(b"\nc\r\n\r") + text.feed(b"") + text.flush()
    assert out == b"a\nb\nc\n\r"
    assert text.feed(b"x\ry\r\n") == b"x\ry\n"


def test_settingsFromConfig():
    from gateway.config import parseConfig

    proxy = parseConfig(
        "[proxy]\nftp_ports = 21 2121\nftp_data_ports = 30000-31000\nidle_timeout = 60\n"
    ).proxy
    assert FTPSettings.fromConfig(proxy) == FTPSettings(
        ports=((21, 21), (2121, 2121)), dataPorts=((30000, 31000),), timeout=60.0
    )
    defaults = parseConfig("").proxy
    assert defaults.ftp is True
    assert FTPSettings.fromConfig(defaults) == FTPSettings()


# -- FTP through a CONNECT tunnel (works without the ftp:// gateway) -------------------------


@pytest_twisted.inlineCallbacks
def test_curlProxytunnelThroughConnect(ftpServer, startProxy):
    """
    curl --proxytunnel: the control connection and each passive data connection are
    CONNECT tunnels, so connect_ports must hold the FTP port and the passive ports.
    """
    proxy = startProxy("[proxy]\ndeny_destinations = 169.254.0.0/16\nconnect_ports = 1024-65535\n")
    url = f"ftp://127.0.0.1:{ftpServer}/pub/hello.txt"
    out, err, code = yield getProcessOutputAndValue(
        "/usr/bin/curl", ["-sS", "--max-time", "10", "--proxytunnel", "-x", proxy.url, url]
    )
    assert code == 0, err
    assert out == b"hello, ftp\n"
    assert sum("CONNECT 127.0.0.1:" in line for line in proxy.accessLines()) == 2
    # With only 443 (the default), the control connection's CONNECT is refused.
    closed = startProxy("[proxy]\ndeny_destinations = 169.254.0.0/16\n")
    out, err, code = yield getProcessOutputAndValue(
        "/usr/bin/curl", ["-sS", "--max-time", "10", "--proxytunnel", "-x", closed.url, url]
    )
    assert code != 0 and b"403" in err
