"""
SIGHUP reloads the whole configuration (gateway/reload.py), SIGHUP and SIGUSR1 reopen the
access log: in process (a service on a memory reactor, the reload called directly, the
signal handlers' rules) and end to end (twistd proxygate, with workers, and an embedded
.tac).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, capturedLogs, formatEvent

from gateway.accesslog import AccessRecord
from gateway.config import loadConfig
from gateway.reload import SignalHandlers, keepListeners
from gateway.service import GatewayService
from tests.support import LOOPBACK_INI, REPO, TWISTD, freePort, rawRequest, waitFor, waitForPort
from tests.support.tunnel import echoHandler, openTunnel

# -- in process ------------------------------------------------------------------------------


def service(tmp_path: Path, text: str, overrides=None) -> tuple[GatewayService, Path]:
    path = tmp_path / "p.ini"
    path.write_text(text)
    config = loadConfig(str(path), overrides=overrides)
    return GatewayService(config, MemoryReactorClock()), path


def reloadLogged(svc: GatewayService) -> tuple[bool, list[dict]]:
    with capturedLogs() as events:
        ok = svc.reload()
    return ok, [e for e in events if e.get("log_namespace", "").startswith("gateway.reload")]


def reloads(svc: GatewayService, result: str) -> float:
    return svc.metrics.registry.get_sample_value(
        "proxygate_config_reloads_total", {"result": result}
    )


def test_reloadAppliesEveryRuleToNewRequests(tmp_path) -> None:
    svc, path = service(
        tmp_path, "[proxy]\nallow_destinations = a.example\nconnect_ports = 443\nvia = one\n"
    )
    rt = svc.runtime
    before = rt.settings
    assert rt.destinations.checkName("a.example", 80).allowed
    path.write_text(
        "[proxy]\nallow_destinations = b.example\nconnect_ports = 8443\nvia = two\n"
        "max_connections = 7\nidle_timeout = 9\nconnect_timeout = 3\n"
        "[upstream]\nproxy = http://u:p@up.example:3128\n"
    )
    ok, events = reloadLogged(svc)
    assert ok
    assert rt.settings is not before and rt.config is svc.config
    assert not rt.destinations.checkName("a.example", 80).allowed
    assert rt.destinations.checkName("b.example", 80).allowed
    assert rt.dialer.policy is rt.destinations and rt.dialer.connectTimeout == 3
    assert rt.connectPorts == ((8443, 8443),)
    assert rt.viaRequest[b"HTTP/1.1"] == [(b"Via", b"1.1 two")]
    assert (rt.maxConnections, rt.idleTimeout) == (7, 9)
    assert rt.upstream.routeFor("x.example", 80).authorization.startswith(b"Basic ")
    assert reloads(svc, "ok") == 1 and reloads(svc, "error") == 0
    assert [e["log_level"] for e in events] == [LogLevel.info]
    assert str(path) in formatEvent(events[0])


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[proxy]\nconect_timeout = 3\n", "[proxy] conect_timeout"),
        ("[proxy]\nconnect_timeout = soon\n", "[proxy] connect_timeout"),
        ("[upstream]\nrules = .corp.example ftp://x\n", "[upstream] rules"),
        ("[auth]\nhtpasswd = missing.htpasswd\n", "[auth] htpasswd"),
        ("[log]\naccess_log = /nonexistent/folder/access.log\n", "[log] access_log"),
        ("[mitm]\nenabled = on\nca_cert = only-cert.pem\n", "[mitm]"),
    ],
)
def test_badFileKeepsTheRunningConfiguration(tmp_path, text: str, fragment: str) -> None:
    svc, path = service(tmp_path, "[proxy]\nallow_destinations = a.example\n")
    (tmp_path / "only-cert.pem").write_text("x")
    rt = svc.runtime
    before, config = rt.settings, svc.config
    path.write_text(text)
    ok, events = reloadLogged(svc)
    assert not ok
    assert rt.settings is before and svc.config is config
    assert rt.destinations.checkName("a.example", 80).allowed
    assert reloads(svc, "error") == 1 and reloads(svc, "ok") == 0
    (event,) = events  # one line
    line = formatEvent(event)
    assert event["log_level"] == LogLevel.error
    assert "\n" not in line and str(path) in line and fragment in line, line


def test_unreadableFileKeepsTheRunningConfiguration(tmp_path) -> None:
    svc, path = service(tmp_path, "[proxy]\nvia = kept\n")
    path.unlink()
    ok, events = reloadLogged(svc)
    assert not ok and svc.runtime.viaRequest[b"HTTP/1.1"] == [(b"Via", b"1.1 kept")]
    assert "cannot read" in formatEvent(events[0])


def test_listenerChangesNeedARestart(tmp_path) -> None:
    svc, path = service(tmp_path, "[proxy]\nlisten = tcp:0:interface=127.0.0.1\n")
    path.write_text(
        "[proxy]\nlisten = tcp:0:interface=127.0.0.2\nworkers = 2\nvia = new\n"
        "[metrics]\npath = /m\n"
    )
    ok, events = reloadLogged(svc)
    assert ok
    assert svc.config.proxy.listen == ("tcp:0:interface=127.0.0.1",)
    assert svc.config.proxy.workers == 1 and svc.config.metrics.path == "/metrics"
    assert svc.runtime.viaRequest[b"HTTP/1.1"] == [(b"Via", b"1.1 new")]  # the rest applies
    (warning,) = [e for e in events if e["log_level"] == LogLevel.warn]
    text = formatEvent(warning)
    assert "[proxy] listen, [proxy] workers, [metrics] path" in text and "restart" in text


def test_keepListenersIsPure() -> None:
    running = loadConfig(None)
    fresh = loadConfig(None, overrides={("metrics", "listen"): ""})
    kept, changed = keepListeners(fresh, running)
    assert changed == ["[metrics] listen"] and kept == running


def test_commandLineOverridesApplyAgain(tmp_path) -> None:
    svc, path = service(tmp_path, "[proxy]\nvia = file\n", {("proxy", "via"): "cli"})
    path.write_text("[proxy]\nvia = edited\nforwarded_for = on\n")
    assert svc.reload()
    assert svc.runtime.viaRequest[b"HTTP/1.1"] == [(b"Via", b"1.1 cli")]
    assert svc.runtime.forwardedFor


def test_anOpenProxyIsRefusedOnTheListenersStillRunning(tmp_path) -> None:
    """The file moved the listener to loopback (needs a restart) and opened the CIDRs."""
    svc, path = service(tmp_path, "[proxy]\nlisten = tcp:0\nallowed_client_cidrs = 10.0.0.0/8\n")
    path.write_text(
        "[proxy]\nlisten = tcp:0:interface=127.0.0.1\nallowed_client_cidrs = 0.0.0.0/0\n"
    )
    ok, events = reloadLogged(svc)
    assert not ok and "open proxy" in formatEvent(events[0])


def record(svc: GatewayService, url: str) -> None:
    svc.runtime.accessLog.record(
        AccessRecord(
            start=time.time(),
            elapsed=0.0,
            client="127.0.0.1",
            code=200,
            size=0,
            method="GET",
            url=url,
            user=None,
            action="TCP_MISS",
            hierarchy="HIER_NONE/-",
            contentType="-",
            mode="forward",
        )
    )
    svc.runtime.accessLogFile.flush()


def test_accessLogIsReopenedByName(tmp_path) -> None:
    log = tmp_path / "access.log"
    svc, _ = service(tmp_path, f"[log]\naccess_log = {log}\n")
    record(svc, "http://one/")
    log.rename(tmp_path / "access.log.1")
    record(svc, "http://two/")  # still the open (renamed) file, as logrotate expects
    svc.reopenLogs()
    record(svc, "http://three/")
    assert "http://one/" in (tmp_path / "access.log.1").read_text()
    assert "http://two/" in (tmp_path / "access.log.1").read_text()
    assert "http://three/" in log.read_text() and "http://two/" not in log.read_text()


def test_reloadMovesOrReformatsTheAccessLog(tmp_path) -> None:
    first, second = tmp_path / "a.log", tmp_path / "b.log"
    svc, path = service(tmp_path, f"[log]\naccess_log = {first}\n")
    opened = svc.runtime.accessLogFile
    path.write_text(f"[log]\naccess_log = {first}\nformat = json\n")
    assert svc.reload()
    assert svc.runtime.accessLogFile is opened  # the same file, reopened
    record(svc, "http://json/")
    assert '"url":"http://json/"' in first.read_text()
    path.write_text(f"[log]\naccess_log = {second}\n")
    assert svc.reload()
    assert opened.stream.closed
    record(svc, "http://second/")
    assert "http://second/" in second.read_text()
    path.write_text("[log]\naccess_log =\n")
    assert svc.reload()
    assert svc.runtime.accessLog is None and svc.runtime.accessLogFile is None


def test_interceptionTurnedOffLeavesDecryptedTunnelsTheirOrigins(tmp_path) -> None:
    svc, path = service(tmp_path, "[mitm]\nenabled = on\n")
    rt = svc.runtime
    interceptor = rt.interceptor
    assert interceptor.intercepts("example.com")
    routes = svc._metricsRoutes()
    assert routes[b"/ca.pem"](None)[0] == 200

    path.write_text("[mitm]\nenabled = on\npassthrough = .example.com\n")
    assert svc.reload()
    assert rt.interceptor is not interceptor
    assert rt.interceptor.ca is interceptor.ca  # the same CA files: nothing minted again
    assert not rt.interceptor.intercepts("example.com") and rt.interceptor.intercepts("x.org")

    path.write_text("[mitm]\nenabled = off\nverify_upstream = off\n")
    assert svc.reload()
    assert not rt.interceptor.intercepts("x.org")
    assert rt.interceptor.verify is False  # requests in decrypted tunnels: as configured now
    assert routes[b"/ca.pem"](None)[0] == 404


def test_htpasswdIsReadAgainAndABrokenOneRefused(tmp_path) -> None:
    users = tmp_path / "users"
    shutil.copy(REPO / "tests" / "data" / "htpasswd" / "formats.htpasswd", users)
    svc, path = service(tmp_path, f"[auth]\nhtpasswd = {users}\n")
    first = svc.runtime.authenticator
    path.write_text(f"[auth]\nhtpasswd = {users}\nrealm = other\n")
    assert svc.reload()
    assert svc.runtime.authenticator is not first
    assert b'realm="other"' in svc.runtime.authenticator.challenge()
    users.write_text("bob:plaintext\n")
    ok, events = reloadLogged(svc)
    assert not ok and b'realm="other"' in svc.runtime.authenticator.challenge()
    assert "[auth] htpasswd" in formatEvent(events[0])
    path.write_text("[auth]\nhtpasswd =\n")
    assert svc.reload() and svc.runtime.authenticator is None


class CallsFromThread:
    def __init__(self) -> None:
        self.calls: list = []

    def callFromThread(self, f, *args) -> None:
        self.calls.append(f)


@pytest.fixture
def savedSignals():
    saved = {s: signal.getsignal(s) for s in (signal.SIGHUP, signal.SIGUSR1)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def test_embeddedServiceTakesOnlySignalsThatWouldKill(savedSignals) -> None:
    """The host's own handlers stay; the default action (terminate) is replaced."""
    hosts: list[int] = []
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    signal.signal(signal.SIGUSR1, lambda signum, frame: hosts.append(signum))
    reactor = CallsFromThread()
    handlers = SignalHandlers(reactor, "hangup", "reopen")
    handlers.install(owned=False)
    os.kill(os.getpid(), signal.SIGHUP)
    os.kill(os.getpid(), signal.SIGUSR1)
    assert reactor.calls == ["hangup"] and hosts == [signal.SIGUSR1]
    handlers.uninstall()
    assert signal.getsignal(signal.SIGHUP) is signal.SIG_DFL


def test_ownedProcessTakesBothAndChains(savedSignals) -> None:
    """Under twistd: ours first, then what was there (twistd's SIGUSR1 log rotation)."""
    twistds: list[int] = []
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    previous = lambda signum, frame: twistds.append(signum)  # noqa: E731
    signal.signal(signal.SIGUSR1, previous)
    reactor = CallsFromThread()
    handlers = SignalHandlers(reactor, "hangup", "reopen")
    handlers.install(owned=True)
    os.kill(os.getpid(), signal.SIGHUP)
    os.kill(os.getpid(), signal.SIGUSR1)
    assert reactor.calls == ["hangup", "reopen"] and twistds == [signal.SIGUSR1]
    handlers.uninstall()
    assert signal.getsignal(signal.SIGUSR1) is previous
    assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN


# -- end to end --------------------------------------------------------------------------------


def edit(p, old: str, new: str) -> None:
    text = p.configPath.read_text()
    assert old in text
    p.configPath.write_text(text.replace(old, new))


def sighup(p, count: int = 1, result: str = "ok") -> None:
    os.kill(p.pid, signal.SIGHUP)
    assert waitFor(
        lambda: p.metric("proxygate_config_reloads_total", result=result) >= count, 10
    ), p.log()


def connect(port: int, target: str) -> bytes:
    return rawRequest(port, f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode(), 3)


def test_sighupChangesDestinationsWhileATunnelStaysOpen(startProxy, server, origin) -> None:
    echo = server(echoHandler)
    p = startProxy(LOOPBACK_INI + "allow_destinations = 127.0.0.1\n")
    tunnel, status, _, _ = openTunnel(p.port, f"127.0.0.1:{echo.port}")
    assert status == 200
    try:
        tunnel.sendall(b"before")
        assert tunnel.recv(6) == b"before"
        edit(p, "allow_destinations = 127.0.0.1", "allow_destinations = 127.0.0.2")
        sighup(p)
        # New requests see the new rule: CONNECT and plain HTTP alike.
        assert connect(p.port, f"127.0.0.1:{echo.port}").startswith(b"HTTP/1.1 403")
        get = f"GET {origin.url('/')} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        assert rawRequest(p.port, get.encode()).startswith(b"HTTP/1.1 403")
        # The tunnel opened before goes on.
        tunnel.sendall(b"after")
        assert tunnel.recv(5) == b"after"
    finally:
        tunnel.close()
    assert "configuration reloaded" in p.log()
    assert p.proc.poll() is None


def test_badReloadKeepsTheOldConfiguration(startProxy, origin) -> None:
    p = startProxy(LOOPBACK_INI + "via = first\n")
    edit(p, "via = first", "via = second\nconect_timeout = 5")
    sighup(p, result="error")
    lines = [line for line in p.log().splitlines() if "not reloaded" in line]
    assert len(lines) == 1, p.log()
    assert str(p.configPath) in lines[0] and "[proxy] conect_timeout" in lines[0]
    get = f"GET {origin.url('/')} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    assert b"Via: 1.1 first" in rawRequest(p.port, get)
    # Fixed, it applies.
    edit(p, "conect_timeout = 5", "connect_timeout = 5")
    sighup(p)
    assert b"Via: 1.1 second" in rawRequest(p.port, get)
    assert p.metric("proxygate_config_reloads_total", result="error") == 1


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGHUP], ids=["USR1", "HUP"])
def test_accessLogIsReopenedAfterARename(startProxy, tmp_path, origin, signum) -> None:
    log = tmp_path / "access.log"
    p = startProxy(LOOPBACK_INI + f"[log]\naccess_log = {log}\n")
    get = "GET {} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    assert rawRequest(p.port, get.format(origin.url("/one")).encode()).startswith(b"HTTP/1.1 200")
    log.rename(tmp_path / "access.log.1")  # what logrotate does, then it signals
    os.kill(p.pid, signum)
    assert waitFor(log.exists, 5)
    assert rawRequest(p.port, get.format(origin.url("/two")).encode()).startswith(b"HTTP/1.1 200")
    assert waitFor(lambda: "/two" in log.read_text(), 5)
    assert "/one" in (tmp_path / "access.log.1").read_text()
    assert "/one" not in log.read_text()
    assert p.proc.poll() is None


def test_everyWorkerReloads(startProxy, origin) -> None:
    p = startProxy(LOOPBACK_INI + "workers = 2\nvia = first\n")
    assert waitFor(lambda: "serving" in p.log(), 15)
    edit(p, "via = first", "via = second")
    sighup(p)
    assert waitFor(lambda: ",worker1] proxygate: configuration reloaded" in p.log(), 10), p.log()
    get = f"GET {origin.url('/')} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    answers = [rawRequest(p.port, get) for _ in range(30)]
    assert all(b"Via: 1.1 second" in a for a in answers)
    assert p.metric("proxygate_config_reloads_total", result="ok") == 1  # the master's count

    # A bad file: reported once (by the master), no worker told to reload it.
    edit(p, "via = second", "via = bad value")
    sighup(p, result="error")
    time.sleep(0.5)
    assert p.log().count("not reloaded") == 1


TAC = """
import os
from twisted.application import service
import gateway

application = service.Application("host")
proxy = gateway.makeService(os.environ["PROXYGATE_INI"])
proxy.setServiceParent(application)
"""


def test_embeddedTacSurvivesSighupAndReloads(tmp_path, origin) -> None:
    """An application that installed no SIGHUP handler: the service reloads, nobody dies."""
    port, metricsPort = freePort(), freePort()
    ini = tmp_path / "p.ini"
    ini.write_text(
        LOOPBACK_INI
        + f"listen = tcp:{port}:interface=127.0.0.1\nvia = first\n"
        + f"[metrics]\nlisten = tcp:{metricsPort}:interface=127.0.0.1\n"
    )
    tac = tmp_path / "app.tac"
    tac.write_text(TAC)
    log = open(tmp_path / "twistd.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [*TWISTD, "--pidfile=", "-ny", str(tac)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO), "PROXYGATE_INI": str(ini)},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        waitForPort("127.0.0.1", port, proc=proc)
        ini.write_text(ini.read_text().replace("via = first", "via = second"))
        proc.send_signal(signal.SIGHUP)
        get = f"GET {origin.url('/')} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
        assert waitFor(lambda: b"Via: 1.1 second" in rawRequest(port, get), 5)
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
        log.close()
    assert "configuration reloaded" in (tmp_path / "twistd.log").read_text()
