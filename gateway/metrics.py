"""
The project's Prometheus metrics, in a registry of their own, and the scrape handler the
metrics listener (L{gateway.metricsserver}) serves them with.

Every label is bounded: modes, methods folded to a known set, status codes, fixed reasons.
Never a client address, a URL or a user name (a label per value is a cardinality DoS).
The handler renders synchronously in the reactor thread: no thread pool, so a scrape
never competes with DNS look-ups for the reactor's threads.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Info, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import (
    CONTENT_TYPE_PLAIN_0_0_4,
    choose_encoder,
    generate_latest,
)
from prometheus_client.utils import floatToGoString

from ._version import __version__
from .apinames import normaliseAPI

if TYPE_CHECKING:
    from .http1.parse import RequestHead
    from .metricsserver import Answer, Handler

__all__ = ["TEXT_FORMAT", "Metrics", "expose", "metricsHandler", "normaliseAPI"]

_METHODS = frozenset(
    b"GET HEAD POST PUT DELETE OPTIONS TRACE PATCH CONNECT PROPFIND PROPPATCH MKCOL COPY MOVE "
    b"LOCK UNLOCK".split()
)
_DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """All metric objects, created once; label children are cached per combination."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        # The contract pairs gauges and counters under one base name (proxygate_tunnels and
        # proxygate_tunnels_total); prometheus_client refuses that pair in one registry, so
        # both come from one small collector over plain integers (cheaper on the hot path too).
        self.live = _LiveCollector()
        r.register(self.live)
        self.upgrades = Counter(
            "proxygate_websocket_upgrades", "Upgrade requests by outcome.", ["result"], registry=r
        )
        self.denied = Counter(
            "proxygate_denied",
            "Requests or connections refused, by reason.",
            ["reason"],
            registry=r,
        )
        self.upstreamErrors = Counter(
            "proxygate_upstream_errors",
            "Failures reaching or talking to origins.",
            ["reason"],
            registry=r,
        )
        self.certificatesIssued = Counter(
            "proxygate_mitm_certificates_issued", "Leaf certificates minted.", registry=r
        )
        self.certificateCacheHits = Counter(
            "proxygate_mitm_certificate_cache_hits",
            "TLS contexts served from the cache.",
            registry=r,
        )
        self.configReloads = Counter(
            "proxygate_config_reloads",
            "Configuration reloads (SIGHUP), by result: ok, or error (the previous one kept).",
            ["result"],
            registry=r,
        )
        Info("proxygate_build", "The running proxygate.", registry=r).info({"version": __version__})
        # process_cpu_seconds_total, process_resident_memory_bytes, process_open_fds...
        ProcessCollector(registry=r)
        self.maxAPISeries = 500
        live = self.live
        self.fromClient = live.transferred["from_client"]
        self.toClient = live.transferred["to_client"]
        self.fromUpstream = live.transferred["from_upstream"]
        self.toUpstream = live.transferred["to_upstream"]
        for reason in ("client", "auth", "port", "destination", "limit"):
            self.denied.labels(reason)
        for reason in ("dns", "refused", "timeout", "tls", "reset"):
            self.upstreamErrors.labels(reason)
        for result in ("ok", "error"):
            self.configReloads.labels(result)

    def request(self, mode: str, method: bytes, code: int, seconds: float) -> None:
        """One answered request: a dict increment and a bucket search, no locks."""
        requests = self.live.requests
        key = (mode, method if method in _METHODS else b"OTHER", code)
        requests[key] = requests.get(key, 0) + 1
        hist = self.live.durations.get(mode)
        if hist is None:
            hist = self.live.durations[mode] = _Histogram()
        hist.observe(seconds)

    def moved(self, fromClient: int, toUpstream: int, fromUpstream: int, toClient: int) -> None:
        """Bytes of one finished exchange or tunnel, in the four directions counted."""
        self.fromClient.value += fromClient
        self.toUpstream.value += toUpstream
        self.fromUpstream.value += fromUpstream
        self.toClient.value += toClient

    def routed(self, route: str, method: bytes, code: int, seconds: float) -> None:
        """
        One answered request of the inbound gateway's route C{route}: counted in
        C{proxygate_requests_total{mode="reverse"}} and in the route's own series. A request
        no route matched (404) is counted with L{request} alone: route names come from the
        INI, never from a request.
        """
        self.request("reverse", method, code, seconds)
        live = self.live
        key = (route, code)
        live.routeRequests[key] = live.routeRequests.get(key, 0) + 1
        hist = live.routeDurations.get(route)
        if hist is None:
            hist = live.routeDurations[route] = _Histogram()
        hist.observe(seconds)

    def watchBackends(self, route: str, backends: dict[str, Callable[[], bool]]) -> None:
        """
        Export C{proxygate_backend_up{route,backend}} for a route's backends (URL as in the
        INI -> whether it is up now, asked at scrape time), replacing what the route had
        (a reload may change the list).
        """
        states = self.live.backendUp
        for key in [k for k in states if k[0] == route]:
            del states[key]
        for url, isUp in backends.items():
            states[(route, url)] = isUp

    def forgetRoute(self, route: str) -> None:
        """A route is gone (a reload removed it): its backends' gauges go with it."""
        self.watchBackends(route, {})

    def api(
        self,
        host: str,
        api: str,
        method: bytes,
        code: int,
        seconds: float,
        requestBytes: int,
        grpcStatus: bytes | None = None,
    ) -> None:
        """
        Per-API figures of decrypted traffic (C{api} from L{normaliseAPI}, or a gRPC
        method). The number of (host, api) pairs is capped: past the cap, new pairs are
        counted as host="other", api="other", so a client inventing paths or names cannot
        grow the scrape without bound. The method is a label of the request counter only
        (GET, PUT and DELETE on one path are different APIs), folded to the known methods
        like proxygate_requests_total's, so it multiplies those series by a fixed bound at
        most. A gRPC call's C{grpcStatus} (its trailers' grpc-status) counts in
        proxygate_api_grpc_status_total: a number of one or two digits (the codes are
        0-16), anything else as "other".
        """
        apis = self.live.apis
        key = (host, api)
        figures = apis.get(key)
        if figures is None:
            if len(apis) >= self.maxAPISeries:
                key = ("other", "other")
                figures = apis.get(key)
            if figures is None:
                figures = apis[key] = _API()
        figures.latency.observe(seconds)
        figures.requestBytes += requestBytes
        codes = figures.codes
        key = (method if method in _METHODS else b"OTHER", code)
        codes[key] = codes.get(key, 0) + 1
        if grpcStatus is not None:
            status = (
                grpcStatus.decode("ascii")
                if len(grpcStatus) <= 2 and grpcStatus.isdigit()
                else "other"
            )
            statuses = figures.grpc
            statuses[status] = statuses.get(status, 0) + 1


class _Count:
    """A counter that is a plain integer (the reactor is single-threaded)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self, amount: int = 1) -> None:
        self.value += amount


class _Histogram:
    __slots__ = ("buckets", "count", "sum")

    def __init__(self) -> None:
        self.buckets = [0] * (len(_DURATION_BUCKETS) + 1)
        self.count = 0
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.buckets[bisect_left(_DURATION_BUCKETS, seconds)] += 1
        self.count += 1
        self.sum += seconds


class _API:
    """The figures of one (host, API) pair of decrypted traffic."""

    __slots__ = ("codes", "grpc", "latency", "requestBytes")

    def __init__(self) -> None:
        self.codes: dict[tuple[bytes, int], int] = {}
        self.latency = _Histogram()
        self.requestBytes = 0
        self.grpc: dict[str, int] = {}  # grpc-status -> calls


def _histogram(name: str, documentation: str, labelNames, series) -> HistogramMetricFamily:
    """A histogram family from (label values, L{_Histogram}) pairs."""
    family = HistogramMetricFamily(name, documentation, labels=labelNames)
    for labels, hist in series:
        cumulative, buckets = 0, []
        for bound, count in zip((*_DURATION_BUCKETS, float("inf")), hist.buckets, strict=True):
            cumulative += count
            buckets.append((floatToGoString(bound), cumulative))
        family.add_metric(labels, buckets, hist.sum)
    return family


class _LiveCollector:
    """
    The per-request figures, kept as plain integers and exported at scrape time: the
    prometheus_client objects take a lock per update, which costs more than the rest of
    the bookkeeping of a request together.
    """

    def __init__(self) -> None:
        self.clientConnections = 0
        self.clientConnectionsTotal = 0
        self.tunnels = 0
        self.tunnelsTotal: dict[str, int] = {}
        self.requests: dict[tuple[str, bytes, int], int] = {}
        self.durations: dict[str, _Histogram] = {}
        self.apis: dict[tuple[str, str], _API] = {}
        self.routeRequests: dict[tuple[str, int], int] = {}
        self.routeDurations: dict[str, _Histogram] = {}
        self.backendUp: dict[tuple[str, str], Callable[[], bool]] = {}
        self.transferred = {
            d: _Count() for d in ("from_client", "to_client", "from_upstream", "to_upstream")
        }

    def tunnelEnded(self, result: str) -> None:
        self.tunnelsTotal[result] = self.tunnelsTotal.get(result, 0) + 1

    def collect(self):
        yield GaugeMetricFamily(
            "proxygate_client_connections",
            "Client connections open now.",
            value=self.clientConnections,
        )
        yield CounterMetricFamily(
            "proxygate_client_connections",
            "Client connections accepted.",
            value=self.clientConnectionsTotal,
        )
        yield GaugeMetricFamily(
            "proxygate_tunnels", "CONNECT tunnels open now.", value=self.tunnels
        )
        total = CounterMetricFamily(
            "proxygate_tunnels", "CONNECT tunnels by outcome.", labels=["result"]
        )
        for result, count in sorted(self.tunnelsTotal.items()):
            total.add_metric([result], count)
        yield total
        requests = CounterMetricFamily(
            "proxygate_requests",
            "Requests answered, by mode, method and status code.",
            labels=["mode", "method", "code"],
        )
        for (mode, method, code), count in sorted(self.requests.items()):
            requests.add_metric([mode, method.decode("ascii"), str(code)], count)
        yield requests
        yield _histogram(
            "proxygate_request_duration_seconds",
            "Time from a complete request head to the end of the response.",
            ["mode"],
            (([mode], hist) for mode, hist in sorted(self.durations.items())),
        )
        apis = sorted(self.apis.items())
        apiRequests = CounterMetricFamily(
            "proxygate_api_requests",
            "Decrypted (MITM) requests by host, API, method and status.",
            labels=["host", "api", "method", "code"],
        )
        apiBytes = CounterMetricFamily(
            "proxygate_api_request_bytes",
            "Request body bytes of decrypted (MITM) requests.",
            labels=["host", "api"],
        )
        grpcStatus = CounterMetricFamily(
            "proxygate_api_grpc_status",
            "gRPC calls of decrypted traffic by host, method (api) and grpc-status.",
            labels=["host", "api", "status"],
        )
        for (host, api), figures in apis:
            for (method, code), count in sorted(figures.codes.items()):
                apiRequests.add_metric([host, api, method.decode("ascii"), str(code)], count)
            apiBytes.add_metric([host, api], figures.requestBytes)
            for status, count in sorted(figures.grpc.items()):
                grpcStatus.add_metric([host, api, status], count)
        yield apiRequests
        yield grpcStatus
        yield _histogram(
            "proxygate_api_latency_seconds",
            "Decrypted (MITM) request latency by host and API.",
            ["host", "api"],
            (([host, api], figures.latency) for (host, api), figures in apis),
        )
        yield apiBytes
        yield from self._routes()
        transferred = CounterMetricFamily(
            "proxygate_transferred_bytes", "Bytes moved, by direction.", labels=["direction"]
        )
        for direction, count in self.transferred.items():
            transferred.add_metric([direction], count.value)
        yield transferred

    def _routes(self):
        """The inbound gateway's families (present, possibly empty, in every scrape)."""
        requests = CounterMetricFamily(
            "proxygate_route_requests",
            "Requests answered by the inbound gateway, by route and status code.",
            labels=["route", "code"],
        )
        for (route, code), count in sorted(self.routeRequests.items()):
            requests.add_metric([route, str(code)], count)
        yield requests
        yield _histogram(
            "proxygate_route_request_duration_seconds",
            "Time from a complete request head to the end of the response, by route.",
            ["route"],
            (([route], hist) for route, hist in sorted(self.routeDurations.items())),
        )
        up = GaugeMetricFamily(
            "proxygate_backend_up",
            "1 when a route's backend is taken for requests, 0 while it is marked down.",
            labels=["route", "backend"],
        )
        for (route, url), isUp in sorted(self.backendUp.items()):
            up.add_metric([route, url], 1 if isUp() else 0)
        yield up


#: The text format, for scrapers that ask for nothing else or for something this client
#: library cannot give.
TEXT_FORMAT = CONTENT_TYPE_PLAIN_0_0_4.encode("ascii")


def expose(head: RequestHead, registry) -> tuple[bytes, bytes]:
    """
    The exposition of C{registry} in the format a scraper's Accept field asks for, as
    (Content-Type, body): OpenMetrics or the text format, as prometheus_client decides.

    prometheus_client raises on some Accept values (C{version=a} compared with a tuple:
    TypeError), and might on others in later versions; a scrape must not become a 500 for
    that, so anything it cannot serve gets the text format, which every scraper reads.
    """
    accept = b", ".join(head.values(b"accept")).decode("latin-1")
    try:
        encoder, contentType = choose_encoder(accept)
        # latin-1: the type echoes the client's version parameter, which may hold obs-text.
        return contentType.encode("latin-1"), encoder(registry)
    except Exception:
        return TEXT_FORMAT, generate_latest(registry)


def metricsHandler(registry: CollectorRegistry) -> Handler:
    """The scrape route of a single process: the registry, rendered now."""

    def scrape(head: RequestHead) -> Answer:
        return (200, *expose(head, registry))

    return scrape
