"""
What a scraper's Accept and Accept-Encoding get from the metrics listener (issue 19, items
6 and 11):

- an Accept that prometheus_client cannot serve (``application/openmetrics-text;
  version=a`` made its choose_encoder raise: a 500) gets the text format; Hypothesis checks
  that no Accept value makes L{expose} raise;
- a scraper that accepts gzip gets the exposition gzip-compressed (Content-Encoding, Vary,
  HEAD with the compressed length), from one process and from the merged scrape of
  ``workers``; curl ``--compressed`` reads it; weights (``gzip;q=0``) are honoured;
- the CA certificate routes are never compressed.
"""

from __future__ import annotations

import gzip
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter

from gateway.http1.parse import RequestHead
from gateway.metrics import TEXT_FORMAT, expose
from gateway.metricsserver import acceptsGzip
from tests.support import LOOPBACK_INI, waitFor
from tests.test_metrics_server import connect, exchange, readResponse, request

TEXT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _head(*fields: tuple[bytes, bytes]) -> RequestHead:
    return RequestHead(b"GET", b"/metrics", b"HTTP/1.1", [(b"Host", b"x"), *fields])


def _registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    Counter("field_things", "Things.", ["kind"], registry=registry).labels("a").inc()
    return registry


@pytest.mark.parametrize(
    "accept",
    [
        b"application/openmetrics-text; version=a",
        b"application/openmetrics-text; version=1.x.0",
        b"text/plain; version=b",
        b"text/plain; version=\xff",
    ],
)
def test_unservableAcceptGetsTheTextFormat(accept):
    contentType, body = expose(_head((b"Accept", accept)), _registry())
    assert contentType == TEXT_FORMAT
    assert b'field_things_total{kind="a"} 1.0' in body


def test_openMetricsStillServed():
    contentType, body = expose(
        _head((b"Accept", b"application/openmetrics-text; version=1.0.0")), _registry()
    )
    assert contentType.startswith(b"application/openmetrics-text; version=1.0.0")
    assert body.endswith(b"# EOF\n")


@settings(max_examples=500, deadline=None)
@given(accept=st.binary(max_size=120))
def test_noAcceptMakesExposeRaise(accept):
    contentType, body = expose(_head((b"Accept", accept)), _registry())
    assert contentType and b"field_things" in body


_METRICS_WORDS = [
    *(b"application/openmetrics-text", b"text/plain", b"version=", b";", b",", b"a", b" "),
    *(b"1.0.0", b"0.0.4", b"escaping=", b"allow-utf-8"),
]


@settings(max_examples=300, deadline=None)
@given(
    accept=st.lists(
        st.sampled_from(_METRICS_WORDS),
        max_size=12,
    )
)
def test_noAcceptOfMetricsWordsMakesExposeRaise(accept):
    contentType, _ = expose(_head((b"Accept", b"".join(accept))), _registry())
    assert contentType


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([b"gzip"], True),
        ([b"gzip, deflate, br"], True),
        ([b"GZIP;q=0.5"], True),
        ([b"x-gzip"], True),
        ([b"*"], True),
        ([b"identity"], False),
        ([], False),
        ([b"gzip;q=0"], False),
        ([b"gzip; q=0.000"], False),
        ([b"*, gzip;q=0"], False),
        ([b"*;q=0"], False),
        ([b"deflate", b"gzip"], True),
        ([b"gzip;q=zero"], False),
    ],
)
def test_acceptsGzip(values, expected):
    assert acceptsGzip(values) is expected


# -- end to end ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def proxy(tmp_path_factory):
    from tests.support import ProxyProcess

    p = ProxyProcess(
        tmp_path_factory.mktemp("metricsencoding"),
        LOOPBACK_INI + "\n[mitm]\nenabled = on\n",
    ).start()
    yield p
    p.stop()


def test_badOpenMetricsVersionIsServedAsText(proxy):
    for accept in ("application/openmetrics-text; version=a", "text/plain; version=b"):
        status, headers, body = exchange(proxy, request("GET", "/metrics", f"Accept: {accept}"))
        assert status == 200, body
        assert headers["content-type"] == TEXT_TYPE
        assert b"proxygate_requests_total" in body
    assert "Traceback" not in proxy.log()


def test_gzipWhenAccepted(proxy):
    status, headers, body = exchange(proxy, request("GET", "/metrics", "Accept-Encoding: gzip"))
    assert status == 200
    assert headers["content-encoding"] == "gzip"
    assert headers["vary"] == "Accept-Encoding"
    text = gzip.decompress(body)
    assert b"proxygate_client_connections" in text
    assert len(body) < len(text) / 3

    status, headers, plain = exchange(proxy, request("GET", "/metrics"))
    assert "content-encoding" not in headers and headers["vary"] == "Accept-Encoding"
    assert b"proxygate_client_connections" in plain

    status, headers, body = exchange(proxy, request("GET", "/metrics", "Accept-Encoding: gzip;q=0"))
    assert "content-encoding" not in headers


def test_headHasTheCompressedLength(proxy):
    with connect(proxy) as s:
        s.sendall(
            request("HEAD", "/metrics", "Accept-Encoding: gzip")
            + request("GET", "/metrics", "Accept-Encoding: gzip", "Connection: close")
        )
        s.settimeout(5)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    assert b"Content-Encoding: gzip" in head
    length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
    # Metrics may change between the two requests, so the lengths need not match exactly.
    assert rest.startswith(b"HTTP/1.1 200 OK")
    _, _, getBody = rest.partition(b"\r\n\r\n")
    assert abs(len(getBody) - length) < 200
    assert gzip.decompress(getBody)


def test_caIsNotCompressed(proxy):
    status, headers, body = exchange(proxy, request("GET", "/ca.pem", "Accept-Encoding: gzip"))
    assert status == 200 and "content-encoding" not in headers
    assert body.startswith(b"-----BEGIN CERTIFICATE-----")


def test_curlCompressed(proxy):
    result = subprocess.run(
        ["curl", "-sS", "--compressed", "-D", "-", f"http://127.0.0.1:{proxy.metricsPort}/metrics"],
        capture_output=True,
        timeout=10,
        check=True,
    )
    out = result.stdout.replace(b"\r\n", b"\n")
    assert b"content-encoding: gzip" in out.lower()
    assert b"proxygate_requests_total" in out


def test_mergedScrapeIsCompressedToo(startProxy):
    proxy = startProxy(LOOPBACK_INI.replace("[proxy]", "[proxy]\nworkers = 2", 1))
    assert waitFor(lambda: proxy.metric("proxygate_workers") == 2, timeout=15)
    with connect(proxy) as s:
        s.sendall(
            request(
                "GET",
                "/metrics",
                "Accept-Encoding: gzip",
                "Accept: application/openmetrics-text; version=a",
            )
        )
        status, headers, body = readResponse(s)
    assert status == 200 and headers["content-encoding"] == "gzip"
    assert headers["content-type"] == TEXT_TYPE
    assert b"\nproxygate_workers 2.0\n" in gzip.decompress(body)
