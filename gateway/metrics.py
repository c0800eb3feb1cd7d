"""
The project's Prometheus metrics, in a registry of their own, and the /metrics resource.

Every label is bounded: modes, methods folded to a known set, status codes, fixed reasons.
Never a client address, a URL or a user name (a label per value is a cardinality DoS).
The resource renders synchronously in the reactor thread: no thread pool, so a scrape
never competes with DNS look-ups for the reactor's threads.
"""

from __future__ import annotations

from bisect import bisect_left

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.utils import floatToGoString
from twisted.web.resource import Resource

__all__ = ["Metrics", "MetricsResource"]

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
        # DESIGN.md pairs gauges and counters under one base name (proxygate_tunnels and
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
        self.apiRequests = Counter(
            "proxygate_api_requests",
            "Decrypted (MITM) requests by host, API and status.",
            ["host", "api", "code"],
            registry=r,
        )
        self.apiLatency = Histogram(
            "proxygate_api_latency_seconds",
            "Decrypted (MITM) request latency by host and API.",
            ["host", "api"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.apiRequestBytes = Counter(
            "proxygate_api_request_bytes",
            "Request body bytes of decrypted (MITM) requests.",
            ["host", "api"],
            registry=r,
        )
        self.maxAPISeries = 500
        self._apis: dict[tuple[str, str], tuple] = {}
        live = self.live
        self.fromClient = live.transferred["from_client"]
        self.toClient = live.transferred["to_client"]
        self.fromUpstream = live.transferred["from_upstream"]
        self.toUpstream = live.transferred["to_upstream"]
        for reason in ("client", "auth", "port", "destination", "limit"):
            self.denied.labels(reason)
        for reason in ("dns", "refused", "timeout", "tls", "reset"):
            self.upstreamErrors.labels(reason)

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

    def api(self, host: str, api: str, code: int, seconds: float, requestBytes: int) -> None:
        """
        Per-API figures of decrypted traffic. The number of (host, api) pairs is capped:
        past the cap, new pairs are counted as host="other", api="other", so a client
        inventing paths or names cannot grow the scrape without bound.
        """
        key = (host, api)
        children = self._apis.get(key)
        if children is None:
            if len(self._apis) >= self.maxAPISeries:
                key = ("other", "other")
                children = self._apis.get(key)
            if children is None:
                children = self._apis[key] = (
                    self.apiLatency.labels(*key),
                    self.apiRequestBytes.labels(*key),
                    {},
                )
        latency, size, codes = children
        latency.observe(seconds)
        if requestBytes:
            size.inc(requestBytes)
        counter = codes.get(code)
        if counter is None:
            counter = codes[code] = self.apiRequests.labels(key[0], key[1], str(code))
        counter.inc()


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
        duration = HistogramMetricFamily(
            "proxygate_request_duration_seconds",
            "Time from a complete request head to the end of the response.",
            labels=["mode"],
        )
        for mode, hist in sorted(self.durations.items()):
            cumulative, buckets = 0, []
            for bound, count in zip((*_DURATION_BUCKETS, float("inf")), hist.buckets, strict=True):
                cumulative += count
                buckets.append((floatToGoString(bound), cumulative))
            duration.add_metric([mode], buckets, hist.sum)
        yield duration
        transferred = CounterMetricFamily(
            "proxygate_transferred_bytes", "Bytes moved, by direction.", labels=["direction"]
        )
        for direction, count in self.transferred.items():
            transferred.add_metric([direction], count.value)
        yield transferred


class MetricsResource(Resource):
    """Renders the registry in the format the scraper asks for (text or OpenMetrics)."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request):
        accept = request.getHeader(b"accept")
        encoder, contentType = choose_encoder(accept.decode("latin-1") if accept else "")
        request.setHeader(b"content-type", contentType.encode("ascii"))
        return encoder(self.registry)
