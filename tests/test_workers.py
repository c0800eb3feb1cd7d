"""
``[proxy] workers = N``: N reactor processes on the same listening sockets (the twistd
master and N-1 ``python -m gateway.worker`` children), run as users run it
(``twistd -n proxygate``) on loopback.

What is checked: every process holds the listening socket and serves (the kernel spreads new
connections), one scrape of the master's /metrics shows the totals, MITM uses one CA in
every process, ssl: listeners work too, SIGTERM stops everything with status 0, a worker
that dies is restarted, workers leave when the master dies, and the configuration rules
(``auto``, bad values, listener kinds that cannot be shared).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from prometheus_client import generate_latest

from gateway.config import ConfigError, cpuCount, parseConfig
from gateway.metrics import Metrics
from gateway.workers import mergeExpositions
from tests.support import LOOPBACK_INI, REPO, TWISTD, ProxyProcess
from tests.support import waitFor as _waitFor
from tests.support.mitmorigin import HTTPSOrigin, OriginPKI

WORKERS_INI = LOOPBACK_INI.replace("[proxy]", "[proxy]\nworkers = 2", 1)


def waitFor(predicate, timeout: float = 15.0, interval: float = 0.05):
    """Workers start as processes: a longer default wait than tests.support's."""
    return _waitFor(predicate, timeout, interval)


def children(pid: int) -> set[int]:
    """PIDs whose parent is C{pid}."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                found.add(int(entry))
    return found


def alive(pid: int) -> bool:
    """Running (a zombie, or a PID gone, is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def startWorkers(startProxy, ini: str = WORKERS_INI, count: int = 2, **kwargs) -> ProxyProcess:
    """A proxy with workers, once every worker says it serves."""
    proxy = startProxy(ini, **kwargs)
    assert waitFor(lambda: proxy.log().count(") serving") >= count - 1), proxy.log()
    return proxy


def workerPids(proxy: ProxyProcess) -> set[int]:
    return {int(pid) for pid in re.findall(r"worker \d+ \(pid (\d+)\) serving", proxy.log())}


def listeningHolders(port: int, pids) -> set[int]:
    """Which of C{pids} hold a socket listening on 127.0.0.1:C{port} (/proc/net/tcp)."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == f"0100007F:{port:04X}" and fields[3] == "0A":
            inodes.add(f"socket:[{fields[9]}]")
    holders = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                if os.readlink(fd) in inodes:
                    holders.add(pid)
            except OSError:
                pass
    return holders


def getClose(proxy: ProxyProcess, url: str) -> bytes:
    """One GET on a new connection (Connection: close): the whole response."""
    with socket.create_connection((proxy.host, proxy.port), timeout=10) as s:
        s.sendall(f"GET {url} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


def accessByProcess(proxy: ProxyProcess) -> dict[str, int]:
    """Access lines per process: "master" or "workerN" (the log system's tag)."""
    counts: dict[str, int] = {}
    for line in proxy.accessLines():
        tag = re.search(r"\[proxygate\.access#\w+(?:,(worker\d+))?\]", line)
        key = tag.group(1) or "master"
        counts[key] = counts.get(key, 0) + 1
    return counts


# -- configuration --------------------------------------------------------------------------


def test_workersValues() -> None:
    assert parseConfig("").proxy.workers == 1
    assert parseConfig("[proxy]\nworkers = 3").proxy.workers == 3
    assert parseConfig("[proxy]\nworkers = auto").proxy.workers == cpuCount()
    assert parseConfig("[proxy]\nworkers = AUTO").proxy.workers == cpuCount()
    for bad in ("0", "-1", "x", "1.5", "1000"):
        with pytest.raises(ConfigError) as info:
            parseConfig(f"[proxy]\nworkers = {bad}", "p.ini")
        message = str(info.value)
        assert message.startswith("p.ini: [proxy] workers: ") and "\n" not in message, message
        assert repr(bad) in message


def test_unsharedListenerKindIsOneLineError(tmp_path: Path) -> None:
    config = tmp_path / "p.ini"
    config.write_text(
        f"[proxy]\nworkers = 2\nlisten = tcp:0:interface=127.0.0.1 "
        f"unix:{tmp_path}/p.sock\n[metrics]\nlisten =\n"
    )
    out = subprocess.run(
        [*TWISTD, "-n", "--pidfile=", "proxygate", "--config", str(config)],
        cwd=REPO,
        capture_output=True,
        timeout=30,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert out.returncode == 1
    lines = out.stderr.decode().strip().splitlines()
    assert lines == [
        f"proxygate: {config}: [proxy] workers: 2 worker processes need tcp:, tcp6: or ssl: "
        f"listeners (also under haproxy:), and listen 'unix:{tmp_path}/p.sock' is not one "
        "(use workers = 1 with it)"
    ]
    with pytest.raises(ConfigError, match=r"\[proxy\] workers: .*'unix:/x'"):
        parseConfig("[proxy]\nworkers = 2\nlisten = unix:/x")
    # workers = 1 takes any endpoint, as before
    assert parseConfig("[proxy]\nlisten = unix:/x").proxy.listen == ("unix:/x",)


def test_portInUseStopsStartup(tmp_path: Path) -> None:
    """Even when what holds the port also uses SO_REUSEPORT (another proxygate with workers)."""
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        config = tmp_path / "p.ini"
        config.write_text(
            f"[proxy]\nworkers = 2\nlisten = tcp:{port}:interface=127.0.0.1\n[metrics]\nlisten =\n"
        )
        out = subprocess.run(
            [*TWISTD, "-n", "--pidfile=", "proxygate", "--config", str(config)],
            cwd=REPO,
            capture_output=True,
            timeout=30,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
    text = (out.stdout + out.stderr).decode()
    assert out.returncode == 1, text
    assert f"proxygate: cannot listen on 'tcp:{port}:interface=127.0.0.1'" in text
    assert "address already in use" in text.lower() and "worker" not in text


def test_mergeAddsSamplesAndKeepsOneExpositionAsIs() -> None:
    a, b = Metrics(), Metrics()
    a.request("forward", b"GET", 200, 0.003)
    b.request("forward", b"GET", 200, 0.2)
    b.request("mitm", b"POST", 502, 0.01)
    a.live.clientConnections, b.live.clientConnections = 2, 3
    a.denied.labels("auth").inc()
    b.denied.labels("auth").inc(2)
    for m in (a, b):  # one gRPC call in each process
        m.api("o.test", "/pkg.S/M", b"POST", 200, 0.01, 5, b"14")
    textA, textB = generate_latest(a.registry).decode(), generate_latest(b.registry).decode()

    class One:
        def __init__(self, families):
            self.families = families

        def collect(self):
            return iter(self.families)

    assert generate_latest(One(mergeExpositions([textA]))).decode() == textA
    merged = generate_latest(One(mergeExpositions([textA, textB]))).decode()
    assert 'proxygate_requests_total{code="200",method="GET",mode="forward"} 2.0' in merged
    assert 'proxygate_requests_total{code="502",method="POST",mode="mitm"} 1.0' in merged
    assert "\nproxygate_client_connections 5.0\n" in merged
    assert 'proxygate_denied_total{reason="auth"} 3.0' in merged
    assert 'proxygate_request_duration_seconds_bucket{le="0.005",mode="forward"} 1.0' in merged
    assert 'proxygate_request_duration_seconds_bucket{le="0.25",mode="forward"} 2.0' in merged
    assert 'proxygate_request_duration_seconds_count{mode="forward"} 2.0' in merged
    assert 'proxygate_api_grpc_status_total{api="/pkg.S/M",host="o.test",status="14"} 2.0' in merged


# -- serving ----------------------------------------------------------------------------------


def test_bothProcessesServeAndOneScrapeShowsTotals(startProxy, origin) -> None:
    proxy = startWorkers(startProxy)
    (worker,) = workerPids(proxy)
    assert children(proxy.pid) == {worker}
    assert listeningHolders(proxy.port, [proxy.pid, worker]) == {proxy.pid, worker}

    requests = 200
    connections = proxy.metric("proxygate_client_connections_total")  # start()'s port probe
    with ThreadPoolExecutor(8) as pool:
        responses = list(
            pool.map(lambda _: getClose(proxy, origin.url("/bytes/10")), range(requests))
        )
    for response in responses:
        assert response.startswith(b"HTTP/1.1 200 ") and len(response.split(b"\r\n\r\n")[1]) == 10

    # Every access line reaches the master's log, tagged with the process that served it.
    assert waitFor(lambda: sum(accessByProcess(proxy).values()) >= requests), proxy.log()
    counts = accessByProcess(proxy)
    assert set(counts) == {"master", "worker1"} and sum(counts.values()) == requests, counts
    assert waitFor(
        lambda: (
            proxy.metric("proxygate_requests_total", mode="forward", method="GET", code=200)
            == requests
        )
    )
    assert proxy.metric("proxygate_client_connections_total") == connections + requests
    assert proxy.metric("proxygate_request_duration_seconds_count", mode="forward") == requests
    assert proxy.metric("proxygate_transferred_bytes_total", direction="from_upstream") > 0
    assert proxy.metric("proxygate_workers") == 2
    assert proxy.metric("proxygate_worker_restarts_total") == 0


def test_mitmUsesOneCA(startProxy, tmp_path, origin) -> None:
    pki = OriginPKI(tmp_path / "origin-pki")
    httpsOrigin = HTTPSOrigin(pki)
    try:
        ini = WORKERS_INI + f"\n[mitm]\nenabled = on\nupstream_ca_bundle = {pki.caCert}\n"
        proxy = startWorkers(startProxy, ini)
        assert sorted(p.name for p in tmp_path.glob("proxygate-ca.*")) == [
            "proxygate-ca.key",
            "proxygate-ca.pem",
        ]
        with urllib.request.urlopen(f"http://127.0.0.1:{proxy.metricsPort}/ca.pem", timeout=5) as r:
            caFile = tmp_path / "served-ca.pem"
            caFile.write_bytes(r.read())
        assert caFile.read_bytes() == (tmp_path / "proxygate-ca.pem").read_bytes()
        context = ssl.create_default_context(cafile=str(caFile))
        leafKeys = set()
        target = f"localhost:{httpsOrigin.port}"
        for _ in range(30):
            with socket.create_connection((proxy.host, proxy.port), timeout=10) as raw:
                raw.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
                head = b""
                while not head.endswith(b"\r\n\r\n"):
                    head += raw.recv(1)
                assert head.startswith(b"HTTP/1.1 200"), head
                # Verified against the one CA served at /ca.pem, whichever process minted it.
                with context.wrap_socket(raw, server_hostname="localhost") as tls:
                    leaf = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))
                    leafKeys.add(
                        leaf.public_key().public_bytes(
                            serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo,
                        )
                    )
                    tls.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                    response = b""
                    while chunk := tls.recv(65536):
                        response += chunk
                    assert response.startswith(b"HTTP/1.1 200 "), response[:200]
        # Each process mints on a leaf key of its own: two keys, two processes, one CA.
        assert len(leafKeys) == 2
        assert proxy.metric("proxygate_mitm_certificates_issued_total") == 2
        assert proxy.metric("proxygate_requests_total", mode="mitm", method="GET", code=200) == 30
    finally:
        httpsOrigin.close()


def test_accessLogFileGetsEveryProcessLines(startProxy, tmp_path, origin) -> None:
    """One file, whole lines: the workers' access lines are written by the master."""
    accessFile = tmp_path / "access.log"
    proxy = startWorkers(startProxy, WORKERS_INI + f"\n[log]\naccess_log = {accessFile}\n")
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: getClose(proxy, origin.url("/bytes/7")), range(60)))

    def lines() -> list[str]:
        return accessFile.read_text().splitlines() if accessFile.exists() else []

    assert waitFor(lambda: len(lines()) >= 60), lines()
    squid = re.compile(
        r"^\d+\.\d{3} +\d+ 127\.0\.0\.1 TCP_MISS/200 7 GET http://\S+ - HIER_DIRECT/"
    )
    assert len(lines()) == 60 and all(squid.match(line) for line in lines()), lines()
    assert not proxy.accessLines()
    assert proxy.stop() == 0


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed (apt: curl)")
def test_sslListenerWithWorkers(tmp_path, origin) -> None:
    from tests.support.tlsorigin import makeCA

    files = makeCA(tmp_path / "pki")
    proxy = ProxyProcess(tmp_path, WORKERS_INI, sslFiles=files).start()
    port = proxy.port
    try:
        assert waitFor(lambda: ") serving" in proxy.log()), proxy.log()
        for _ in range(20):
            out = subprocess.run(
                ["curl", "-q", "-sS", "--noproxy", "", "--max-time", "10", "--proxy",
                 f"https://127.0.0.1:{port}", "--proxy-cacert", str(files.caCert),
                 origin.url("/bytes/5")],
                capture_output=True,
                timeout=30,
                env={"PATH": "/usr/bin:/bin"},
            )  # fmt: skip
            assert out.returncode == 0 and len(out.stdout) == 5, out.stderr
        assert waitFor(lambda: sum(accessByProcess(proxy).values()) >= 20)
        assert set(accessByProcess(proxy)) == {"master", "worker1"}
    finally:
        assert proxy.stop() == 0


# -- life cycle -------------------------------------------------------------------------------


def test_sigtermStopsEveryProcessWithStatusZero(startProxy, origin) -> None:
    proxy = startWorkers(startProxy, WORKERS_INI.replace("workers = 2", "workers = 3"), count=3)
    workers = workerPids(proxy)
    assert len(workers) == 2 and children(proxy.pid) == workers
    assert getClose(proxy, origin.url("/bytes/3")).startswith(b"HTTP/1.1 200 ")
    started = time.monotonic()
    assert proxy.stop() == 0
    assert time.monotonic() - started < 10
    assert waitFor(lambda: not any(alive(pid) for pid in workers), timeout=5)


def test_deadWorkerIsRestarted(startProxy, origin) -> None:
    proxy = startWorkers(startProxy)
    (first,) = workerPids(proxy)
    os.kill(first, signal.SIGKILL)
    assert waitFor(lambda: len(workerPids(proxy)) == 2), proxy.log()
    assert f"proxygate worker 1 (pid {first}) ended" in proxy.log()
    (second,) = workerPids(proxy) - {first}
    assert children(proxy.pid) == {second}
    assert listeningHolders(proxy.port, [proxy.pid, second]) == {proxy.pid, second}
    for _ in range(20):
        assert getClose(proxy, origin.url("/bytes/3")).startswith(b"HTTP/1.1 200 ")
    assert proxy.metric("proxygate_worker_restarts_total") == 1
    assert proxy.metric("proxygate_workers") == 2
    assert proxy.stop() == 0


def test_restartsAreBounded() -> None:
    """Past MAX_RESTARTS a minute a worker stays down and its sockets are closed."""
    from twisted.internet.error import ProcessTerminated
    from twisted.internet.task import Clock
    from twisted.logger import Logger
    from twisted.python.failure import Failure

    from gateway import workers

    class Reactor(Clock):
        spawned = 0

        def spawnProcess(self, processProtocol, *args, **kwargs) -> None:
            self.spawned += 1

    class Listener:
        spares: list[list] = [[]]
        closed: list = []

        def close(self, index=None) -> None:
            self.closed.append(index)

    reactor = Reactor()
    pool = SimpleNamespace(
        reactor=reactor, listener=Listener(), stopping=False, restarts=0, log=Logger(),
        payload=lambda index, fds: b"",
    )  # fmt: skip
    slot = workers._Slot(pool, 1)
    slot.spawn()
    killed = Failure(ProcessTerminated(signal=9))
    for _ in range(workers.MAX_RESTARTS):
        slot.ended(slot.process, killed)
        reactor.advance(workers.RESTART_DELAY)
    assert reactor.spawned == 1 + workers.MAX_RESTARTS and pool.restarts == workers.MAX_RESTARTS
    assert pool.listener.closed == []
    slot.ended(slot.process, killed)
    reactor.advance(60)
    assert reactor.spawned == 1 + workers.MAX_RESTARTS and pool.listener.closed == [1]
    # A minute later the count starts again; and a stopping pool restarts nothing.
    slot.starts.clear()
    slot.spawn()
    pool.stopping = True
    slot.ended(slot.process, killed)
    reactor.advance(60)
    assert reactor.spawned == 2 + workers.MAX_RESTARTS


def test_workersLeaveWhenTheMasterDies(startProxy) -> None:
    proxy = startWorkers(startProxy)
    workers = workerPids(proxy)
    proxy.proc.send_signal(signal.SIGKILL)
    proxy.proc.wait(timeout=5)
    assert waitFor(lambda: not any(alive(pid) for pid in workers), timeout=10)
    with pytest.raises(OSError):
        socket.create_connection((proxy.host, proxy.port), timeout=1).close()
