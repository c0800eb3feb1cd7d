"""
Where a request goes, decided from its head alone: pure functions over a parsed head, for
every downstream wire (an HTTP/2 stream presents its pseudo-headers as a head too).

- L{forwardTarget}: an absolute-form request to the forward proxy (RFC 9112 §3.2.2).
- L{tunnelTarget}: a request decrypted inside an intercepted tunnel, which only ever
  reaches the tunnel's own origin, whatever its Host says.
- L{gatewayTarget}: a request to the inbound gateway (a reverse listener), which serves
  its routes only.
- L{maxForwards}: TRACE and OPTIONS with Max-Forwards (RFC 9110 §7.6.2).
"""

from __future__ import annotations

from ..http1.headers import Target, bracketed, parseAbsoluteTarget, parseAuthority
from ..http1.parse import HTTPError, RequestHead

__all__ = ["checkHost", "forwardTarget", "gatewayTarget", "maxForwards", "tunnelTarget"]


def checkHost(head: RequestHead) -> None:
    """
    The Host rules every request meets: exactly one Host in HTTP/1.1 (RFC 9112 §3.2), at
    most one otherwise, and a valid value, even though the proxy replaces it with the
    target's authority; an empty one is valid.
    """
    hosts = head.values(b"host")
    if head.version == b"HTTP/1.1" and len(hosts) != 1:
        raise HTTPError(400, "an HTTP/1.1 request needs exactly one Host field")
    if len(hosts) > 1:
        raise HTTPError(400, "more than one Host field")
    if hosts and hosts[0]:
        try:
            parseAuthority(hosts[0], 80)
        except HTTPError:
            raise HTTPError(400, "invalid Host field")


def forwardTarget(head: RequestHead) -> Target:
    """
    The target of an absolute-form request.

    @raise HTTPError: 400 for a bad target or Host.
    """
    checkHost(head)
    target = parseAbsoluteTarget(head.target)
    if head.method == b"OPTIONS" and target.path == b"/" and head.target[-1:] != b"/":
        target.path = b"*"  # RFC 9112 §3.2.4: no path and no query is the server itself
    return target


def tunnelTarget(head: RequestHead, host: str, port: int) -> Target:
    """
    The target of a request inside an intercepted tunnel to C{host}:C{port}: origin form,
    or absolute form naming exactly the tunnel's origin.

    @raise HTTPError: 400 for another origin, a bad Host.
    """
    authority = bracketed(host)
    if port != 443:
        authority += f":{port}"
    path = head.target
    if path[:1] != b"/":
        expected = f"https://{authority}".encode()
        lowered = path.lower()
        if not (
            lowered == expected
            or lowered.startswith(expected + b"/")
            or lowered.startswith(expected + b"?")
        ):
            raise HTTPError(400, "a decrypted tunnel only reaches its own origin")
        path = path[len(expected) :] or b"/"
    checkHost(head)
    return Target("https", host, port, path, authority.encode("ascii"))


def gatewayTarget(head: RequestHead) -> tuple[bytes, bytes, bool]:
    """
    The authority (what the backend gets as Host) and the origin-form target of a request
    to the inbound gateway, and whether it came in absolute form: the gateway serves that
    only for a host a route names, since any other is a forward-proxy request.

    Origin form takes the Host field (empty without one: HTTP/1.0); absolute form
    (C{http://} or C{https://}) its own authority, whatever Host says (RFC 9112 §3.2.2).

    @raise HTTPError: 400 for a bad target or Host.
    """
    checkHost(head)
    target = head.target
    if target[:1] == b"/" or target == b"*":
        hosts = head.values(b"host")
        return (hosts[0] if hosts else b""), target, False
    if target[:8].lower() != b"https://":
        parsed = parseAbsoluteTarget(target)
        return parsed.hostHeader, parsed.path, True
    rest = target[8:]
    parsed = parseAbsoluteTarget(b"http://" + rest)  # the same rules, the port aside
    end = min((i for i in (rest.find(b"/"), rest.find(b"?")) if i >= 0), default=len(rest))
    host, port = parseAuthority(rest[:end], 443)
    authority = bracketed(host) if port == 443 else f"{bracketed(host)}:{port}"
    return authority.encode("ascii"), parsed.path, True


def maxForwards(head: RequestHead) -> int | None:
    """
    For TRACE and OPTIONS with a Max-Forwards of 0, the status the proxy answers with as the
    final recipient (200 for OPTIONS, 405 for TRACE); None to forward.

    @raise HTTPError: 400 unless exactly one 1*DIGIT value.
    """
    method = head.method
    if method != b"TRACE" and method != b"OPTIONS":
        return None
    values = head.values(b"max-forwards")
    if not values:
        return None
    if len(values) != 1 or not values[0].isdigit() or len(values[0]) > 10:
        raise HTTPError(400, "invalid Max-Forwards")
    if int(values[0]):
        return None
    return 200 if method == b"OPTIONS" else 405
