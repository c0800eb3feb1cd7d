"""
What the access log records of one transaction, and its line formats: Squid's native format
(the default: existing log tooling reads it), Apache combined, and JSON. Pure: the exchange
builds records without Twisted; L{gateway.accesslog} emits them.

Lines are built only from validated, proxy-owned values: the URL without its query string
(Squid's strip_query_terms) and never a header value, so credentials cannot leak into logs.
"""

from __future__ import annotations

import json
import time

from attrs import frozen

__all__ = ["FORMATS", "AccessRecord", "hierarchy", "routeHierarchy"]


@frozen
class AccessRecord:
    """One finished transaction, as the log formats need it."""

    start: float  # wall-clock time the request head was complete
    elapsed: float  # seconds
    client: str
    code: int  # 0 when no response was sent
    size: int  # bytes sent to the client
    method: str
    url: str
    user: str | None
    action: str  # Squid result code: TCP_MISS, TCP_TUNNEL, TCP_DENIED, ...
    hierarchy: str  # HIER_DIRECT/ip, HIER_NONE/-
    contentType: str
    mode: str  # forward | tunnel | mitm | reverse | ftp | local
    reason: str | None = None  # why it was refused or failed: a code (exchange/problems.py)
    detail: str | None = None  # the same in a sentence
    version: str = "HTTP/1.1"
    route: str | None = None  # the inbound gateway's route (mode reverse)
    backend: str | None = None  # its backend's URL as in the INI, if one was chosen


def hierarchy(ip: str, viaUpstream: bool) -> str:
    """Squid's hierarchy field: how the request left (direct, through a parent, or not)."""
    if ip == "-":
        return "HIER_NONE/-"
    return f"{'FIRSTUP_PARENT' if viaUpstream else 'HIER_DIRECT'}/{ip}"


def routeHierarchy(route: str, backend: str | None) -> str:
    """
    Squid's hierarchy field of a routed request: C{ROUTE/backend-host:port}, where Squid
    writes C{CODE/peer} (its accelerator logs the cache_peer there), so tools that split the
    field at its first '/' get the route and the backend; C{ROUTE/-} when no backend was
    chosen (every backend down, a redirect, a refusal).
    """
    if backend is None:
        return f"{route}/-"
    authority = backend.partition("://")[2].rstrip("/")
    return f"{route}/{authority or backend}"


def squidLine(r: AccessRecord) -> str:
    return (
        f"{r.start:.3f} {round(r.elapsed * 1000):6d} {r.client} {r.action}/{r.code:03d} "
        f"{r.size} {r.method} {r.url} {r.user or '-'} {r.hierarchy} {r.contentType or '-'}"
    )


def combinedLine(r: AccessRecord) -> str:
    stamp = time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(r.start))
    line = (
        f'{r.client} - {r.user or "-"} [{stamp}] "{r.method} {r.url} {r.version}" '
        f'{r.code} {r.size} "-" "-"'
    )
    if r.route is not None:
        # nginx users append $upstream_addr the same way; combined parsers stop before it.
        line += f" route={r.route} backend={r.backend or '-'}"
    return line


def jsonLine(r: AccessRecord) -> str:
    fields = {
        "time": round(r.start, 3),
        "elapsed_ms": round(r.elapsed * 1000, 3),
        "client": r.client,
        "action": r.action,
        "code": r.code,
        "bytes": r.size,
        "method": r.method,
        "url": r.url,
        "user": r.user,
        "hierarchy": r.hierarchy,
        "content_type": r.contentType or None,
        "mode": r.mode,
        "protocol": r.version,
        "reason": r.reason,
        "detail": r.detail,
    }
    if r.route is not None:
        fields["route"] = r.route
        fields["backend"] = r.backend
    return json.dumps(fields, separators=(",", ":"))


FORMATS = {"squid": squidLine, "combined": combinedLine, "json": jsonLine}
