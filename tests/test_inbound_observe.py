"""The inbound gateway's metrics and access-log fields, in process."""

from __future__ import annotations

import json

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.accessrecord import AccessRecord, combinedLine, jsonLine, routeHierarchy, squidLine
from gateway.metrics import Metrics


def samples(metrics: Metrics) -> dict[tuple[str, tuple], float]:
    text = generate_latest(metrics.registry).decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_routedRequestsCountedPerRouteAndAsReverse() -> None:
    m = Metrics()
    m.routed("rstudio", b"GET", 200, 0.003)
    m.routed("rstudio", b"GET", 200, 0.2)
    m.routed("rstudio", b"POST", 502, 0.01)
    m.routed("jupyter", b"GET", 503, 0.0)
    m.request("reverse", b"GET", 404, 0.0)  # no route matched
    s = samples(m)
    assert s[("proxygate_route_requests_total", (("code", "200"), ("route", "rstudio")))] == 2
    assert s[("proxygate_route_requests_total", (("code", "502"), ("route", "rstudio")))] == 1
    assert s[("proxygate_route_requests_total", (("code", "503"), ("route", "jupyter")))] == 1
    reverse = (("code", "200"), ("method", "GET"), ("mode", "reverse"))
    assert s[("proxygate_requests_total", reverse)] == 2
    assert s[("proxygate_requests_total", (("code", "404"), *reverse[1:]))] == 1
    assert not any(k[0] == "proxygate_route_requests_total" and ("code", "404") in k[1] for k in s)
    count = ("proxygate_route_request_duration_seconds_count", (("route", "rstudio"),))
    assert s[count] == 3
    bucket = (
        "proxygate_route_request_duration_seconds_bucket",
        (("le", "0.005"), ("route", "rstudio")),
    )
    assert s[bucket] == 1
    # the same buckets as proxygate_request_duration_seconds
    routeBuckets = [dict(k[1])["le"] for k in s if k[0] == bucket[0] and bucket[1][1] in k[1]]
    modeBuckets = [
        dict(k[1])["le"]
        for k in s
        if k[0] == "proxygate_request_duration_seconds_bucket" and ("mode", "reverse") in k[1]
    ]
    assert routeBuckets == modeBuckets and len(routeBuckets) == 16


def test_backendUpAskedAtScrapeTime() -> None:
    m = Metrics()
    state = {"a": True, "b": True}
    m.watchBackends(
        "rstudio",
        {"http://127.0.0.1:8787": lambda: state["a"], "http://127.0.0.1:8788": lambda: state["b"]},
    )
    key = lambda url: ("proxygate_backend_up", (("backend", url), ("route", "rstudio")))  # noqa: E731
    s = samples(m)
    assert s[key("http://127.0.0.1:8787")] == 1 and s[key("http://127.0.0.1:8788")] == 1
    state["b"] = False
    s = samples(m)
    assert s[key("http://127.0.0.1:8788")] == 0
    m.watchBackends("rstudio", {"http://127.0.0.1:8789": lambda: True})
    s = samples(m)
    assert key("http://127.0.0.1:8787") not in s and s[key("http://127.0.0.1:8789")] == 1
    m.forgetRoute("rstudio")
    assert not any(k[0] == "proxygate_backend_up" for k in samples(m))


def record(**kwargs) -> AccessRecord:
    base = dict(
        start=1795380179.33,
        elapsed=0.013,
        client="192.0.2.7",
        code=200,
        size=6,
        method="GET",
        url="https://apps.example.com/rstudio/x",
        user="alice",
        action="TCP_MISS",
        hierarchy=routeHierarchy("rstudio", "http://127.0.0.1:8787"),
        contentType="text/html",
        mode="reverse",
        route="rstudio",
        backend="http://127.0.0.1:8787",
    )
    base.update(kwargs)
    return AccessRecord(**base)


def test_squidLineNamesRouteAndBackendInTheHierarchyField() -> None:
    line = squidLine(record())
    fields = line.split()
    assert len(fields) == 10  # Squid's native format keeps its ten fields
    assert fields[8] == "rstudio/127.0.0.1:8787"
    assert routeHierarchy("jupyter", None) == "jupyter/-"
    assert routeHierarchy("j", "https://[::1]:8443/") == "j/[::1]:8443"


def test_jsonLineHasRouteAndBackend() -> None:
    doc = json.loads(jsonLine(record()))
    assert (doc["route"], doc["backend"], doc["mode"]) == (
        "rstudio",
        "http://127.0.0.1:8787",
        "reverse",
    )
    forward = json.loads(jsonLine(record(route=None, backend=None, mode="forward")))
    assert "route" not in forward and "backend" not in forward


def test_combinedLineAppendsRouteAndBackend() -> None:
    line = combinedLine(record())
    assert line.endswith(' 200 6 "-" "-" route=rstudio backend=http://127.0.0.1:8787')
    assert combinedLine(record(backend=None)).endswith(" route=rstudio backend=-")
    assert combinedLine(record(route=None, backend=None)).endswith(' 200 6 "-" "-"')
