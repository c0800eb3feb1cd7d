"""
Responses the proxy makes itself: short text bodies that say what happened and what to do,
with an RFC 9209 Proxy-Status field that names the error for machines.

They are built only from proxy-owned text and validated values (host names that passed the
authority parser, numbers): never a header the client sent (Squid CVE-2025-62168 echoed
credentials in its error pages).
"""

from __future__ import annotations

from ..http1.headers import httpDate

__all__ = ["REASONS", "errorResponse"]

REASONS = {
    200: b"OK",
    400: b"Bad Request",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    407: b"Proxy Authentication Required",
    408: b"Request Timeout",
    413: b"Content Too Large",
    414: b"URI Too Long",
    417: b"Expectation Failed",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
    505: b"HTTP Version Not Supported",
}


def errorResponse(
    status: int,
    message: str,
    *,
    close: bool = True,
    proxyStatus: str | None = None,
    extraHeaders: tuple[tuple[bytes, bytes], ...] = (),
    head: bool = False,
) -> bytes:
    """
    A complete proxy-made response.

    @param proxyStatus: the RFC 9209 error type (e.g. C{dns_error}), if the response
        reports a failure to reach the next hop.
    @param head: the request was HEAD, so the body is left out (its length still stated).
    """
    body = message.encode("utf-8", "replace") + b"\n"
    lines = [
        b"HTTP/1.1 %d %s\r\n" % (status, REASONS.get(status, b"Error")),
        b"Date: %s\r\n" % httpDate(),
        b"Content-Type: text/plain; charset=utf-8\r\n",
        b"Content-Length: %d\r\n" % len(body),
        b"Cache-Control: no-store\r\n",
    ]
    if proxyStatus is not None:
        lines.append(b"Proxy-Status: proxygate; error=%s\r\n" % proxyStatus.encode("ascii"))
    for name, value in extraHeaders:
        lines.append(name + b": " + value + b"\r\n")
    if close:
        lines.append(b"Connection: close\r\n")
    lines.append(b"\r\n")
    if not head:
        lines.append(body)
    return b"".join(lines)
