"""
The service: `twistd proxygate` start-up (and refusal of a bad configuration before anything
listens), `gateway.makeService` inside an existing Twisted application (the README's .tac),
and stopping (listeners closed, connections drained).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import time

import pytest
import pytest_twisted
from twisted.application.service import IService, MultiService
from twisted.internet import reactor, threads

import gateway
from gateway.config import ConfigError
from gateway.service import GatewayService
from tests.support import REPO, TWISTD, freePort, payloadChunks, payloadDigest, waitForListeners

TAC = REPO / "tests" / "data" / "embed.tac"


def env() -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    return {**clean, "PYTHONPATH": str(REPO)}


def proxyGet(proxyPort: int, url: str, timeout: float = 10) -> tuple[bytes, bytes]:
    """GET url through the proxy with curl: (head, body)."""
    out = subprocess.run(
        [
            "curl",
            "-sS",
            "-i",
            "--max-time",
            str(timeout),
            "-x",
            f"http://127.0.0.1:{proxyPort}",
            url,
        ],
        capture_output=True,
        timeout=timeout + 5,
        env=env(),
    )
    assert out.returncode == 0, out.stderr
    head, _, body = out.stdout.partition(b"\r\n\r\n")
    return head, body


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def keepAliveIdle(port: int, origin) -> socket.socket:
    """A client connection that had one exchange and now sits idle, kept alive."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % origin.url("/bytes/3").encode())
    data = b""
    while not data.endswith(b"\r\n\r\n" + b"".join(payloadChunks(3))):
        data += s.recv(4096)
    assert data.startswith(b"HTTP/1.1 200 ") and b"Connection: close" not in data
    return s


def iniText(port: int = 0, metricsPort: int = 0, extra: str = "") -> str:
    return (
        f"[proxy]\nlisten = tcp:{port}:interface=127.0.0.1\n"
        "deny_destinations = 169.254.0.0/16\nconnect_ports = 1-65535\n"
        f"{extra}\n[metrics]\nlisten = tcp:{metricsPort}:interface=127.0.0.1\n"
    )


# -- twistd proxygate refuses a bad configuration -------------------------------------------

BAD_CONFIGS = [
    pytest.param(
        "[proxy]\nlisten = tcp:{port}:interface=127.0.0.1\nconect_timeout = 5\n",
        ("[proxy]", "conect_timeout"),
        id="misspelt-key",
    ),
    pytest.param(
        "[proxy]\nlisten = tcp:{port}:interface=127.0.0.1\n[metrix]\nlisten =\n",
        ("metrix",),
        id="unknown-section",
    ),
    pytest.param(
        "[proxy]\nlisten = tcp:{port}:interface=127.0.0.1\nconnect_timeout = soon\n",
        ("[proxy]", "connect_timeout"),
        id="bad-value",
    ),
    pytest.param(
        "[proxy]\nlisten = tcp:{port}:interface=127.0.0.1\nforwarded_for = maybe\n",
        ("[proxy]", "forwarded_for"),
        id="bad-boolean",
    ),
    pytest.param(
        "[proxy]\nlisten = tcp:{port}:interface=127.0.0.1\n[log]\nformat = xml\n",
        ("[log]", "format"),
        id="bad-choice",
    ),
    pytest.param("listen = 1\n", (), id="key-outside-a-section"),
    pytest.param(None, ("cannot read",), id="missing-file"),
]


@pytest.mark.parametrize(("text", "fragments"), BAD_CONFIGS)
def test_badConfigurationFailsWithOneLineBeforeListening(tmp_path, text, fragments) -> None:
    port = freePort()  # named in the configuration: the test watches it never listens
    path = tmp_path / "bad.ini"
    if text is not None:
        path.write_text(text.format(port=port))
    proc = subprocess.Popen(
        [*TWISTD, "-n", "--pidfile=", "proxygate", "--config", str(path)],
        cwd=tmp_path,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    everListened = False
    deadline = time.monotonic() + 20
    while proc.poll() is None and time.monotonic() < deadline:
        everListened |= listening(port)
        time.sleep(0.05)
    if proc.poll() is None:
        proc.kill()
    output = proc.communicate(timeout=10)[0].decode()
    assert proc.returncode not in (0, None), output
    assert not everListened
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    line = lines[0]
    assert str(path) in line and "Traceback" not in line
    for fragment in fragments:
        assert fragment in line, line


def test_listenerInUseFailsWithOneLine(tmp_path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        path = tmp_path / "p.ini"
        path.write_text(iniText(port))
        out = subprocess.run(
            [*TWISTD, "-n", "--pidfile=", "proxygate", "--config", str(path)],
            cwd=tmp_path,
            env=env(),
            capture_output=True,
            timeout=30,
        )
    text = (out.stdout + out.stderr).decode()
    assert out.returncode != 0, text
    assert str(port) in text and "Traceback" not in text, text


# -- twistd proxygate: start, serve, stop ---------------------------------------------------


def test_sigtermStopsListeningAndExitsCleanly(startProxy, origin) -> None:
    p = startProxy()
    assert proxyGet(p.port, origin.url("/bytes/10"))[1] == b"".join(payloadChunks(10))
    idle = keepAliveIdle(p.port, origin)
    started = time.monotonic()
    assert p.stop() == 0
    assert time.monotonic() - started < 5
    assert idle.recv(1) == b""  # closed by the proxy
    idle.close()
    assert not listening(p.port) and not listening(p.metricsPort)


def test_stopDrainsAnExchangeInFlight(startProxy, origin) -> None:
    """SIGTERM mid-response: no new connections, the response still completes, then close."""
    p = startProxy()
    size = 30 * 1024 * 1024
    with socket.create_connection(("127.0.0.1", p.port), timeout=10) as s:
        s.sendall(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % origin.url(f"/bytes/{size}").encode())
        data = bytearray()
        while b"\r\n\r\n" not in data:
            data += s.recv(65536)
        p.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        while listening(p.port) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not listening(p.port)
        head, _, body = bytes(data).partition(b"\r\n\r\n")
        h = hashlib.sha256(body)
        total = len(body)
        while True:
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            h.update(chunk)
            total += len(chunk)
    assert b"Content-Length: %d" % size in head
    assert (total, h.hexdigest()) == (size, payloadDigest(size))
    assert p.proc.wait(timeout=15) == 0


# -- makeService inside an existing application ---------------------------------------------


def test_embedTacServesThroughTwistdNy(tmp_path, origin) -> None:
    """
    The README's .tac, verbatim: an Application that attaches makeService(path), started
    from another folder (its INI path is built from the .tac's own folder).
    """
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "proxygate.ini").write_text(iniText())
    tac = tmp_path / "app.tac"
    shutil.copy(TAC, tac)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    logPath = tmp_path / "twistd.log"
    log = open(logPath, "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [*TWISTD, "--pidfile=", "-ny", str(tac)],
        cwd=elsewhere,
        env=env(),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        [(_, port)], [metricsPort] = waitForListeners(logPath.read_text, proc)
        head, body = proxyGet(port, origin.url("/bytes/5000"))
        assert head.startswith(b"HTTP/1.1 200") and b"Via: 1.1 proxygate" in head
        assert hashlib.sha256(body).hexdigest() == payloadDigest(5000)
        assert listening(metricsPort)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=20)
        log.close()
    # The application owns its process's signals: twistd's own SIGTERM exit (re-raising the
    # signal it stopped on) is the tac's business; the stop itself must be clean.
    text = (tmp_path / "twistd.log").read_text()
    assert code in (0, -signal.SIGTERM), text
    assert "Server Shut Down" in text and "Traceback" not in text, text
    assert not listening(port)


def test_readmeShowsTheTac() -> None:
    readme = (REPO / "README.md").read_text()
    for line in TAC.read_text().splitlines():
        assert line in readme, line


def test_makeServiceAcceptsPathConfigOrNone(tmp_path) -> None:
    path = tmp_path / "p.ini"
    path.write_text(iniText(extra="via = embedded"))
    fromPath = gateway.makeService(str(path))
    config = gateway.loadConfig(str(path))
    fromConfig = gateway.makeService(config)
    defaults = gateway.makeService(None)
    for service in (fromPath, fromConfig, defaults):
        assert IService.providedBy(service)
        assert not service.running
        assert service.ports == []  # nothing listens before start
    assert fromPath.config.proxy.via == "embedded"
    assert fromConfig.config is config
    assert defaults.config.proxy.listen == ("tcp:3128:interface=127.0.0.1",)


def test_makeServiceRefusesABadFile(tmp_path) -> None:
    path = tmp_path / "p.ini"
    path.write_text("[proxy]\nlisen = tcp:1\n")
    with pytest.raises(ConfigError, match="lisen"):
        gateway.makeService(str(path))


@pytest_twisted.inlineCallbacks
def test_attachedServiceServesAndStops(tmp_path, origin):
    """In this process's reactor: attach to a parent, serve, stop; ports are released."""
    path = tmp_path / "p.ini"
    path.write_text(iniText(extra="[log]\naccess_log =\n"))
    parent = MultiService()
    service = gateway.makeService(str(path), reactor=reactor)
    assert isinstance(service, GatewayService)
    service.setServiceParent(parent)
    parent.startService()
    try:
        [proxyHost] = [p.getHost() for p in service.proxyPorts]
        [metricsHost] = [p.getHost() for p in service.metricsPorts]
        assert proxyHost.host == metricsHost.host == "127.0.0.1"
        port, metricsPort = proxyHost.port, metricsHost.port
        assert 0 not in (port, metricsPort)
        head, body = yield threads.deferToThread(proxyGet, port, origin.url("/bytes/300"))
        assert head.startswith(b"HTTP/1.1 200") and len(body) == 300

        idle = yield threads.deferToThread(keepAliveIdle, port, origin)
        assert service.runtime.connections
    finally:
        yield parent.stopService()
    try:
        assert not service.runtime.connections
        assert (yield threads.deferToThread(idle.recv, 1)) == b""
    finally:
        idle.close()
    assert not (yield threads.deferToThread(listening, port))
    assert not (yield threads.deferToThread(listening, metricsPort))


def test_twistdPluginIsDiscoverable(tmp_path) -> None:
    out = subprocess.run(
        [*TWISTD, "--help"], cwd=tmp_path, env=env(), capture_output=True, timeout=30
    )
    assert b"proxygate" in out.stdout


def test_twistdWithoutConfigUsesDefaults(tmp_path) -> None:
    """Without --config: the built-in defaults (here with overridden listeners)."""
    logPath = tmp_path / "twistd.log"
    log = open(logPath, "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            *TWISTD,
            "-n",
            "--pidfile=",
            "proxygate",
            "--listen",
            "tcp:0:interface=127.0.0.1",
            "--metrics-listen",
            "tcp:0:interface=127.0.0.1",
        ],
        cwd=tmp_path,
        env=env(),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        [(_, port)], [metricsPort] = waitForListeners(logPath.read_text, proc)
        # Defaults deny loopback destinations.
        out = subprocess.run(
            [
                "curl",
                "-sS",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "5",
                "-x",
                f"http://127.0.0.1:{port}",
                f"http://127.0.0.1:{metricsPort}/metrics",
            ],
            capture_output=True,
            timeout=10,
            env=env(),
        )
        assert out.stdout == b"403"
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=20)
        log.close()
    assert code == 0, logPath.read_text()
