"""
ftp:// through the HTTP proxy, end to end (issue 19, item 12): real clients that use an HTTP
proxy for ftp:// URLs (curl -x, Python's urllib with ftp_proxy) against proxygate under
twistd and a real FTP server in its own process (Twisted's, tests/support/ftpserver.py):

files, listings (the same text curl gets from the server directly), missing files, logins
from the URL (right and wrong), HEAD, methods other than GET and HEAD, the metrics
(mode="ftp") and the access log (no credentials), ftp = off, ftp_data_ports, a server that
names another host in its PASV reply, and a 30 MB file to a slow client with the proxy's
memory flat.



"""

from __future__ import annotations

import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.support import LOOPBACK_INI, rss, waitFor
from tests.support.ftpserver import PASSWORD, USER, FTPServerProcess, layout

HELLO = b"hello, ftp\n"
DATA = bytes(range(256)) * 1000
FTP_INI = LOOPBACK_INI  # loopback destinations allowed; ftp on, ftp_ports 21 1024-65535


def _tree(root: Path) -> Path:
    anonymous, homes = layout(root)
    (anonymous / "pub").mkdir(exist_ok=True)
    (anonymous / "pub" / "hello.txt").write_bytes(HELLO)
    (anonymous / "pub" / "data.bin").write_bytes(DATA)
    (anonymous / "pub" / "sub").mkdir(exist_ok=True)
    (homes / USER / "private.txt").write_bytes(b"for alice only\n")
    return root


@pytest.fixture(scope="module")
def ftpServer(tmp_path_factory):
    server = FTPServerProcess(_tree(tmp_path_factory.mktemp("ftp")))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def ftpProxy(tmp_path_factory):
    from tests.support import ProxyProcess

    p = ProxyProcess(tmp_path_factory.mktemp("ftpproxy"), FTP_INI).start()
    yield p
    p.stop()


def curl(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["curl", "-sS", "--max-time", "20", *args],
        capture_output=True,
        timeout=timeout,
        env={"PATH": "/usr/bin:/bin"},
    )


def viaProxy(proxy, url: str, *args: str) -> subprocess.CompletedProcess:
    return curl("-x", proxy.url, "-D", "/dev/stderr", *args, url)


def status(result: subprocess.CompletedProcess) -> int:
    head = result.stderr.split(b"\r\n", 1)[0]
    return int(head.split()[1]) if head.startswith(b"HTTP/") else 0


def test_curlFetchesAFile(ftpProxy, ftpServer):
    result = viaProxy(ftpProxy, ftpServer.url("/pub/hello.txt"))
    assert result.returncode == 0 and result.stdout == HELLO, result.stderr
    assert status(result) == 200
    assert b"Content-Length: 11" in result.stderr
    binary = viaProxy(ftpProxy, ftpServer.url("/pub/data.bin"))
    assert binary.stdout == DATA


def test_curlListingMatchesADirectFetch(ftpProxy, ftpServer):
    direct = curl(ftpServer.url("/pub/"))
    proxied = viaProxy(ftpProxy, ftpServer.url("/pub/"))
    assert direct.returncode == 0 and proxied.returncode == 0, proxied.stderr
    assert proxied.stdout == direct.stdout
    assert b"Content-Type: text/plain; charset=utf-8" in proxied.stderr
    assert b"hello.txt" in proxied.stdout and b"sub" in proxied.stdout


def test_missingFileIs404(ftpProxy, ftpServer):
    result = viaProxy(ftpProxy, ftpServer.url("/pub/nope.txt"))
    assert status(result) == 404
    assert b"550" in result.stdout


def test_loginFromTheURL(ftpProxy, ftpServer):
    good = viaProxy(ftpProxy, ftpServer.url("/private.txt", f"{USER}:{PASSWORD}@"))
    assert good.stdout == b"for alice only\n", good.stderr
    bad = viaProxy(ftpProxy, ftpServer.url("/private.txt", f"{USER}:wrong@"))
    assert status(bad) == 401
    assert b'WWW-Authenticate: Basic realm="FTP 127.0.0.1"' in bad.stderr
    assert b"wrong" not in bad.stdout + bad.stderr
    # curl -u sends the credentials in the URL or as Authorization: either way works.
    viaUser = viaProxy(ftpProxy, ftpServer.url("/private.txt"), "-u", f"{USER}:{PASSWORD}")
    assert viaUser.stdout == b"for alice only\n", viaUser.stderr


def test_head(ftpProxy, ftpServer):
    result = curl("-x", ftpProxy.url, "-I", ftpServer.url("/pub/data.bin"))
    assert result.returncode == 0
    assert result.stdout.startswith(b"HTTP/1.1 200")
    assert b"Content-Length: 256000" in result.stdout


def test_otherMethodsAre405(ftpProxy, ftpServer):
    result = viaProxy(ftpProxy, ftpServer.url("/pub/up.txt"), "-X", "PUT", "-d", "x")
    assert status(result) == 405 and b"Allow: GET, HEAD" in result.stderr


def test_urllibWithFtpProxy(ftpProxy, ftpServer):
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({"ftp": ftpProxy.url}))
    with opener.open(ftpServer.url("/pub/hello.txt"), timeout=10) as r:
        assert r.read() == HELLO
    with opener.open(ftpServer.url("/pub/"), timeout=10) as r:
        assert b"data.bin" in r.read()
    with pytest.raises(urllib.error.HTTPError) as e:
        opener.open(ftpServer.url("/pub/nope.txt"), timeout=10)
    assert e.value.code == 404


def test_metricsAndAccessLog(ftpProxy, ftpServer):
    line = f"ftp://127.0.0.1:{ftpServer.port}/private.txt - HIER_DIRECT/127.0.0.1"
    lines = ftpProxy.log().count(line)  # earlier tests fetched it too
    before = ftpProxy.metric("proxygate_requests_total", mode="ftp", method="GET", code="200")
    viaProxy(ftpProxy, ftpServer.url("/private.txt", f"{USER}:{PASSWORD}@"))
    # The client has every byte (Content-Length) before the FTP server's 226 ends the
    # exchange: its line and count follow a moment later (an earlier test's may too).
    # Waiting for the count too: the line seen may be the earlier test's, counted after
    # `before` was read.
    assert waitFor(lambda: ftpProxy.log().count(line) > lines)
    assert waitFor(
        lambda: (
            ftpProxy.metric("proxygate_requests_total", mode="ftp", method="GET", code="200")
            >= before + 1
        )
    )
    log = ftpProxy.log()
    assert PASSWORD not in log and f"{USER}:" not in log


def test_ftpOff(startProxy, ftpServer):
    proxy = startProxy(FTP_INI + "ftp = off\n")
    assert status(viaProxy(proxy, ftpServer.url("/pub/hello.txt"))) == 400


def test_dataPortOutsideFtpDataPorts(startProxy, ftpServer):
    proxy = startProxy(FTP_INI + "ftp_data_ports = 1-1000\n")
    result = viaProxy(proxy, ftpServer.url("/pub/hello.txt"))
    assert status(result) == 502 and b"ftp_data_ports" in result.stdout


def test_bounceAddressIsIgnored(ftpProxy, tmp_path):
    server = FTPServerProcess(_tree(tmp_path / "bounce"), "--bounce", "127.0.0.2")
    try:
        result = viaProxy(ftpProxy, server.url("/pub/hello.txt"))
        assert result.stdout == HELLO, result.stderr
    finally:
        server.stop()


@pytest.mark.slow
def test_slowClientKeepsTheProxyFlat(ftpProxy, ftpServer, tmp_path):
    size = 30 * 1024 * 1024
    big = Path(ftpServer.proc.args[2]) / "anonymous" / "pub" / "big.bin"
    with open(big, "wb") as f:
        f.truncate(size)
    before = peak = rss(ftpProxy.pid)
    started = time.monotonic()
    out = tmp_path / "big.bin"
    client = subprocess.Popen(
        ["curl", "-sS", "--max-time", "40", "-x", ftpProxy.url, "--limit-rate", "6M",
         "-o", str(out), ftpServer.url("/pub/big.bin")],
        env={"PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    try:
        while client.poll() is None and time.monotonic() - started < 45:
            peak = max(peak, rss(ftpProxy.pid))
            time.sleep(0.1)
    finally:
        if client.poll() is None:
            client.kill()
        client.wait(timeout=5)
    assert client.returncode == 0
    assert out.stat().st_size == size
    # Without backpressure the proxy would hold what the client has not read yet (most of
    # the 30 MB); with it, about a socket buffer.
    assert peak - before < 12 * 1024 * 1024, (before, peak)
