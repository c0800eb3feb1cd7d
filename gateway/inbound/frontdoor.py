# -*- test-case-name: tests.test_reverse_h2 -*-
"""
The decisions the inbound gateway's front door takes for a request, whatever wire it came
over (HTTP/1.1: L{gateway.proxy.reverse}, HTTP/2: L{gateway.proxy.reverseh2}): which route
serves it, or which answer the gateway gives itself instead (404, the slash redirect, 401,
413 before any backend is dialled, 503 with Retry-After when every backend is down).

Pure: each wire adapter reads its head, asks here, and writes the answer in its own framing;
so the two doors cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Callable

from attrs import frozen

from ..exchange.problems import Problem
from ..message import Fields
from .balance import Pick
from .routes import Redirect, Routed, hostKey

__all__ = ["ALLOW", "NOT_A_PROXY", "Local", "admit", "backendFields", "loginRequired", "routeOf"]

NOT_A_PROXY = (
    "This is the inbound gateway of proxygate: it serves its routes, and is not a forward "
    "proxy. Use proxygate's proxy listener as your http_proxy instead."
)
ALLOW = [(b"Allow", b"GET, HEAD, POST, PUT, DELETE, OPTIONS, PATCH")]


@frozen
class Local:
    """
    The gateway's own answer to a request.

    @ivar fields: fields the answer carries besides the usual (Location, WWW-Authenticate,
        Retry-After).
    @ivar routed: the route the request matched, if one did: it is recorded as the route's.
    @ivar close: the body was not read: an HTTP/1.1 connection cannot carry another request.
    """

    problem: Problem
    fields: Fields = ()
    routed: Routed | None = None
    close: bool = False


def routeOf(
    inbound, method: bytes, authority: bytes, target: bytes, absolute: bool, final: int | None
) -> Routed | Local:
    """
    The route for a request to C{authority} for C{target} (origin form), or the answer.

    @param absolute: the request named its host in absolute form (HTTP/1.1): only a host a
        route names is served so, any other is a forward-proxy request (400).
    @param final: the status a Max-Forwards of 0 makes the gateway answer (None: forward).
    @raise HTTPError: 400 for a path that has no normal form.
    """
    if absolute and not inbound.namesHost(hostKey(authority)):
        return Local(Problem(400, "proxy_request", NOT_A_PROXY))
    if final is not None:
        return Local(Problem(final, "max_forwards", "Max-Forwards reached zero at proxygate."))
    result = inbound.match(authority, target)
    if type(result) is Routed:
        return result
    if isinstance(result, Redirect):
        location = result.location
        return Local(
            Problem(
                result.status(method),
                "redirect",
                f"This is served under {location.decode('ascii', 'replace')}.",
            ),
            [(b"Location", location)],
        )
    return Local(Problem(404, "no_route", "No route of this gateway serves this URL."))


def loginRequired(users, routed: Routed) -> Local:
    """The 401 of a route with C{auth = on} to a request without good credentials."""
    return Local(
        Problem(
            401, "unauthorized", "This page needs you to log in: send your user name and password."
        ),
        [(b"WWW-Authenticate", users.challenge())],
        routed,
    )


def admit(routed: Routed, length: int | None, values: Callable[[bytes], list]) -> Pick | Local:
    """
    The backend for a routed request whose body states C{length} bytes (None: not stated),
    and whose fields' values by name are C{values(name)} (a sticky route reads Cookie): a
    body over the route's limit is refused before any backend is dialled (the body is not
    read), and a route whose backends are all down answers 503 with Retry-After.
    """
    route = routed.route
    if length is not None and route.bodyTooLarge(length):
        problem = Problem(
            413,
            "too_large",
            f"The request body ({length} bytes) is larger than route {route.name} "
            f"accepts ({route.config.max_body_size} bytes).",
        )
        return Local(problem, (), routed, True)
    pool = route.pool
    pick = pool.pick(values(b"cookie") if pool.balance == "sticky" else ())
    if pick is None:
        problem = Problem(
            503, "unavailable", f"Every backend of route {route.name} is down: retry later."
        )
        return Local(problem, [(b"Retry-After", b"%d" % pool.retryAfter())], routed)
    return pick


def backendFields(
    routed: Routed, fields: Fields, client, scheme: str, authority: bytes, user: str | None
) -> Fields:
    """
    The fields a routed request takes to its backend, whichever door it came in by: the
    route's rewriting (forwarding and identity fields, the prefix, static fields) of the
    client's C{fields}.
    """
    return routed.route.requests.fields(
        fields,
        client=client,
        scheme=scheme,
        authority=authority,
        prefix=routed.prefix,
        stripped=routed.stripped,
        publicTarget=routed.publicTarget,
        user=user,
    )
