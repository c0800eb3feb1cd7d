#!/usr/bin/env python3
"""
Builds etc/grafana/proxygate.json, the Grafana dashboard over proxygate's metrics.

    python3 etc/grafana/build_dashboard.py           # (re)writes proxygate.json beside it
    python3 etc/grafana/build_dashboard.py --check   # exit 1 if proxygate.json is stale

Edit the panels here, never the JSON: tests/test_dashboard.py checks that the committed JSON
is this script's output and valid against Grafana's dashboard schema (v39), and
tests/test_observability_live.py that every metric name in a query is one a live proxygate
exports and that a real Prometheus evaluates every query without error.

Metrics that are still being added (on other branches) are "pending": the panels that need
them are written below, marked C{needs=(...)}, and left out of the JSON until L{LANDED} says
the metric exists. When one lands, switch its line in L{LANDED} to True and run this script:
a one-line change, then the regenerated JSON. The alert rules use the same names
(tests/test_observability_live.py reads L{LANDED} for both).

Standard library only. The queries select instances with the C{$instance} variable and use
C{$__rate_interval}, so they work at any scrape interval.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

#: Pending metrics (and one pending label): False until the metric is exported by
#: proxygate in main. Switch a line to True, run this script, commit both files.
LANDED: dict[str, bool] = {
    "proxygate_route_requests_total": True,
    "proxygate_route_request_duration_seconds": True,
    "proxygate_backend_up": True,
    "proxygate_api_grpc_status_total": True,
    "proxygate_config_reloads_total": True,
    "proxygate_build_info": True,
    "proxygate_api_requests_total{method}": True,  # the `method` label on it
}

OUTPUT = Path(__file__).with_name("proxygate.json")
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
I = 'instance=~"$instance"'  # noqa: E741 - every selector starts with it
RATE = "$__rate_interval"
#: gRPC calls are POST /package.Service/Method: the api label of a decrypted gRPC call.
GRPC_API = 'api=~"/[A-Za-z_][A-Za-z0-9_.]*[.][A-Za-z_][A-Za-z0-9_]*/[A-Z][A-Za-z0-9_]*"'


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""
    #: A table of the current values (instant query) rather than a time series.
    instant: bool = False


@dataclass(frozen=True)
class Panel:
    title: str
    kind: str  # timeseries | stat | table | state-timeline
    queries: tuple[Query, ...]
    description: str = ""
    unit: str = "short"
    width: int = 12
    height: int = 8
    #: LANDED keys this panel needs; it is left out until all of them are True.
    needs: tuple[str, ...] = ()
    #: Series whose legend starts with this are drawn as a dashed red limit line.
    limitSeries: str | None = None
    #: Value -> (text, colour) for state panels.
    states: dict[str, tuple[str, str]] = field(default_factory=dict)


@dataclass(frozen=True)
class Row:
    title: str
    panels: tuple[Panel, ...]


def rate(metric: str, labels: str = "", by: str = "", window: str = RATE) -> str:
    """sum [by (...)] (rate(metric{instance=~"$instance",labels}[window]))."""
    selector = f"{metric}{{{I}{',' + labels if labels else ''}}}"
    grouping = f" by ({by}) " if by else ""
    return f"sum{grouping}(rate({selector}[{window}]))"


def increase(metric: str, labels: str = "", by: str = "") -> str:
    """sum by (...) (increase(...[$__range])): totals over the dashboard's time range."""
    selector = f"{metric}{{{I}{',' + labels if labels else ''}}}"
    return f"sum by ({by}) (increase({selector}[$__range]))"


def quantile(q: float, histogram: str, by: str, labels: str = "", window: str = RATE) -> str:
    selector = f"{histogram}_bucket{{{I}{',' + labels if labels else ''}}}"
    return f"histogram_quantile({q}, sum by (le, {by}) (rate({selector}[{window}])))"


def topTable(title: str, expr: str, unit: str, description: str, **kw) -> Panel:
    query = Query(f"topk(10, {expr})", instant=True)
    return Panel(title, "table", (query,), description, unit, **kw)


# The dashboard, row by row. Positional fields of a Panel: title, kind, queries, description,
# unit, width (of 24 columns), height; a panel with needs=(...) waits for LANDED.
ROWS: tuple[Row, ...] = (
    Row(
        "Overview",
        (
            Panel(
                "Requests per second", "stat", (Query(rate("proxygate_requests_total")),),
                "Requests answered, every mode.", "reqps", 4, 4,
            ),
            Panel(
                "5xx ratio", "stat",
                (
                    Query(
                        rate("proxygate_requests_total", 'code=~"5.."')
                        + " / "
                        + rate("proxygate_requests_total")
                    ),
                ),
                "Share of answers that are 5xx (the proxy's 502/503/504 and origins' 5xx).",
                "percentunit", 4, 4,
            ),
            Panel(
                "Open connections", "stat",
                (Query(f"sum(proxygate_client_connections{{{I}}})"),),
                "Client connections open now, all processes.", "short", 4, 4,
            ),
            Panel(
                "Open tunnels", "stat", (Query(f"sum(proxygate_tunnels{{{I}}})"),),
                "CONNECT tunnels open now.", "short", 4, 4,
            ),
            Panel(
                "Processes", "stat",
                (
                    Query(
                        f"sum(proxygate_workers{{{I}}}) or "
                        f"count(proxygate_client_connections{{{I}}})"
                    ),
                ),
                "Processes serving (workers); 1 per instance without workers.", "short", 4, 4,
            ),
            Panel(
                "Version", "stat",
                (Query(f"count by (version) (proxygate_build_info{{{I}}})", "{{version}}"),),
                "Instances per proxygate version.", "short", 4, 4,
                needs=("proxygate_build_info",),
            ),
        ),
    ),
    Row(
        "Traffic",
        (
            Panel(
                "Requests by mode and code", "timeseries",
                (Query(rate("proxygate_requests_total", by="mode, code"), "{{mode}} {{code}}"),),
                "mode: forward (plain HTTP), mitm (decrypted), reverse (inbound routes).",
                "reqps",
            ),
            Panel(
                "Latency percentiles by mode", "timeseries",
                tuple(
                    Query(
                        quantile(q, "proxygate_request_duration_seconds", "mode"),
                        f"p{int(q * 100)} {{{{mode}}}}",
                    )
                    for q in (0.5, 0.9, 0.99)
                ),
                "From a complete request head to the end of the response.", "s",
            ),
            Panel(
                "Bytes by direction", "timeseries",
                (
                    Query(
                        rate("proxygate_transferred_bytes_total", by="direction"),
                        "{{direction}}",
                    ),
                ),
                "from_client, to_upstream, from_upstream, to_client.", "Bps",
            ),
            Panel(
                "WebSocket upgrades by result", "timeseries",
                (
                    Query(
                        rate("proxygate_websocket_upgrades_total", by="result"), "{{result}}"
                    ),
                ),
                "", "ops",
            ),
        ),
    ),
    Row(
        "Connections and tunnels",
        (
            Panel(
                "Open connections and tunnels against max_connections", "timeseries",
                (
                    Query(
                        f"sum by (instance) (proxygate_client_connections{{{I}}})",
                        "connections {{instance}}",
                    ),
                    Query(f"sum by (instance) (proxygate_tunnels{{{I}}})", "tunnels {{instance}}"),
                    Query(
                        f"$max_connections * (max by (instance) (proxygate_workers{{{I}}}) "
                        f"or count by (instance) (proxygate_client_connections{{{I}}}))",
                        "max_connections {{instance}}",
                    ),
                ),
                "The limit line is the max_connections variable (set it to [proxy] "
                "max_connections) times the processes: the limit is per process.",
                limitSeries="max_connections",
            ),
            Panel(
                "New connections and tunnels", "timeseries",
                (
                    Query(rate("proxygate_client_connections_total"), "connections"),
                    Query(rate("proxygate_tunnels_total", by="result"), "tunnels {{result}}"),
                ),
                "Accepted client connections, and tunnels by how they ended.", "ops",
            ),
        ),
    ),
    Row(
        "Refusals and errors",
        (
            Panel(
                "Denials by reason", "timeseries",
                (Query(rate("proxygate_denied_total", by="reason"), "{{reason}}"),),
                "client (allowed_client_cidrs), auth (407), port (connect_ports), "
                "destination (allow/deny_destinations), limit (max_connections, header size).",
                "ops",
            ),
            Panel(
                "Upstream errors by reason", "timeseries",
                (Query(rate("proxygate_upstream_errors_total", by="reason"), "{{reason}}"),),
                "Failures reaching origins: dns, refused, timeout, tls (verification), reset.",
                "ops",
            ),
        ),
    ),
    Row(
        "TLS interception",
        (
            Panel(
                "Certificates minted and cache hits", "timeseries",
                (
                    Query(rate("proxygate_mitm_certificates_issued_total"), "minted"),
                    Query(rate("proxygate_mitm_certificate_cache_hits_total"), "cache hits"),
                ),
                "A minted certificate costs a signature; hits reuse a ready TLS context.", "ops",
                8,
            ),
            Panel(
                "Certificate cache hit ratio", "timeseries",
                (
                    Query(
                        f'{rate("proxygate_mitm_certificate_cache_hits_total")} / '
                        f'({rate("proxygate_mitm_certificate_cache_hits_total")} + '
                        f'{rate("proxygate_mitm_certificates_issued_total")})',
                        "hit ratio",
                    ),
                ),
                "", "percentunit", 8,
            ),
            Panel(
                "Decrypted requests and origin TLS failures", "timeseries",
                (
                    Query(rate("proxygate_requests_total", 'mode="mitm"'), "decrypted requests"),
                    Query(
                        rate("proxygate_upstream_errors_total", 'reason="tls"'),
                        "origin TLS failures",
                    ),
                ),
                "Origins whose certificate does not verify get the client a 502.", "ops", 8,
            ),
        ),
    ),
    Row(
        "APIs (decrypted traffic)",
        (
            topTable(
                "Top APIs by requests",
                increase("proxygate_api_requests_total", by="host, api"),
                "short", "Requests in the time range, per host and normalised path.",
                width=8,
            ),
            topTable(
                "Top APIs by errors (4xx, 5xx)",
                increase("proxygate_api_requests_total", 'code=~"4..|5.."', by="host, api"),
                "short", "", width=8,
            ),
            topTable(
                "Top APIs by p95 latency",
                quantile(0.95, "proxygate_api_latency_seconds", "host, api", window="$__range"),
                "s", "Over the time range.", width=8,
            ),
            topTable(
                "Top APIs by request bytes",
                increase("proxygate_api_request_bytes_total", by="host, api"),
                "bytes", "Request body bytes sent to each API.", width=8,
            ),
            topTable(
                "Top gRPC methods by calls",
                increase("proxygate_api_requests_total", GRPC_API, by="host, api"),
                "short", "gRPC calls are /package.Service/Method.", width=8,
            ),
            topTable(
                "Top gRPC methods by p95 latency",
                quantile(
                    0.95, "proxygate_api_latency_seconds", "host, api", GRPC_API, "$__range"
                ),
                "s", "", width=8,
            ),
            topTable(
                "Top gRPC methods by non-OK status",
                increase(
                    "proxygate_api_grpc_status_total", 'status!="0"', by="host, api, status"
                ),
                "short", "grpc-status from the trailers; 0 is OK.", width=8,
                needs=("proxygate_api_grpc_status_total",),
            ),
            Panel(
                "API requests by HTTP method", "timeseries",
                (Query(rate("proxygate_api_requests_total", by="method"), "{{method}}"),),
                "", "reqps", 8, needs=("proxygate_api_requests_total{method}",),
            ),
        ),
    ),
    Row(
        "Workers",
        (
            Panel(
                "Worker processes", "timeseries",
                (Query(f"sum by (instance) (proxygate_workers{{{I}}})", "{{instance}}"),),
                "Processes in each scrape (with [proxy] workers above 1).",
            ),
            Panel(
                "Worker restarts", "timeseries",
                (
                    Query(
                        f"sum by (instance) (increase(proxygate_worker_restarts_total{{{I}}}"
                        f"[{RATE}]))",
                        "{{instance}}",
                    ),
                ),
                "A worker that died is restarted after a second (5 a minute at most).",
            ),
        ),
    ),
    Row(
        "Routes and backends (inbound gateway)",
        (
            Panel(
                "Route requests by code", "timeseries",
                (
                    Query(
                        rate("proxygate_route_requests_total", by="route, code"),
                        "{{route}} {{code}}",
                    ),
                ),
                "", "reqps", 8, needs=("proxygate_route_requests_total",),
            ),
            Panel(
                "Route p95 latency", "timeseries",
                (
                    Query(
                        quantile(0.95, "proxygate_route_request_duration_seconds", "route"),
                        "{{route}}",
                    ),
                ),
                "", "s", 8, needs=("proxygate_route_request_duration_seconds",),
            ),
            Panel(
                "Backend health", "state-timeline",
                (
                    Query(
                        f"max by (route, backend) (proxygate_backend_up{{{I}}})",
                        "{{route}} {{backend}}",
                    ),
                ),
                "1: up, 0: down (health checks and failed connections).", "short", 8,
                needs=("proxygate_backend_up",),
                states={"0": ("down", "red"), "1": ("up", "green")},
            ),
        ),
    ),
    Row(
        "Operations",
        (
            Panel(
                "Configuration reloads", "timeseries",
                (
                    Query(
                        f"sum by (result) (increase(proxygate_config_reloads_total{{{I}}}"
                        f"[{RATE}]))",
                        "{{result}}",
                    ),
                ),
                "SIGHUP reloads: ok, or error (the running configuration stays).",
                needs=("proxygate_config_reloads_total",),
            ),
        ),
    ),
)  # fmt: skip


def included(panel: Panel, landed: dict[str, bool]) -> bool:
    unknown = [n for n in panel.needs if n not in landed]
    if unknown:
        raise KeyError(f"{panel.title!r} needs {unknown}, which LANDED does not list")
    return all(landed[n] for n in panel.needs)


def allPanels() -> list[Panel]:
    """Every panel defined, pending ones included (the live test evaluates them all)."""
    return [p for row in ROWS for p in row.panels]


# -- Grafana JSON -----------------------------------------------------------------------------


def _fieldConfig(panel: Panel) -> dict:
    defaults: dict = {"unit": panel.unit, "color": {"mode": "palette-classic"}}
    if panel.kind == "timeseries":
        defaults["min"] = 0
        defaults["custom"] = {"drawStyle": "line", "fillOpacity": 10, "showPoints": "never"}
    if panel.kind == "stat":
        defaults["color"] = {"mode": "thresholds"}
        defaults["thresholds"] = {"mode": "absolute", "steps": [{"color": "green", "value": None}]}
    if panel.states:
        defaults["color"] = {"mode": "thresholds"}
        defaults["mappings"] = [
            {
                "type": "value",
                "options": {
                    value: {"text": text, "color": colour, "index": i}
                    for i, (value, (text, colour)) in enumerate(sorted(panel.states.items()))
                },
            }
        ]
    overrides = []
    if panel.limitSeries:
        overrides.append(
            {
                "matcher": {"id": "byRegexp", "options": f"^{panel.limitSeries}.*"},
                "properties": [
                    {"id": "color", "value": {"mode": "fixed", "fixedColor": "red"}},
                    {"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [10, 10]}},
                    {"id": "custom.fillOpacity", "value": 0},
                ],
            }
        )
    return {"defaults": defaults, "overrides": overrides}


_OPTIONS = {
    "timeseries": {
        "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
        "tooltip": {"mode": "multi", "sort": "desc"},
    },
    "stat": {
        "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
        "colorMode": "value",
        "graphMode": "area",
        "justifyMode": "auto",
        "orientation": "auto",
        "textMode": "auto",
    },
    "table": {"showHeader": True, "cellHeight": "sm"},
    "state-timeline": {
        "mergeValues": True,
        "showValue": "auto",
        "alignValue": "left",
        "rowHeight": 0.9,
        "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
    },
}


def _target(query: Query, refId: str) -> dict:
    target = {
        "refId": refId,
        "datasource": DATASOURCE,
        "editorMode": "code",
        "expr": query.expr,
        "legendFormat": query.legend or "__auto",
        "range": not query.instant,
        "instant": query.instant,
    }
    if query.instant:
        target["format"] = "table"
    return target


def _panel(panel: Panel, panelId: int, x: int, y: int) -> dict:
    out = {
        "id": panelId,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": panel.height, "w": panel.width, "x": x, "y": y},
        "targets": [_target(q, chr(ord("A") + i)) for i, q in enumerate(panel.queries)],
        "fieldConfig": _fieldConfig(panel),
        "options": _OPTIONS[panel.kind],
    }
    if panel.kind == "table":
        # Instant tables: one row per series, without the timestamp column.
        out["transformations"] = [
            {"id": "organize", "options": {"excludeByName": {"Time": True}}},
            {"id": "sortBy", "options": {"sort": [{"field": "Value", "desc": True}]}},
        ]
    return out


def _templating() -> dict:
    return {
        "list": [
            {
                "type": "datasource",
                "name": "datasource",
                "label": "Data source",
                "query": "prometheus",
                "hide": 0,
                "refresh": 1,
                "includeAll": False,
                "multi": False,
                "regex": "",
                "skipUrlSync": False,
            },
            {
                "type": "query",
                "name": "instance",
                "label": "Instance",
                "datasource": DATASOURCE,
                "query": "label_values(proxygate_client_connections, instance)",
                "hide": 0,
                "refresh": 2,
                "includeAll": True,
                "multi": True,
                "allValue": ".*",
                "regex": "",
                "sort": 1,
                "skipUrlSync": False,
            },
            {
                "type": "textbox",
                "name": "max_connections",
                "label": "max_connections per process",
                "description": "[proxy] max_connections of the proxies shown (default 10000)",
                "query": "10000",
                "current": {"text": "10000", "value": "10000"},
                "hide": 0,
                "skipUrlSync": False,
            },
        ]
    }


def build(landed: dict[str, bool] | None = None) -> dict:
    """The dashboard as a JSON-ready dict, with the panels whose metrics have landed."""
    landed = LANDED if landed is None else landed
    panels: list[dict] = []
    y = 0
    nextId = 1
    for row in ROWS:
        shown = [p for p in row.panels if included(p, landed)]
        if not shown:
            continue
        panels.append(
            {
                "id": nextId,
                "type": "row",
                "title": row.title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                "panels": [],
            }
        )
        nextId += 1
        y += 1
        x = rowHeight = 0
        for panel in shown:
            if x + panel.width > 24:
                x, y, rowHeight = 0, y + rowHeight, 0
            panels.append(_panel(panel, nextId, x, y))
            nextId += 1
            x += panel.width
            rowHeight = max(rowHeight, panel.height)
        y += rowHeight
    return {
        "uid": "proxygate",
        "title": "proxygate",
        "description": "proxygate forward proxy: traffic, latency, refusals, upstream errors, "
        "TLS interception, APIs, workers. Generated by etc/grafana/build_dashboard.py.",
        "tags": ["proxygate", "proxy"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "refresh": "30s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-6h", "to": "now"},
        "timepicker": {},
        "links": [],
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "templating": _templating(),
        "panels": panels,
    }


def render(landed: dict[str, bool] | None = None) -> str:
    return json.dumps(build(landed), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the JSON is stale")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = OUTPUT.read_text() if OUTPUT.exists() else ""
        if current != text:
            print(f"{OUTPUT} is stale: run {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
