"""
The scale-out recipe, run as shipped: Debian's HAProxy with etc/haproxy/haproxy.cfg in
front of two proxygate boxes running etc/haproxy/proxygate.ini (one with send-proxy, the
other with send-proxy-v2), each with workers, sharing one interception CA. Only addresses,
ports and file locations are changed for loopback.

The client connects from 127.0.0.5 (curl --interface): HAProxy reaches the boxes from
127.0.0.1, which they do not allow, so a 200 proves the PROXY header's address was used.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from gateway.tls.ca import loadOrCreateCA
from tests.support import REPO, freePort, waitFor, waitForPort
from tests.support.tlsorigin import HTTPSOrigin, makeCA

RECIPE = REPO / "etc" / "haproxy"
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
CLIENT, STRANGER = "127.0.0.5", "127.0.0.6"


def curl(*args: str, source: str = CLIENT) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["curl", "-sS", "--max-time", "15", "--interface", source, *args],
        capture_output=True,
        timeout=30,
    )


def boxINI(tmp_path, name: str, ca, bundle) -> str:
    """etc/haproxy/proxygate.ini for loopback: listeners come from ProxyProcess."""
    text = (RECIPE / "proxygate.ini").read_text()
    text = re.sub(r"(?m)^listen = .*\n", "", text)
    text = text.replace("allowed_client_cidrs = 10.0.0.0/8", f"allowed_client_cidrs = {CLIENT}/32")
    text = text.replace("/etc/proxygate/ca/proxygate-ca.pem", str(ca[0]))
    text = text.replace("/etc/proxygate/ca/proxygate-ca.key", str(ca[1]))
    text = text.replace("/var/log/proxygate/access.log", str(tmp_path / f"{name}-access.log"))
    # The test origins are on loopback, on any port.
    text = text.replace(
        "[proxy]\n", "[proxy]\ndeny_destinations = 169.254.0.0/16\nconnect_ports = 1-65535\n", 1
    )
    return text.replace("[mitm]\n", f"[mitm]\nupstream_ca_bundle = {bundle}\n", 1)


def haproxyConfig(front: int, boxes) -> str:
    text = (RECIPE / "haproxy.cfg").read_text()
    assert "bind :3128" in text
    text = text.replace("bind :3128", f"bind 127.0.0.1:{front}")
    text = text.replace("maxconn 20000", "maxconn 1000")  # within this machine's fd limit
    (one, two) = boxes
    servers = (
        f"    server box1 127.0.0.1:{one.port} port {one.metricsPort} "
        "no-send-proxy-v2 send-proxy\n"
        f"    server box2 127.0.0.1:{two.port} port {two.metricsPort}\n"
    )
    text, count = re.subn(r"(?m)^    server box1 .*\n    server box2 .*\n", servers, text)
    assert count == 1
    return text


def test_shippedConfigurationIsValid() -> None:
    out = subprocess.run([HAPROXY, "-c", "-f", str(RECIPE / "haproxy.cfg")], capture_output=True)
    assert out.returncode == 0, out.stdout + out.stderr
    from gateway.config import loadConfig

    # The box configuration reads (its files need not exist for that).
    text = (RECIPE / "proxygate.ini").read_text()
    assert "haproxy:tcp:3128" in text and "send-proxy-v2" in (RECIPE / "haproxy.cfg").read_text()
    assert loadConfig(str(RECIPE / "proxygate.ini")).mitm.enabled


@pytest.fixture
def haproxy(tmp_path):
    started = []

    def start(config: str, port: int):
        path = tmp_path / "haproxy.cfg"
        path.write_text(config)
        log = open(tmp_path / "haproxy.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen([HAPROXY, "-db", "-f", str(path)], stdout=log, stderr=log)
        started.append((proc, log))
        waitForPort("127.0.0.1", port, proc=proc)
        return proc

    yield start
    for proc, log in started:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        log.close()


def test_recipeBehindHAProxy(startProxy, haproxy, tmp_path, origin) -> None:
    ca = (tmp_path / "secret" / "proxygate-ca.pem", tmp_path / "secret" / "proxygate-ca.key")
    ca[0].parent.mkdir()
    loadOrCreateCA(str(ca[0]), str(ca[1]))  # made once, as the secret every box mounts
    pki = makeCA(tmp_path / "origin-pki")
    httpsOrigin = HTTPSOrigin(pki)
    try:
        boxes = [
            startProxy(
                boxINI(tmp_path, name, ca, pki.caCert),
                listen="haproxy:tcp:0:interface=127.0.0.1",
            )
            for name in ("box1", "box2")
        ]
        front = freePort()
        haproxy(haproxyConfig(front, boxes), front)
        proxy = f"http://127.0.0.1:{front}"

        # Plain HTTP: served for the allowed client, X-Forwarded-For names it at the origin.
        for _ in range(4):
            out = curl("-x", proxy, origin.url("/echo"))
            assert out.returncode == 0, out.stderr
            doc = json.loads(out.stdout)
            assert ("X-Forwarded-For", CLIENT) in [tuple(h) for h in doc["headers"]]

        # Another address behind the same balancer: refused.
        out = curl(
            "-x", proxy, "-o", "/dev/null", "-w", "%{http_code}", origin.url("/"), source=STRANGER
        )
        assert out.stdout == b"403", out

        # Decrypted HTTPS through both boxes, with one CA the client trusts.
        for _ in range(4):
            out = curl(
                "-x", proxy, "--cacert", str(ca[0]), f"https://localhost:{httpsOrigin.port}/"
            )
            assert out.returncode == 0, out.stderr

        # Both boxes served (leastconn takes turns among idle boxes), and logged the
        # client, never the balancer.
        def logged():
            lines = {}
            for name in ("box1", "box2"):
                path = tmp_path / f"{name}-access.log"
                lines[name] = path.read_text().splitlines() if path.exists() else []
            ours = [line for v in lines.values() for line in v if line.split()[2] != "127.0.0.1"]
            # 4 plain requests, the stranger's, and a tunnel and a request per HTTPS fetch.
            return len(ours) >= 4 + 1 + 2 * 4 and lines

        lines = waitFor(logged, 10)
        assert lines, logged()
        for name, boxLines in lines.items():
            # (Our own port probe came through HAProxy from 127.0.0.1 too, and got a 403.)
            served = {line.split()[2] for line in boxLines if "/200 " in line}
            assert served == {CLIENT}, (name, boxLines)
        everything = "\n".join(lines["box1"] + lines["box2"])
        assert f"{STRANGER} TCP_DENIED/403" in everything
        assert everything.count("https://localhost") >= 4
    finally:
        httpsOrigin.shutdown()
        httpsOrigin.server_close()
