"""
/healthz on the metrics listener (200 serving, 503 draining), proxygate_build_info, the
process_* metrics, and how the workers' scrape merges them (not added up).
"""

from __future__ import annotations

import signal
import time
import urllib.error
import urllib.request

from prometheus_client import generate_latest

import gateway
from gateway.metrics import Metrics
from gateway.workers import mergeExpositions
from tests.support import LOOPBACK_INI, waitFor
from tests.support.tunnel import echoHandler, openTunnel


def health(port: int) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_healthzWhileServingAndWhileDraining(startProxy, server) -> None:
    echo = server(echoHandler)
    p = startProxy()
    assert health(p.metricsPort) == (200, b"ok\n")
    tunnel, status, _, _ = openTunnel(p.port, f"127.0.0.1:{echo.port}")
    assert status == 200
    try:
        p.proc.send_signal(signal.SIGTERM)
        # The tunnel keeps the proxy draining (for its grace period): the probe says so.
        assert waitFor(lambda: health(p.metricsPort)[0] == 503, 5)
        assert health(p.metricsPort) == (503, b"draining\n")
        assert "proxygate draining" in p.log()
        tunnel.sendall(b"still")
        assert tunnel.recv(5) == b"still"
    finally:
        tunnel.close()
    assert p.proc.wait(timeout=20) == 0


def test_buildInfoAndProcessMetrics(startProxy) -> None:
    p = startProxy()
    text = p.metrics()
    assert f'proxygate_build_info{{version="{gateway.__version__}"}} 1.0' in text
    for name in (
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_start_time_seconds",
    ):
        assert p.metric(name) > 0, name
    assert 'proxygate_config_reloads_total{result="ok"} 0.0' in text


def test_workersScrapeKeepsProcessesApart(startProxy) -> None:
    p = startProxy(LOOPBACK_INI + "workers = 2\n")
    assert waitFor(lambda: "serving" in p.log(), 15)

    def merged():
        text = p.metrics()
        return 'process_resident_memory_bytes{worker="1"}' in text and text

    text = waitFor(merged, 10)
    assert text, p.metrics()
    assert p.metric("process_resident_memory_bytes", worker="0") > 10_000_000
    assert p.metric("process_resident_memory_bytes", worker="1") > 10_000_000
    assert p.metric("process_start_time_seconds", worker="1") > time.time() - 600
    assert text.count("proxygate_build_info{") == 1
    assert p.metric("proxygate_build_info", version=gateway.__version__) == 1
    assert health(p.metricsPort) == (200, b"ok\n")


def test_mergeRules() -> None:
    """Counters add up; build_info and reloads are the master's; process_* get a label."""
    master, worker = Metrics(), Metrics()
    master.configReloads.labels("ok").inc()
    worker.configReloads.labels("ok").inc()
    master.denied.labels("client").inc()
    worker.denied.labels("client").inc()
    texts = [generate_latest(m.registry).decode() for m in (master, worker)]

    class One:
        def __init__(self, families):
            self.families = families

        def collect(self):
            return iter(self.families)

    out = generate_latest(One(mergeExpositions(texts, ["0", "1"]))).decode()
    assert 'proxygate_denied_total{reason="client"} 2.0' in out
    assert 'proxygate_config_reloads_total{result="ok"} 1.0' in out
    assert out.count("proxygate_build_info{") == 1 and "proxygate_build_info{" in out
    assert 'process_open_fds{worker="0"}' in out and 'process_open_fds{worker="1"}' in out
