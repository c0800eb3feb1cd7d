"""
proxygate's HTTP/2 codec against nghttp2 on both legs: curl --http2 (libnghttp2) as the client
and nghttpd (nghttp2's server, Debian nghttp2-server) as the origin, through an intercepting
``twistd proxygate``. The other end-to-end h2 tests use python-hyper's h2 and grpcio as
origins; nghttpd is a third, independent implementation in C that ends the connection with
GOAWAY at any frame, header block or window overrun it should not accept, and it logs what
it received (``-v``), so the test can tell that the proxy's leg stayed clean.

Also headless Chromium (tests/support/browser.py) as the client: a page and its fetches over h2
through the proxy, as a browser behind a corporate MITM gateway loads them.

What is checked: 20 parallel downloads of different sizes (up to 3 MiB, past every window) on
one tunnel, byte for byte; a 6 MiB upload echoed back (``--echo-upload``: the proxy's flow
control on both legs at once); trailers from the origin reaching an h2 client; and nghttpd's
log with no error code sent or received.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support import ProxyProcess, payload
from tests.support.browser import CHROMIUM, Chromium
from tests.support.h2origin import h2fetch
from tests.support.mitmorigin import OriginPKI
from tests.support.net import freePort, waitForPort
from tests.test_h2_mitm import curl, h2Ini, startProxy

NGHTTPD = shutil.which("nghttpd") or (
    "/usr/sbin/nghttpd" if Path("/usr/sbin/nghttpd").exists() else None
)
pytestmark = pytest.mark.skipif(NGHTTPD is None, reason="no nghttpd (Debian nghttp2-server)")

SIZES = [1, 1000, 16383, 16384, 65535, 65536, 100_000, 262_144, 1 << 20, 3 << 20]


class Nghttpd:
    """nghttpd on a loopback port, serving C{htdocs} with the PKI's leaf for 'localhost'."""

    def __init__(self, folder: Path, pki: OriginPKI, *extra: str) -> None:
        self.htdocs = folder / "htdocs"
        self.htdocs.mkdir()
        self.log = folder / "nghttpd.log"
        self.port = freePort()
        self.process = subprocess.Popen(
            [NGHTTPD, "-v", "-a", "127.0.0.1", "-d", str(self.htdocs), *extra,
             str(self.port), str(pki.keyFile), str(pki.certFiles["localhost"])],
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        waitForPort("127.0.0.1", self.port, proc=self.process)

    def url(self, path: str) -> str:
        return f"https://localhost:{self.port}{path}"

    def errors(self) -> list[str]:
        """The frames nghttpd logged with an error code other than NO_ERROR."""
        text = self.log.read_text(errors="replace")
        return re.findall(r"error_code=(?!NO_ERROR)\w+.*", text)

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(10)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> OriginPKI:
    return OriginPKI(tmp_path_factory.mktemp("nghttpd-pki"))


@pytest.fixture(scope="module")
def proxy(tmp_path_factory, pki):
    # 'localhost' resolves to loopback, which LOOPBACK_INI lets the tests reach.
    p = startProxy(tmp_path_factory.mktemp("nghttpd-proxy"), h2Ini(pki))
    yield p
    p.stop()


@pytest.fixture
def nghttpd(tmp_path, pki):
    server = Nghttpd(tmp_path, pki, "--echo-upload", "--trailer", "x-origin-trailer: end")
    yield server
    server.close()


def test_parallelDownloadsFromNghttpd(proxy: ProxyProcess, nghttpd: Nghttpd, tmp_path):
    digests = {}
    for size in SIZES:
        body = payload(size)
        (nghttpd.htdocs / f"f{size}").write_bytes(body)
        digests[size] = hashlib.sha256(body).hexdigest()
    args = ["--http2", "-Z", "--parallel-max", "20"]
    for i in range(20):
        size = SIZES[i % len(SIZES)]
        args += ["-o", str(tmp_path / f"out{i}"), nghttpd.url(f"/f{size}")]
    done = curl(proxy, *args, "-w", "%{http_version} %{response_code}\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().split("\n")[:-1] == ["2 200"] * 20
    for i in range(20):
        got = (tmp_path / f"out{i}").read_bytes()
        assert hashlib.sha256(got).hexdigest() == digests[SIZES[i % len(SIZES)]], i
    assert nghttpd.errors() == []
    assert "recv HEADERS" in nghttpd.log.read_text(), "the origin leg was HTTP/2"


def test_uploadEchoedBackAndTrailers(proxy: ProxyProcess, nghttpd: Nghttpd, tmp_path):
    """6 MiB up and the same 6 MiB down at once: both legs' windows, both directions."""
    body = payload(6 << 20)
    (tmp_path / "up").write_bytes(body)
    done = curl(proxy, "--http2", "--data-binary", f"@{tmp_path / 'up'}",
                "-H", "content-type: application/octet-stream",
                "-o", str(tmp_path / "down"), "-D", str(tmp_path / "head"),
                "-w", "%{http_version} %{response_code}", nghttpd.url("/echo"))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"2 200"
    assert (
        hashlib.sha256((tmp_path / "down").read_bytes()).digest() == hashlib.sha256(body).digest()
    )
    # curl does not show an h2 answer's trailers: the h2 library's client does
    (nghttpd.htdocs / "small").write_bytes(b"small")
    status, _, got, trailers = h2fetch(nghttpd.port, "/small", proxy.ca, proxyPort=proxy.port)
    assert (status, got, trailers) == (200, b"small", [(b"x-origin-trailer", b"end")])
    assert nghttpd.errors() == []


PAGE = """<!doctype html><title>loading</title><script>
const sizes = [1000, 65536, 100000, 262144, 1048576];
Promise.all(sizes.map(async (n) => {
  const body = new Uint8Array(await (await fetch("/f" + n, {cache: "no-store"})).arrayBuffer());
  let sum = 0; for (const b of body) sum = (sum + b) % 65521;
  return n + ":" + body.length + ":" + sum;
})).then((parts) => {
  const hops = performance.getEntriesByType("resource").map((e) => e.nextHopProtocol);
  document.title = "done " + parts.join(" ") + " " + [...new Set(hops)].join(",");
}, (e) => { document.title = "failed " + e; });
</script>"""


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_chromiumLoadsAPageOverH2ThroughInterception(
    proxy: ProxyProcess, nghttpd: Nghttpd, tmp_path
):
    (nghttpd.htdocs / "index.html").write_text(PAGE)
    expected = []
    for size in (1000, 65536, 100000, 262144, 1048576):
        body = payload(size)
        (nghttpd.htdocs / f"f{size}").write_bytes(body)
        expected.append(f"{size}:{size}:{sum(body) % 65521}")
    seen = len(proxy.accessLines())
    with Chromium(tmp_path, proxy=f"127.0.0.1:{proxy.port}", trust=proxy.ca.read_bytes()) as b:
        page = b.page()
        page.navigate(nghttpd.url("/index.html"))
        page.waitFor("document.title.startsWith('done') || document.title.startsWith('failed')")
        title = page.evaluate("document.title")
    assert title == "done " + " ".join(expected) + " h2", title
    lines = proxy.accessLines()[seen:]
    assert sum("/f1048576" in line and "HTTP/2" in line for line in lines) == 1, lines
    assert nghttpd.errors() == []
