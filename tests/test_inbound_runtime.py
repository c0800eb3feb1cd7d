"""The inbound gateway of a configuration: routes, pools, rewriters, secret, reload, metrics."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest

from gateway.config import parseConfig
from gateway.http1.parse import HTTPError
from gateway.inbound.health import HealthChecker
from gateway.inbound.routes import Redirect, Routed
from gateway.inbound.runtime import Inbound, settleStickySecret
from gateway.metrics import Metrics

INI = """
[reverse]
listen = tcp:0:interface=127.0.0.1
{secret}

[auth]
htpasswd = users

[route rstudio]
match = /rstudio/
backends = http://127.0.0.1:8787 http://127.0.0.1:8788
balance = sticky
health_check = /health
max_body_size = 1K
auth = on
user_header = X-RStudio-Username
request_headers = X-RStudio-Root-Path: {{prefix}}

[route jupyter]
match = jupyter.example.com
backends = http://127.0.0.1:8888
strip_prefix = off
"""


def config(secret: str = "sticky_secret = s3cret"):
    return parseConfig(INI.format(secret=secret), "/etc/pg/gw.ini")


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def test_routesWithTheirPoolsAndRewriters() -> None:
    inbound = Inbound(config(), Clock())
    result = inbound.match(b"gw.example", b"/rstudio/x?y")
    assert isinstance(result, Routed)
    route = result.route
    assert route is inbound.byName["rstudio"]
    assert [b.url.url for b in route.pool.backends] == [
        "http://127.0.0.1:8787",
        "http://127.0.0.1:8788",
    ]
    pick = route.pool.pick()
    fields = route.requests.fields(
        [(b"X-RStudio-Username", b"root")],
        client="192.0.2.1",
        scheme="http",
        authority=b"gw.example",
        prefix=result.prefix,
        stripped=result.stripped,
        publicTarget=result.publicTarget,
        user="alice",
    )
    assert (b"X-RStudio-Username", b"alice") in fields
    assert (b"X-RStudio-Root-Path", b"/rstudio") in fields
    assert (b"X-RStudio-Username", b"root") not in fields
    out = route.responses.fields(
        [(b"Location", b"http://127.0.0.1:8788/x")],
        scheme="http",
        authority=b"gw.example",
        prefix=result.stripped or b"",
        setCookie=route.pool.setCookie(pick, result.prefix, secure=False),
    )
    assert out[0] == (b"Location", b"http://gw.example/rstudio/x")
    assert out[1][1].startswith(b"proxygate_rstudio=")
    assert inbound.match(b"gw.example", b"/rstudio") == Redirect(b"/rstudio/")
    assert inbound.match(b"jupyter.example.com", b"/hub/").route.name == "jupyter"
    assert inbound.match(b"gw.example", b"/other") is None


def test_bodyLimit() -> None:
    inbound = Inbound(config(), Clock())
    assert not inbound.byName["rstudio"].bodyTooLarge(1024)
    assert inbound.byName["rstudio"].bodyTooLarge(1025)
    assert not inbound.byName["jupyter"].bodyTooLarge(1 << 40)  # 0: unlimited


def test_stickySecretSettledOncePerConfiguration() -> None:
    with pytest.raises(ValueError, match="settle the sticky secret"):
        Inbound(config(""), Clock())
    first = settleStickySecret(config(""))
    assert len(first.reverse.sticky_secret) == 32
    assert settleStickySecret(config("")).reverse.sticky_secret != first.reverse.sticky_secret
    reloaded = settleStickySecret(config(""), running=first)
    assert reloaded.reverse.sticky_secret == first.reverse.sticky_secret
    assert settleStickySecret(config()).reverse.sticky_secret == "s3cret"
    # the same secret gives the same cookies in every process (workers, restarts)
    a, b = Inbound(first, Clock()), Inbound(reloaded, Clock())
    ids = lambda i: [x.id for x in i.byName["rstudio"].pool.backends]  # noqa: E731
    assert ids(a) == ids(b)
    assert ids(Inbound(config(), Clock())) != ids(a)


def test_reloadKeepsBackendStates() -> None:
    clock = Clock()
    old = Inbound(config(), clock)
    pool = old.byName["rstudio"].pool
    pool.checked(pool.backends[1], False)
    pool.checked(pool.backends[1], False)
    new = Inbound(config(), clock, previous=old)
    assert [b.up for b in new.byName["rstudio"].pool.backends] == [True, False]


def test_healthCheckerCoversCheckedRoutes() -> None:
    checker = Inbound(config(), Clock()).healthChecker(reactor=object())
    assert isinstance(checker, HealthChecker)
    assert [c.backend.url.url for c in checker.checks] == [
        "http://127.0.0.1:8787",
        "http://127.0.0.1:8788",
    ]


def test_watchExportsEveryBackendAndForgetsRemovedRoutes() -> None:
    metrics = Metrics()
    old = Inbound(config(), Clock())
    old.watch(metrics)
    text = generate_latest(metrics.registry).decode()
    assert 'proxygate_backend_up{backend="http://127.0.0.1:8888",route="jupyter"} 1.0' in text
    smaller = parseConfig(
        "[reverse]\nsticky_secret = x\n[route rstudio]\nmatch = /r/\nbackends = http://b\n"
    )
    Inbound(smaller, Clock()).watch(metrics, previous=old)
    text = generate_latest(metrics.registry).decode()
    assert 'route="jupyter"' not in text
    assert 'proxygate_backend_up{backend="http://b",route="rstudio"} 1.0' in text


def test_matchesAreRememberedWithinBounds() -> None:
    from gateway.inbound.runtime import MEMO_LENGTH, MEMO_SIZE

    inbound = Inbound(config(), Clock())
    first = inbound.match(b"gw", b"/rstudio/x")
    assert inbound.match(b"gw", b"/rstudio/x") is first  # remembered
    long = b"/rstudio/" + b"a" * MEMO_LENGTH
    assert inbound.match(b"gw", long).route.name == "rstudio"
    assert (b"gw", long) not in inbound._memo  # too long to keep
    for i in range(MEMO_SIZE + 10):
        inbound.match(b"gw", b"/rstudio/%d" % i)
    assert len(inbound._memo) <= MEMO_SIZE
    with pytest.raises(HTTPError):
        inbound.match(b"gw", b"/rstudio/../etc")
    assert (b"gw", b"/rstudio/../etc") not in inbound._memo
