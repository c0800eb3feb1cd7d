"""
The dashboard and the alert rules against the real thing: a proxygate started as users
start it (twistd) with its features on (TLS interception with a CA it creates, auth,
workers = 2), and a real Prometheus (Debian's) scraping it.

- Every metric name in every dashboard query (and its instance variable) is a name the live
  scrape has, from the # TYPE lines; the alert rules' names too, except Prometheus' own
  `up` and the pending metrics that etc/grafana/build_dashboard.py's LANDED lists as not
  yet exported (once switched on there, they must be in the scrape as well).
- Prometheus, started on loopback with its own data folder and a bounded lifetime, scrapes
  proxygate while traffic goes through it; then every dashboard query (pending ones too)
  and every alert expression is evaluated through /api/v1/query without error, the key
  panels return data, and Prometheus' own rule evaluation reports every rule healthy.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import urllib.parse
import urllib.request

import bcrypt
import pytest
import requests
import yaml

from tests.support import LOOPBACK_INI, REPO, ProxyProcess, freePort, waitFor
from tests.support.mitmorigin import HTTPSOrigin, OriginPKI
from tests.support.promql import exportedNames, grafanaVariableMetric, metricNames, substitute
from tests.test_dashboard import gen

RULES = REPO / "etc" / "prometheus" / "proxygate-alerts.yml"
PROMETHEUS = shutil.which("prometheus")
PASSWORD = "obs-secret"

#: Series Prometheus makes itself for every target.
PROMETHEUS_SERIES = {"up"}


def pendingNames() -> set[str]:
    """Metric names LANDED says are not exported yet (with a histogram's series names)."""
    names = set()
    for key, landed in gen.LANDED.items():
        if landed or "{" in key:  # a pending label is not a name
            continue
        names |= {key, f"{key}_bucket", f"{key}_sum", f"{key}_count"}
    return names


def alertExpressions() -> dict[str, str]:
    rules = yaml.safe_load(RULES.read_text())
    return {r["alert"]: r["expr"] for g in rules["groups"] for r in g["rules"] if "alert" in r}


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> OriginPKI:
    return OriginPKI(tmp_path_factory.mktemp("obs-pki"))


@pytest.fixture(scope="module")
def httpsOrigin(pki):
    o = HTTPSOrigin(pki)
    yield o
    o.close()


@pytest.fixture(scope="module")
def fullProxy(tmp_path_factory, pki):
    """proxygate with interception (its CA created on start), auth and two workers."""
    folder = tmp_path_factory.mktemp("obs-proxy")
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
    (folder / "users").write_text(f"alice:{hashed}\n")
    ini = LOOPBACK_INI.replace("[proxy]", "[proxy]\nworkers = 2") + (
        f"\n[auth]\nhtpasswd = {folder / 'users'}\n"
        f"\n[mitm]\nenabled = on\nupstream_ca_bundle = {pki.caCert}\n"
    )
    p = ProxyProcess(folder, ini).start()
    # Both workers serve (the master reports them) before anything is measured.
    assert waitFor(lambda: p.metric("proxygate_workers") == 2, timeout=20), p.log()
    with urllib.request.urlopen(f"http://127.0.0.1:{p.metricsPort}/ca.pem", timeout=5) as r:
        (folder / "proxy-ca.pem").write_bytes(r.read())
    p.ca = folder / "proxy-ca.pem"
    yield p
    p.stop()


def traffic(proxy: ProxyProcess, origin, httpsOrigin) -> None:
    """A little of everything: forwarded, decrypted, refused (407), denied (port)."""
    url = proxy.url.replace("http://", f"http://alice:{PASSWORD}@")
    with requests.Session() as s:
        s.trust_env = False
        s.proxies = {"http": url, "https": url}
        for _ in range(3):
            assert s.get(origin.url("/echo"), timeout=10).status_code == 200
            tls = f"https://localhost:{httpsOrigin.port}/echo"
            assert s.get(tls, verify=str(proxy.ca), timeout=10).status_code == 200
        s.proxies = {"http": proxy.url}
        assert s.get(origin.url("/echo"), timeout=10).status_code == 407


def test_dashboardAndAlertsUseExportedNames(fullProxy, origin, httpsOrigin):
    traffic(fullProxy, origin, httpsOrigin)
    exported = exportedNames(fullProxy.metrics())
    assert {"proxygate_workers", "proxygate_worker_restarts_total"} <= exported
    assert "proxygate_request_duration_seconds_bucket" in exported
    landed = {k for k, v in gen.LANDED.items() if v and "{" not in k}
    assert landed <= exported, "switched on in LANDED but not exported"

    dashboard = gen.build()
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 8
    used = set().union(*(metricNames(e) for e in exprs))
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            used |= grafanaVariableMetric(variable["query"])
    assert used - exported == set(), "dashboard queries use names proxygate does not export"
    assert len(used) >= 10

    pendingQueries = [q.expr for p in gen.allPanels() if p.needs for q in p.queries]
    pendingUsed = set().union(*(metricNames(e) for e in pendingQueries))
    assert pendingUsed - exported - pendingNames() == set()

    alertUsed = set().union(*(metricNames(e) for e in alertExpressions().values()))
    unknown = alertUsed - exported - PROMETHEUS_SERIES - pendingNames()
    assert unknown == set(), "alert rules use names proxygate does not export"
    assert "proxygate_backend_up" in alertUsed  # the backend alert is kept, as pending


# -- a real Prometheus -------------------------------------------------------------------------


class Prometheus:
    """Debian's prometheus on loopback with its own data folder, stopped by PID."""

    def __init__(self, folder, target: str) -> None:
        self.port = freePort()
        self.base = f"http://127.0.0.1:{self.port}"
        config = folder / "prometheus.yml"
        config.write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "rule_files": [str(RULES)],
                    "scrape_configs": [
                        {"job_name": "proxygate", "static_configs": [{"targets": [target]}]}
                    ],
                }
            )
        )
        self.log = open(folder / "prometheus.log", "wb")  # noqa: SIM115
        # coreutils timeout bounds its lifetime even if this test run dies; SIGTERM to it
        # (its PID) is passed on to Prometheus.
        self.proc = subprocess.Popen(
            [
                "timeout", "--kill-after=10", "300", PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={folder / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=1h",
                "--log.level=warn",
            ],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=folder,
        )  # fmt: skip

    def get(self, path: str, **params) -> dict:
        url = f"{self.base}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:  # 400/422: the body says why
            return json.loads(e.read())

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"prometheus exited: {self.proc.returncode}")
        try:
            with urllib.request.urlopen(f"{self.base}/-/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def query(self, expr: str) -> dict:
        return self.get("/api/v1/query", query=expr)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.log.close()


@pytest.fixture
def prometheus(tmp_path, fullProxy):
    if PROMETHEUS is None:
        pytest.skip("prometheus missing (Debian package prometheus; tests/run.sh installs it)")
    p = Prometheus(tmp_path, f"127.0.0.1:{fullProxy.metricsPort}")
    try:
        assert waitFor(p.ready, timeout=30), (tmp_path / "prometheus.log").read_text()
        yield p
    finally:
        p.stop()


def scrapes(prometheus: Prometheus) -> float:
    result = prometheus.query('count_over_time(up{job="proxygate"}[1m])')["data"]["result"]
    return float(result[0]["value"][1]) if result else 0.0


def test_prometheusEvaluatesEveryQueryAndRule(prometheus, fullProxy, origin, httpsOrigin):
    assert waitFor(lambda: scrapes(prometheus) >= 2, timeout=30)
    traffic(fullProxy, origin, httpsOrigin)
    assert waitFor(lambda: scrapes(prometheus) >= 6, timeout=30)
    up = prometheus.query('up{job="proxygate"}')["data"]["result"]
    assert [r["value"][1] for r in up] == ["1"]

    failures = []
    panels = [(p.title, q.expr) for p in gen.allPanels() for q in p.queries]
    panels += [(v["name"], v["query"]) for v in gen.build()["templating"]["list"][1:2]]
    for title, expr in panels:
        if expr.startswith("label_values("):
            metric = expr[len("label_values(") :].split(",")[0]
            expr = f"group by (instance) ({metric})"
        answer = prometheus.query(substitute(expr, __range="2m"))
        if answer.get("status") != "success":
            failures.append((title, expr, answer.get("error")))
    for name, expr in alertExpressions().items():
        answer = prometheus.query(expr)
        if answer.get("status") != "success":
            failures.append((name, expr, answer.get("error")))
    assert failures == []

    # The panels over traffic we made return data (a query can be valid and select nothing).
    expected = {
        "Requests by mode and code": {"forward", "mitm"},
        "Denials by reason": {"auth"},
        "Worker processes": None,
        "Open connections": None,
        "Top APIs by requests": None,
        "Certificates minted and cache hits": None,
    }
    for panel in gen.allPanels():
        if panel.title not in expected:
            continue
        result = prometheus.query(substitute(panel.queries[0].expr, __range="2m"))["data"]
        assert result["result"], f"{panel.title}: no data"
        if expected[panel.title]:
            seen = {r["metric"].get("mode") or r["metric"].get("reason") for r in result["result"]}
            assert expected[panel.title] <= seen, (panel.title, seen)

    # Prometheus' own evaluation of the rule file: every rule ran, none failed.
    def evaluated():
        groups = prometheus.get("/api/v1/rules")["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        return rules if all(r["health"] != "unknown" for r in rules) else None

    rules = waitFor(evaluated, timeout=20)
    assert rules, "rules not evaluated"
    assert {r["name"] for r in rules} == set(alertExpressions())
    assert [(r["name"], r["lastError"]) for r in rules if r["health"] != "ok"] == []
    # A healthy proxy raises nothing that is firing.
    firing = [r["name"] for r in rules for a in r.get("alerts", []) if a["state"] == "firing"]
    assert firing == []
