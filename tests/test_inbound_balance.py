"""Backend pools: balance methods, stickiness, up/down state, failover, Retry-After."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.inbound.balance import (
    Pool,
    mayRetry,
    parseBackendURL,
    stickyId,
)

URLS = ["http://127.0.0.1:8001", "http://127.0.0.1:8002", "http://127.0.0.1:8003"]
SECRET = b"test secret"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def pool(balance: str = "round_robin", urls=URLS, clock=None, **kwargs) -> Pool:
    return Pool(
        "app",
        [parseBackendURL(u) for u in urls],
        balance,
        SECRET,
        clock=clock or Clock(),
        **kwargs,
    )


def picked(p: Pool, n: int, **kwargs) -> list[str]:
    out = []
    for _ in range(n):
        pick = p.pick(**kwargs)
        assert pick is not None
        out.append(pick.backend.url.url[-4:])
    return out


# -- round robin and least_conn ----------------------------------------------------------------


def test_roundRobinCycles() -> None:
    assert picked(pool(), 7) == ["8001", "8002", "8003", "8001", "8002", "8003", "8001"]


def test_roundRobinSkipsDownBackends() -> None:
    p = pool()
    p.connectFailed(p.backends[1])
    assert picked(p, 4) == ["8001", "8003", "8001", "8003"]


def test_leastConnPicksFewestInFlight() -> None:
    p = pool("least_conn")
    a, b, c = p.backends
    p.acquire(a)
    p.acquire(a)
    p.acquire(b)
    assert p.pick().backend is c
    p.acquire(c)
    p.acquire(c)
    assert p.pick().backend is b
    p.release(a)
    p.release(a)
    assert p.pick().backend is a


def test_leastConnSpreadsTies() -> None:
    p = pool("least_conn")
    assert Counter(picked(p, 300)) == {"8001": 100, "8002": 100, "8003": 100}


def test_leastConnCountsLongSessions() -> None:
    """A WebSocket that stays open keeps its backend busy: new sessions go elsewhere."""
    p = pool("least_conn", urls=URLS[:2])
    first = p.pick().backend
    p.acquire(first)  # a long-lived WebSocket
    for _ in range(5):
        other = p.pick().backend
        assert other is not first
        p.acquire(other)
        p.release(other)


# -- sticky ------------------------------------------------------------------------------------


def cookieOf(setCookie: bytes) -> bytes:
    return setCookie.split(b";")[0]


def test_stickyPinsAndFollows() -> None:
    p = pool("sticky")
    first = p.pick()
    assert first.setCookie is not None
    cookie = cookieOf(first.setCookie)
    assert cookie.startswith(b"proxygate_app=")
    for _ in range(5):
        again = p.pick([b"other=1; " + cookie + b"; x=y"])
        assert again.backend is first.backend
        assert again.setCookie is None


def test_stickyNewClientsAreBalanced() -> None:
    p = pool("sticky")
    assert Counter(p.pick().backend.url.url for _ in range(30)) == dict.fromkeys(URLS, 10)


def test_stickyRepinsWhenTheBackendIsDown() -> None:
    clock = Clock()
    p = pool("sticky", clock=clock)
    first = p.pick()
    cookie = cookieOf(first.setCookie)
    p.connectFailed(first.backend)
    moved = p.pick([cookie])
    assert moved.backend is not first.backend
    assert moved.setCookie is not None and cookieOf(moved.setCookie) != cookie
    # the new pin holds, also after the old backend comes back
    clock.now += 10
    again = p.pick([cookieOf(moved.setCookie)])
    assert again.backend is moved.backend and again.setCookie is None


def test_stickyUnknownOrForgedCookieRepins() -> None:
    p = pool("sticky")
    for value in (b"proxygate_app=0000000000000000", b"proxygate_app=", b"proxygate_app"):
        pick = p.pick([value])
        assert pick.setCookie is not None


def test_stickyCookieOfAnotherRouteIsIgnored() -> None:
    p = pool("sticky")
    other = Pool("other", [b.url for b in p.backends], "sticky", SECRET, clock=Clock())
    cookie = cookieOf(other.pick().setCookie)
    assert p.pick([cookie]).setCookie is not None


def test_stickyIdIsOpaque() -> None:
    p = pool("sticky")
    ids = {b.id for b in p.backends}
    assert len(ids) == 3
    for backend in p.backends:
        assert len(backend.id) == 16
        assert "127" not in backend.id and "800" not in backend.id
    # keyed: another secret, another id; same secret, same id (workers, restarts)
    assert stickyId(b"other", "app", URLS[0]) != p.backends[0].id
    assert stickyId(SECRET, "app", URLS[0]) == p.backends[0].id
    assert stickyId(SECRET, "app2", URLS[0]) != p.backends[0].id


def test_setCookieAttributes() -> None:
    p = pool("sticky")
    pick = p.pick()
    value = p.setCookie(pick, b"/rstudio", secure=False)
    assert value == cookieOf(pick.setCookie) + b"; Path=/rstudio; HttpOnly; SameSite=Lax"
    assert p.setCookie(pick, b"", secure=True).endswith(b"; Path=/; HttpOnly; SameSite=Lax; Secure")
    pinned = p.pick([cookieOf(pick.setCookie)])
    assert p.setCookie(pinned, b"/", secure=True) is None


# -- state -------------------------------------------------------------------------------------


def test_activeChecksTwoFailuresDownTwoPassesUp() -> None:
    p = pool(activeChecks=True)
    b = p.backends[0]
    assert p.checked(b, False) is False and b.up
    assert p.checked(b, True) is False and b.up  # a pass resets the failures
    assert p.checked(b, False) is False and b.up
    assert p.checked(b, False) is True and not b.up
    assert p.checked(b, False) is False and not b.up
    assert p.checked(b, True) is False and not b.up
    assert p.checked(b, False) is False and not b.up  # a failure resets the passes
    assert p.checked(b, True) is False and not b.up
    assert p.checked(b, True) is True and b.up


def test_passiveMarkingWithActiveChecksWaitsForTwoPasses() -> None:
    clock = Clock()
    p = pool(activeChecks=True, clock=clock)
    b = p.backends[0]
    p.connectFailed(b)
    clock.now += 3600
    assert not p.available(b)
    p.checked(b, True)
    assert not p.available(b)
    p.checked(b, True)
    assert p.available(b)


def test_passiveMarkingWithoutChecksRetriesAfterTheInterval() -> None:
    clock = Clock()
    p = pool(interval=5, clock=clock)
    b = p.backends[0]
    p.connectFailed(b)
    assert not p.available(b)
    clock.now += 4.9
    assert not p.available(b)
    clock.now += 0.1
    assert p.available(b) and b.up


def test_allDownIsNoneWithRetryAfter() -> None:
    clock = Clock()
    p = pool(interval=5, clock=clock)
    for b in p.backends:
        p.connectFailed(b)
        clock.now += 1
    assert p.pick() is None
    assert p.retryAfter() == 2  # the first one is retried 5 s after its failure, at +5
    clock.now += 2.5
    assert p.retryAfter() == 1
    active = pool(activeChecks=True, interval=5)
    for b in active.backends:
        active.checked(b, False)
        active.checked(b, False)
    assert active.pick() is None
    assert active.retryAfter() == 10


# -- failover ----------------------------------------------------------------------------------


def test_failoverTriesEachHealthyBackendOnce() -> None:
    p = pool()
    first = p.pick().backend
    tried = [first]
    second = p.failover(first, b"GET", False, tried)
    assert second is not None and second is not first and not first.up
    tried.append(second)
    third = p.failover(second, b"GET", False, tried)
    assert third is not None and third not in tried
    tried.append(third)
    assert p.failover(third, b"GET", False, tried) is None
    assert all(not b.up for b in p.backends)


def test_failoverSkipsBackendsAlreadyDown() -> None:
    p = pool()
    a, b, c = p.backends
    p.connectFailed(c)
    assert p.failover(a, b"GET", False, [a]) is b
    assert p.failover(b, b"GET", False, [a, b]) is None


@pytest.mark.parametrize(
    ("method", "bodySent", "retried"),
    [
        (b"GET", False, True),
        (b"HEAD", False, True),
        (b"PUT", False, True),
        (b"DELETE", False, True),
        (b"OPTIONS", False, True),
        (b"PUT", True, False),
        (b"POST", False, False),
        (b"PATCH", False, False),
        (b"CONNECT", False, False),
    ],
)
def test_failoverOnlyForIdempotentRequestsWithoutBodySent(
    method: bytes, bodySent: bool, retried: bool
) -> None:
    assert mayRetry(method, bodySent) is retried
    p = pool()
    first = p.pick().backend
    assert (p.failover(first, method, bodySent, [first]) is not None) is retried
    assert not first.up  # marked down whatever happens to the request


def test_stickyFailoverRepins() -> None:
    p = pool("sticky")
    first = p.pick()
    cookie = cookieOf(first.setCookie)
    nextBackend = p.failover(first.backend, b"GET", False, [first.backend])
    assert nextBackend is not None
    later = p.pick([cookie])
    assert later.backend is not first.backend and later.setCookie is not None


# -- properties --------------------------------------------------------------------------------

_event = st.one_of(
    st.tuples(st.just("pick"), st.sampled_from(["round_robin", "least_conn", "sticky"])),
    st.tuples(st.just("fail"), st.integers(0, 2)),
    st.tuples(st.just("check"), st.integers(0, 2), st.booleans()),
    st.tuples(st.just("wait"), st.floats(0, 10)),
)


@given(st.sampled_from(["round_robin", "least_conn", "sticky"]), st.booleans(), st.lists(_event))
def test_pickNeverReturnsAnUnavailableBackend(balance: str, active: bool, events) -> None:
    clock = Clock()
    p = pool(balance, clock=clock, activeChecks=active)
    cookies: list[bytes] = []
    for event in events:
        if event[0] == "pick":
            pick = p.pick(cookies)
            available = [b for b in p.backends if p.available(b)]
            if pick is None:
                assert not available
            else:
                assert pick.backend in available
                if pick.setCookie:
                    cookies = [cookieOf(pick.setCookie)]
        elif event[0] == "fail":
            p.connectFailed(p.backends[event[1]])
        elif event[0] == "check":
            p.checked(p.backends[event[1]], event[2])
        else:
            clock.now += event[1]


def test_backendURLs() -> None:
    b = parseBackendURL("https://[::1]:8443/")
    assert (b.scheme, b.host, b.port, b.authority, b.origin) == (
        "https", "::1", 8443, "[::1]:8443", "https://[::1]:8443"
    )  # fmt: skip
    assert parseBackendURL("http://Rstudio.Internal").authority == "rstudio.internal"
    assert parseBackendURL("HTTPS://h").port == 443
