"""
The Grafana dashboard (etc/grafana/proxygate.json) and its generator, in process: the
committed JSON is the generator's output, it is valid against Grafana's dashboard schema
(v39, tests/data/grafana/), its grid is sound, its variables are defined, and the pending
panels appear exactly when their metrics are switched on. The metric-name extraction the
live tests rely on (tests/promql.py) is pinned here too.

Whether every metric name exists in a live scrape, and whether a real Prometheus evaluates
every query, is tests/test_observability_live.py.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys

import jsonschema
import pytest

from tests.support import REPO
from tests.support.promql import exportedNames, grafanaVariableMetric, metricNames, substitute

GENERATOR = REPO / "etc" / "grafana" / "build_dashboard.py"
DASHBOARD = REPO / "etc" / "grafana" / "proxygate.json"
SCHEMA = REPO / "tests" / "data" / "grafana" / "dashboard-v39.schema.json"


def loadGenerator():
    spec = importlib.util.spec_from_file_location("build_dashboard", GENERATOR)
    module = importlib.util.module_from_spec(spec)
    sys.modules["build_dashboard"] = module
    spec.loader.exec_module(module)
    return module


gen = loadGenerator()


def targets(dashboard: dict) -> list[dict]:
    return [t for p in dashboard["panels"] for t in p.get("targets", [])]


def test_committedJSONIsTheGeneratorsOutput():
    """Edit build_dashboard.py, then run it: the JSON is never edited by hand."""
    assert DASHBOARD.read_text() == gen.render(), "run python3 etc/grafana/build_dashboard.py"
    done = subprocess.run(
        [sys.executable, str(GENERATOR), "--check"], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr


def test_validAgainstGrafanaDashboardSchema():
    schema = json.loads(SCHEMA.read_text())
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(json.loads(DASHBOARD.read_text())), key=str)
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors[:10])
    # The schema is strict enough to catch the mistakes a hand edit makes.
    broken = gen.build()
    broken["panels"][1]["gridPos"]["w"] = 30
    broken["panels"][1]["targets"][0]["exp"] = broken["panels"][1]["targets"][0].pop("expr")
    broken["titel"] = "typo"
    messages = {e.message for e in validator.iter_errors(broken)}
    assert any("titel" in m for m in messages)
    assert len(list(validator.iter_errors(broken))) >= 2


def test_gridIsSound():
    """Unique ids, 24 columns, no overlaps, rows above their panels, in reading order."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells = set()
    order = []
    for panel in panels:
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24, panel["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps at {(x, y)}"
                cells.add((x, y))
        order.append((g["y"], g["x"]))
    assert order == sorted(order)
    assert panels[0]["type"] == "row"


def test_queriesAndVariables():
    """At least 8 queries, each target wired to the datasource variable, every $var defined."""
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for t in targets(dashboard)]
    assert len(exprs) >= 8
    defined = {v["name"] for v in dashboard["templating"]["list"]}
    assert defined == {"datasource", "instance", "max_connections"}
    builtins = {"__rate_interval", "__range", "__interval"}
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        refIds = [t["refId"] for t in panel["targets"]]
        assert len(refIds) == len(set(refIds))
        for target in panel["targets"]:
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            used = set(re.findall(r"\$\{?(\w+)\}?", target["expr"]))
            assert used <= defined | builtins, (panel["title"], used)
            # Every selector is limited to the chosen instances.
            for selector in re.findall(r"proxygate_\w+\{([^}]*)\}", target["expr"]):
                assert 'instance=~"$instance"' in selector, target["expr"]


def test_issuePanelsArePresent():
    titles = {p["title"] for p in json.loads(DASHBOARD.read_text())["panels"]}
    for title in (
        "Requests by mode and code",
        "Latency percentiles by mode",
        "Open connections and tunnels against max_connections",
        "Denials by reason",
        "Upstream errors by reason",
        "Bytes by direction",
        "Certificate cache hit ratio",
        "Top APIs by requests",
        "Top gRPC methods by calls",
        "Worker restarts",
    ):
        assert title in titles


#: What has landed (metrics proxygate exports now): their panels are in the dashboard.
LANDED_NOW = {
    "proxygate_route_requests_total",
    "proxygate_route_request_duration_seconds",
    "proxygate_backend_up",
    "proxygate_config_reloads_total",
    "proxygate_build_info",
    "proxygate_api_requests_total{method}",
    "proxygate_api_grpc_status_total",
}


def test_pendingPanelsAppearWhenTheirMetricsLand():
    """LANDED switches pending panels on, one metric at a time."""
    assert {name for name, on in gen.LANDED.items() if on} == LANDED_NOW
    pending = [p for p in gen.allPanels() if p.needs]
    assert {n for p in pending for n in p.needs} == set(gen.LANDED)
    none = gen.build(dict.fromkeys(gen.LANDED, False))
    base = {p["title"] for p in none["panels"]}
    assert not {p.title for p in pending} & base
    assert "Routes and backends (inbound gateway)" not in base  # a row with nothing in it
    everything = gen.build(dict.fromkeys(gen.LANDED, True))
    titles = [p["title"] for p in everything["panels"]]
    assert {p.title for p in pending} <= set(titles)
    assert "Routes and backends (inbound gateway)" in titles
    onlyBackends = gen.build({**dict.fromkeys(gen.LANDED, False), "proxygate_backend_up": True})
    added = {p["title"] for p in onlyBackends["panels"]} - base
    assert added == {"Backend health", "Routes and backends (inbound gateway)"}
    shipped = {p["title"] for p in json.loads(DASHBOARD.read_text())["panels"]}
    assert {"Backend health", "Route requests by code"} <= shipped
    jsonschema.validate(everything, json.loads(SCHEMA.read_text()))
    with pytest.raises(KeyError):
        gen.included(gen.Panel("x", "stat", (), needs=("proxygate_unknown",)), gen.LANDED)


# -- the metric-name extraction (tests/promql.py) ---------------------------------------------


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ("up", {"up"}),
        ('up{job="proxygate"} == 0', {"up"}),
        ('absent(up{job="proxygate"})', {"up"}),
        (
            'sum by (mode, code) (rate(proxygate_requests_total{instance=~"$instance"}'
            "[$__rate_interval]))",
            {"proxygate_requests_total"},
        ),
        (
            "histogram_quantile(0.99, sum by (le) (rate(a_bucket[5m]))) > 1e3",
            {"a_bucket"},
        ),
        ("sum(rate(a[5m])) by (reason) / on (instance) group_left(x) b offset 1h", {"a", "b"}),
        ('$max_connections * (max by (instance) (w) or count(c{x="by (y)"}))', {"w", "c"}),
        ('rate(a{api=~"/[A-Z].*"}[1h] offset 5m) > 3 * rate(b[1h:5m])', {"a", "b"}),
        ("topk(10, sum by (host, api) (increase(x_total[$__range])))", {"x_total"}),
        ("job:requests:rate5m > bool 2", {"job:requests:rate5m"}),
        ("vector(1) and on() time() > 0", set()),
    ],
)
def test_metricNames(expr, names):
    assert metricNames(expr) == names


def test_grafanaVariableMetricAndSubstitution():
    assert grafanaVariableMetric("label_values(proxygate_tunnels, instance)") == {
        "proxygate_tunnels"
    }
    assert grafanaVariableMetric('label_values(up{job="p"}, instance)') == {"up"}
    assert (
        substitute('rate(a{instance=~"$instance"}[$__rate_interval]) * ${max_connections}')
        == 'rate(a{instance=~".*"}[15s]) * 10000'
    )


def test_exportedNames():
    scrape = (
        "# HELP a_total x\n# TYPE a_total counter\na_total 1\n"
        '# TYPE h_seconds histogram\nh_seconds_bucket{le="1"} 0\n'
        "# TYPE empty_total counter\n"  # a labelled family with no sample yet
        "# TYPE g gauge\ng 3\n"
    )
    assert exportedNames(scrape) == {
        "a_total", "h_seconds", "h_seconds_bucket", "h_seconds_sum", "h_seconds_count",
        "empty_total", "g",
    }  # fmt: skip
