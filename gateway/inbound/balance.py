# -*- test-case-name: tests.test_inbound_balance -*-
"""
The backends of a route and which one gets a request: up/down state, the three balance
methods, stickiness, and the failover decision. Pure: time comes from an injected clock.

State of a backend:

- It starts up (as Traefik's and nginx's do: the first health checks confirm it).
- Active checks (C{health_check} set): two consecutive failures mark it down, two
  consecutive passes mark it up (L{Pool.checked}).
- Passive marking (L{Pool.connectFailed}): a connect failure (refused, timed out, TLS
  failure) marks it down at once. With active checks it then needs two passes to come
  back; without, it is tried again C{health_interval} seconds later (nginx's
  C{fail_timeout}).

Stickiness (C{balance = sticky}): the gateway sets the cookie C{proxygate_<route>} to an
opaque id of the backend, an HMAC-SHA256 (64 bits shown) of the route name and backend URL
under a secret, so the cookie never reveals an internal address, not even to someone who
could guess candidate addresses and hash them. A client's cookie is followed while its
backend is up; when it is down (or the cookie is unknown, e.g. after the backend list
changed) the request is balanced round-robin and the cookie is set again: the client is
re-pinned.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
from collections.abc import Callable, Collection, Sequence
from urllib.parse import urlsplit

from attrs import frozen

from ..message import bracketed
from ..policy import parseIP

__all__ = [
    "BALANCE_METHODS",
    "IDEMPOTENT",
    "Backend",
    "BackendURL",
    "Pick",
    "Pool",
    "mayRetry",
    "parseBackendURL",
]

BALANCE_METHODS = ("round_robin", "least_conn", "sticky")

#: RFC 9110 §9.2.2: a request the gateway may send again after a connect failure.
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})

_DEFAULT_PORTS = {"http": 80, "https": 443}
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")


@frozen
class BackendURL:
    """
    A backend as the INI names it.

    @ivar url: the URL as written (the C{backend} label of the metrics).
    @ivar scheme: C{"http"} or C{"https"}.
    @ivar host: a name (lower case) or an IP address (IPv6 without brackets).
    @ivar authority: C{host[:port]} as a Host field would say it (brackets for IPv6, no
        default port), for the health checks and to recognise the backend in a Location.
    """

    url: str
    scheme: str
    host: str
    port: int

    @property
    def authority(self) -> str:
        host = bracketed(self.host)
        return host if self.port == _DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"

    @property
    def origin(self) -> str:
        """C{scheme://authority}: how the backend would spell its own absolute URLs."""
        return f"{self.scheme}://{self.authority}"


def parseBackendURL(text: str) -> BackendURL:
    """
    Read one C{backends} URL: C{http://} or C{https://}, a host, an optional port, no path
    (other than C{/}), query, fragment or user information.

    @raise ValueError: with a one-line problem (the URL is quoted: backends hold no secret).
    """
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as e:
        raise ValueError(f"invalid backend URL {text!r}: {e}") from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.netloc:
        raise ValueError(f"invalid backend URL {text!r}: use http://host[:port] or https://...")
    if parts.username is not None or "@" in parts.netloc:
        raise ValueError(f"invalid backend URL {text!r}: no user information in a backend URL")
    if parts.path not in ("", "/") or parts.query or parts.fragment or text.endswith(("?", "#")):
        raise ValueError(
            f"invalid backend URL {text!r}: no path, query or fragment "
            "(the backend gets the request's path; see strip_prefix)"
        )
    host = parts.hostname or ""
    address = parseIP(host) if host.startswith("[") or ":" in host or host[:1].isdigit() else None
    if address is not None:
        host = str(address)
    elif not host or not all(_LABEL.fullmatch(label) for label in host.rstrip(".").split(".")):
        raise ValueError(f"invalid backend URL {text!r}: invalid host")
    if port == 0:
        raise ValueError(f"invalid backend URL {text!r}: port 0")
    return BackendURL(text, scheme, host, port if port is not None else _DEFAULT_PORTS[scheme])


class Backend:
    """One backend of a pool and its state; only its L{Pool} changes it."""

    __slots__ = ("downUntil", "fails", "id", "inflight", "passes", "up", "url")

    def __init__(self, url: BackendURL, id: str) -> None:
        self.url = url
        self.id = id  # the opaque sticky-cookie value
        self.up = True
        self.downUntil = 0.0  # passive marking without active checks: retried from then on
        self.fails = 0  # consecutive failed health checks
        self.passes = 0  # consecutive passed health checks
        self.inflight = 0  # requests and WebSockets using it now (least_conn)

    def __repr__(self) -> str:
        return f"<Backend {self.url.url} {'up' if self.up else 'down'} inflight={self.inflight}>"


class Pick:
    """
    The backend for one request, and the C{Set-Cookie} value the response must carry (a
    sticky route pinning, or re-pinning, its client), or None.
    """

    __slots__ = ("backend", "setCookie")

    def __init__(self, backend: Backend, setCookie: bytes | None = None) -> None:
        self.backend = backend
        self.setCookie = setCookie

    def __repr__(self) -> str:
        return f"<Pick {self.backend.url.url} setCookie={self.setCookie!r}>"


def mayRetry(method: bytes, bodySent: bool) -> bool:
    """May a request that could not reach its backend go to another one?"""
    return method in IDEMPOTENT and not bodySent


class Pool:
    """
    The backends of one route.

    @param route: the route's name (the cookie is C{proxygate_<route>}).
    @param urls: the backends, in INI order.
    @param balance: one of L{BALANCE_METHODS}.
    @param secret: the HMAC key of the sticky ids.
    @param interval: C{health_interval}: the re-try delay of a passively marked backend.
    @param activeChecks: whether a health checker feeds L{checked}.
    @param clock: seconds, monotonic enough (C{reactor.seconds}).
    """

    def __init__(
        self,
        route: str,
        urls: Sequence[BackendURL],
        balance: str,
        secret: bytes,
        *,
        interval: float = 5.0,
        activeChecks: bool = False,
        clock: Callable[[], float],
    ) -> None:
        if balance not in BALANCE_METHODS:
            raise ValueError(f"unknown balance method {balance!r}")
        if not urls:
            raise ValueError("a pool needs at least one backend")
        self.route = route
        self.balance = balance
        self.interval = interval
        self.activeChecks = activeChecks
        self.clock = clock
        self.backends = [Backend(url, stickyId(secret, route, url.url)) for url in urls]
        self._byId = {b.id: b for b in self.backends}
        self.cookieName = f"proxygate_{route}".encode("ascii")
        self._cookies: dict[tuple[str, bytes, bool], bytes] = {}
        self._next = 0

    # -- state ---------------------------------------------------------------------------

    def available(self, backend: Backend) -> bool:
        """Up, or passively marked down and its re-try time has come (no active checks)."""
        if backend.up:
            return True
        if not self.activeChecks and self.clock() >= backend.downUntil:
            backend.up = True
            return True
        return False

    def connectFailed(self, backend: Backend) -> None:
        """Passive marking: the backend refused, timed out or failed TLS."""
        backend.up = False
        backend.passes = 0
        backend.downUntil = self.clock() + self.interval

    def checked(self, backend: Backend, ok: bool) -> bool:
        """One active health check's result; True when it changed the backend's state."""
        if ok:
            backend.fails = 0
            backend.passes += 1
            if not backend.up and backend.passes >= 2:
                backend.up = True
                return True
        else:
            backend.passes = 0
            backend.fails += 1
            if backend.up and backend.fails >= 2:
                backend.up = False
                return True
        return False

    def acquire(self, backend: Backend) -> None:
        """A request (or WebSocket) starts using C{backend}: least_conn counts it."""
        backend.inflight += 1

    def release(self, backend: Backend) -> None:
        """It is done with it (its response ended, or it failed)."""
        backend.inflight -= 1

    def upStates(self) -> dict[str, Callable[[], bool]]:
        """For L{gateway.metrics.Metrics.watchBackends}: each backend's URL and its state."""
        return {b.url.url: (lambda b=b: self.available(b)) for b in self.backends}

    def retryAfter(self) -> int:
        """
        Seconds for the C{Retry-After} of a 503 when every backend is down: the next passive
        re-try, or two health-check intervals (a backend needs two passes to come back).
        """
        if self.activeChecks:
            return max(1, math.ceil(2 * self.interval))
        now = self.clock()
        return max(1, math.ceil(min(b.downUntil for b in self.backends) - now))

    # -- choosing ------------------------------------------------------------------------

    def pick(self, cookies: Sequence[bytes] = (), tried: Collection[Backend] = ()) -> Pick | None:
        """
        The backend for a request whose C{Cookie} fields are C{cookies}, other than those
        already C{tried}; None when none is available (the caller answers 503).
        """
        if self.balance == "sticky":
            pinned = self._byId.get(self._cookie(cookies) or "")
            if pinned is not None and pinned not in tried and self.available(pinned):
                return Pick(pinned)
            backend = self._roundRobin(tried)
            return None if backend is None else Pick(backend, self._setCookie(backend))
        if self.balance == "least_conn":
            backend = self._leastConn(tried)
        else:
            backend = self._roundRobin(tried)
        return None if backend is None else Pick(backend)

    def failover(
        self, backend: Backend, method: bytes, bodySent: bool, tried: Collection[Backend]
    ) -> Backend | None:
        """
        C{backend} could not be reached: mark it down, and return the next backend to try
        (an idempotent request whose body was not sent, and a backend not yet C{tried}), or
        None: the caller answers 502 (504 for a connect timeout).
        """
        self.connectFailed(backend)
        if not mayRetry(method, bodySent):
            return None
        nextPick = self.pick((), (*tried, backend))
        return None if nextPick is None else nextPick.backend

    def repin(self, backend: Backend) -> Pick:
        """
        The pick of a request that failed over to C{backend}: on a sticky route its client
        is pinned to it (the backend it was pinned to, if any, is down).
        """
        return Pick(backend, self._setCookie(backend) if self.balance == "sticky" else None)

    def _order(self) -> list[Backend]:
        """The backends in round-robin order from the cursor."""
        start = self._next % len(self.backends)
        return self.backends[start:] + self.backends[:start]

    def _advancePast(self, backend: Backend) -> None:
        self._next = self.backends.index(backend) + 1

    def _roundRobin(self, tried: Collection[Backend]) -> Backend | None:
        # Per request: no list built, the cursor's backend first (it is usually up).
        backends = self.backends
        count = len(backends)
        start = self._next % count
        for step in range(count):
            index = (start + step) % count
            backend = backends[index]
            if backend not in tried and (backend.up or self.available(backend)):
                self._next = index + 1
                return backend
        return None

    def _leastConn(self, tried: Collection[Backend]) -> Backend | None:
        best = None
        for backend in self._order():
            if backend in tried or not self.available(backend):
                continue
            if best is None or backend.inflight < best.inflight:
                best = backend
        if best is not None:
            self._advancePast(best)
        return best

    # -- the sticky cookie ---------------------------------------------------------------

    def _cookie(self, cookies: Sequence[bytes]) -> str | None:
        name = self.cookieName
        for header in cookies:
            if name not in header:
                continue
            for pair in header.split(b";"):
                key, eq, value = pair.strip().partition(b"=")
                if eq and key == name:
                    return value.strip(b'"').decode("ascii", "replace")
        return None

    def _setCookie(self, backend: Backend) -> bytes:
        """The cookie without its attributes; L{setCookie} adds them for the response."""
        return self.cookieName + b"=" + backend.id.encode("ascii")

    def setCookie(self, pick: Pick, path: bytes, secure: bool) -> bytes | None:
        """
        The C{Set-Cookie} value for C{pick}'s response, scoped to the route's public
        C{path} (its prefix, or C{/}), HttpOnly, SameSite=Lax, Secure over https; or None
        when the client is already pinned to it.
        """
        if pick.setCookie is None:
            return None
        key = (pick.backend.id, path, secure)
        value = self._cookies.get(key)
        if value is None:
            value = pick.setCookie + b"; Path=" + (path or b"/") + b"; HttpOnly; SameSite=Lax"
            if secure:
                value += b"; Secure"
            self._cookies[key] = value
        return value


def stickyId(secret: bytes, route: str, url: str) -> str:
    """The opaque id of a backend in its route's cookie: 16 hex digits of an HMAC-SHA256."""
    message = route.encode("utf-8") + b"\x00" + url.encode("utf-8")
    return hmac.new(secret, message, hashlib.sha256).hexdigest()[:16]
