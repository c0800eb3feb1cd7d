"""
The proxy's own answers: a short text body that says what happened and what to do, with an
RFC 9209 Proxy-Status field that names the error for machines.

Built only from proxy-owned text and validated values (host names that passed the authority
parser, numbers): never a header the client sent (Squid CVE-2025-62168 echoed credentials in
its error pages). Wire-neutral: each downstream side writes it in its own framing.
"""

from __future__ import annotations

from ..http1.headers import httpDate
from ..message import NO_BODY, REASONS, Fields, Response
from .problems import Problem

__all__ = ["answer"]

_TEXT = b"text/plain; charset=utf-8"


def answer(
    problem: Problem, head: bool = False, extraFields: Fields = ()
) -> tuple[Response, bytes]:
    """
    The response and body for C{problem}.

    @param head: the request was HEAD: no body follows, its length is still stated.
    @param extraFields: more fields (Proxy-Authenticate, Allow, Retry-After).
    """
    status = problem.status
    body = problem.detail.encode("utf-8", "replace") + b"\n"
    fields = [
        (b"Date", httpDate()),
        (b"Content-Type", _TEXT),
        (b"Cache-Control", b"no-store"),
    ]
    if problem.proxyStatus != "proxy_internal_response":
        # Not an error (a Max-Forwards answer, a redirect): nothing to report.
        fields.append((b"Proxy-Status", b"proxygate; error=" + problem.proxyStatus.encode()))
    fields.extend(extraFields)
    reason = REASONS.get(status, b"Error")
    if head:
        return Response(status, reason, b"HTTP/1.1", fields, NO_BODY, b"%d" % len(body), _TEXT), b""
    return Response(status, reason, b"HTTP/1.1", fields, len(body), None, _TEXT), body
