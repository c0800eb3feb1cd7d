"""
[upstream] rules: PATTERN TARGET lines, first match wins, before no_proxy and proxy. The
pure part (gateway/upstream.py), the routing (gateway/proxy/chain.py Upstream/Route), and
end to end with two recording upstream proxies: one domain to the first, another to the
second with other credentials, an address direct; plain HTTP, CONNECT and intercepted
traffic alike.
"""

from __future__ import annotations

import base64
import json
import socket
import socketserver
import subprocess
import threading

import pytest

from gateway.config import ConfigError, parseConfig
from gateway.proxy.chain import Upstream
from gateway.upstream import UpstreamRules, parseUpstreamRules
from tests.support import LOOPBACK_INI, rawRequest, waitFor
from tests.support.tlsorigin import HTTPSOrigin, makeCA
from tests.support.tunnel import readHead

# -- the pure part -----------------------------------------------------------------------------


def rules(*lines: str) -> UpstreamRules:
    return parseUpstreamRules(lines)


def test_firstMatchWins() -> None:
    r = rules(
        ".corp.example http://a:1@up1.example:3128",
        "10.0.0.0/8 direct",
        "registry.local:5000 https://up2.example",
        "* http://up3.example:8080",
    )
    assert r.find("api.corp.example", 443) == 0
    assert r.find("corp.example", 80) == 0
    assert r.find("badcorp.example", 80) == 3
    assert r.find("10.1.2.3", 80) == 1
    assert r.find("[::ffff:10.1.2.3]", 80) == 1  # IPv4-mapped: the IPv4 address inside
    assert r.find("[2001:db8::1]", 80) == 3
    assert r.find("registry.local", 5000) == 2
    assert r.find("REGISTRY.LOCAL.", 5000) == 2
    assert r.find("registry.local", 443) == 3
    assert rules(".x.example direct").find("y.example", 80) is None
    assert rules().find("anything", 80) is None


def test_targetsAreUpstreamURLsOrDirect() -> None:
    r = rules(".a.example http://u:p%40ss@up.example", ".b.example DIRECT", "")
    assert len(r.rules) == 2
    assert r.rules[0].target.password == "p@ss" and r.rules[0].target.port == 80
    assert r.rules[1].target is None


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        (".a.example", "rule 1: expected 'PATTERN TARGET'"),
        (".a.example http://up.example extra", "found 3 fields"),
        ("http://u:secret@up.example .a.example", "the pattern is a URL"),
        (".a.example ftp://up.example", "unsupported upstream proxy scheme"),
        (".a.example http://u:secret@", "missing host"),
        ("a..b direct", "invalid pattern"),
        ("10.0.0.0/33 direct", "invalid pattern"),
    ],
)
def test_badRulesAreNamedWithoutTheirSecrets(line: str, fragment: str) -> None:
    with pytest.raises(ValueError) as e:
        rules(line)
    assert fragment in str(e.value) and "secret" not in str(e.value)


def test_rulesInTheConfiguration() -> None:
    c = parseConfig("[upstream]\nrules = .a.example direct\n    * http://up.example:3128\n")
    assert len(c.upstream.rules.rules) == 2
    with pytest.raises(ConfigError, match=r"\[upstream\] rules: rule 2:"):
        parseConfig("[upstream]\nrules = .a.example direct\n  .b.example\n")


def test_rulesComeBeforeNoProxyAndProxy() -> None:
    c = parseConfig(
        "[upstream]\nproxy = http://default:d@up0.example:3128\nno_proxy = .corp.example\n"
        "rules = .corp.example http://bob:two@up2.example:3128\n"
        "    .lan direct\n"
        "    .other.example http://bob:two@up2.example:3128\n"
        "    .secure.example https://up3.example\n"
    )
    upstream = Upstream(c.upstream)
    corp = upstream.routeFor("api.corp.example", 443)
    assert corp.host == "up2.example" and corp.authorization == b"Basic " + base64.b64encode(
        b"bob:two"
    )
    assert corp.label == "up2.example" and corp.tls is None
    assert upstream.routeFor("x.other.example", 80) is corp  # one route per upstream URL
    assert upstream.routeFor("printer.lan", 80) is None
    default = upstream.routeFor("www.example.org", 80)
    assert default is upstream.default and default.host == "up0.example"
    secure = upstream.routeFor("a.secure.example", 443)
    assert secure.tls is not None and secure.port == 443  # its own TLS, for its own name
    assert len(upstream.routes) == 3
    # Without rules, no_proxy and proxy as before.
    plain = Upstream(parseConfig("[upstream]\nproxy = http://up.example\nno_proxy = .x").upstream)
    assert plain.routeFor("a.x", 80) is None and plain.routeFor("b.y", 80) is plain.default


# -- end to end -------------------------------------------------------------------------------


class RecordingUpstream(socketserver.ThreadingTCPServer):
    """
    An upstream proxy that records each request line and its Proxy-Authorization, answers
    absolute-form requests itself ("via NAME"), and for CONNECT answers 200 and relays to
    C{relays[authority]} (host, port) when there is one, else echoes.
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, name: str, relays=None) -> None:
        self.name = name
        self.relays = relays or {}
        self.seen: list[tuple[str, str | None]] = []
        super().__init__(("127.0.0.1", 0), _UpstreamHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def port(self) -> int:
        return self.server_address[1]

    def users(self) -> set[str]:
        return {
            base64.b64decode(auth.split()[1]).decode().split(":")[0]
            for _, auth in self.seen
            if auth
        }


class _UpstreamHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock = self.request
        sock.settimeout(10)
        server: RecordingUpstream = self.server
        try:
            while True:
                status, headers, rest = _readRequest(sock)
                if status is None:
                    return
                auth = dict((k.lower(), v) for k, v in headers).get("proxy-authorization")
                server.seen.append((status, auth))
                if status.startswith("CONNECT "):
                    sock.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    _relay(sock, rest, server.relays.get(status.split()[1]))
                    return
                body = f"via {server.name}".encode()
                sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        except OSError:
            pass


def _readRequest(sock: socket.socket):
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return None, [], b""
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = [tuple(part.strip() for part in line.split(":", 1)) for line in lines[1:]]
    return lines[0], headers, rest


def _relay(client: socket.socket, early: bytes, target) -> None:
    if target is None:  # echo
        if early:
            client.sendall(early)
        while data := client.recv(65536):
            client.sendall(data)
        return
    with socket.create_connection(target, timeout=10) as peer:
        if early:
            peer.sendall(early)

        def pump(src, dst):
            try:
                while data := src.recv(65536):
                    dst.sendall(data)
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass

        back = threading.Thread(target=pump, args=(peer, client), daemon=True)
        back.start()
        pump(client, peer)
        back.join(10)


@pytest.fixture
def upstreams(tmp_path):
    pki = makeCA(tmp_path / "pki")
    origin = HTTPSOrigin(pki)
    corp = RecordingUpstream("corp", {f"localhost:{origin.port}": ("127.0.0.1", origin.port)})
    internet = RecordingUpstream("internet")
    yield corp, internet, origin, pki
    for server in (corp, internet, origin):
        server.shutdown()
        server.server_close()


def get(port: int, url: str) -> bytes:
    return rawRequest(
        port, f"GET {url} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode(), 10
    )


def test_rulesRouteEveryKindOfTraffic(startProxy, upstreams, origin, tmp_path) -> None:
    corp, internet, httpsOrigin, pki = upstreams
    ini = LOOPBACK_INI + (
        "[upstream]\n"
        f"proxy = http://alice:one@127.0.0.1:{internet.port}\n"
        "no_proxy = .corp.example\n"  # a rule for it comes first
        f"rules = .corp.example http://bob:two@127.0.0.1:{corp.port}\n"
        f"    localhost:{httpsOrigin.port} http://bob:two@127.0.0.1:{corp.port}\n"
        "    127.0.0.1 direct\n"
        "[mitm]\nenabled = on\nintercept = localhost\n"
        f"ca_cert = {tmp_path / 'ca.pem'}\nca_key = {tmp_path / 'ca.key'}\n"
        f"upstream_ca_bundle = {pki.caCert}\n"
    )
    p = startProxy(ini)

    # Plain HTTP: a corp domain to the corp upstream (with bob), anything else to the
    # default upstream (with alice), 127.0.0.1 direct to the origin.
    assert get(p.port, "http://api.corp.example/x").endswith(b"via corp")
    assert get(p.port, "http://www.public.example/").endswith(b"via internet")
    direct = get(p.port, origin.url("/echo"))
    assert direct.startswith(b"HTTP/1.1 200") and b'"path": "/echo"' in direct
    assert ("GET http://api.corp.example/x HTTP/1.1") in [s for s, _ in corp.seen]
    assert ("GET http://www.public.example/ HTTP/1.1") in [s for s, _ in internet.seen]
    assert corp.users() == {"bob"} and internet.users() == {"alice"}

    # CONNECT: the corp upstream gets the CONNECT (and echoes here).
    with socket.create_connection(("127.0.0.1", p.port), timeout=10) as s:
        s.sendall(b"CONNECT git.corp.example:443 HTTP/1.1\r\nHost: git.corp.example:443\r\n\r\n")
        status, _, _ = readHead(s)
        assert status == 200
        s.sendall(b"ping")
        assert s.recv(4) == b"ping"
    assert ("CONNECT git.corp.example:443 HTTP/1.1", corp.seen[-1][1]) == corp.seen[-1]

    # Intercepted: decrypted here, the origin leg goes through the corp upstream.
    out = subprocess.run(
        [
            "curl", "-sS", "--max-time", "15", "--cacert", str(tmp_path / "ca.pem"),
            "-x", p.url, f"https://localhost:{httpsOrigin.port}/hello",
        ],
        capture_output=True,
        timeout=30,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert f"CONNECT localhost:{httpsOrigin.port} HTTP/1.1" in [s for s, _ in corp.seen]
    assert corp.users() == {"bob"}
    assert not any("127.0.0.1" in s or "localhost" in s for s, _ in internet.seen)

    lines = waitFor(lambda: len(p.accessLines()) >= 6 and p.accessLines(), 5)
    parents = [line for line in lines if "FIRSTUP_PARENT/" in line]
    assert any("http://api.corp.example/x" in line for line in parents)
    assert any(origin.url("/echo") in line and "HIER_DIRECT/" in line for line in lines)


def test_reloadChangesTheRules(startProxy, upstreams) -> None:
    import os
    import signal

    corp, internet, _, _ = upstreams
    p = startProxy(
        LOOPBACK_INI
        + f"[upstream]\nrules = .corp.example http://bob:two@127.0.0.1:{corp.port}\n"
        + f"    * http://alice:one@127.0.0.1:{internet.port}\n"
    )
    assert get(p.port, "http://a.corp.example/").endswith(b"via corp")
    text = p.configPath.read_text()
    p.configPath.write_text(text.replace(".corp.example http", ".other.example http"))
    os.kill(p.pid, signal.SIGHUP)
    assert waitFor(lambda: p.metric("proxygate_config_reloads_total", result="ok") == 1, 10)
    assert get(p.port, "http://a.corp.example/").endswith(b"via internet")
    assert json.dumps(sorted(internet.users())) == '["alice"]'
