"""
Why a request was refused or failed: one fixed vocabulary for the client, the log and the
metrics.

Every refusal or failure is a L{Problem}: a status, a reason *code* from the table below,
and a sentence for people. The code decides everything else once: the RFC 9209
Proxy-Status error type the client sees, the Squid action in the access log, and which
counter goes up. So a 403 for a port, a 407 and a 400 are reported the same way as a 502,
and log tooling can group by a code that never changes wording.
"""

from __future__ import annotations

__all__ = ["CODES", "Problem", "problemForStatus"]

#: code -> (Proxy-Status error type, Squid action, (counter, label) or None).
#: Counters: "denied" is proxygate_denied_total{reason}, "upstream" is
#: proxygate_upstream_errors_total{reason}.
CODES: dict[str, tuple[str, str, tuple[str, str] | None]] = {
    # refused before forwarding
    "client": ("http_request_denied", "TCP_DENIED", ("denied", "client")),
    "auth": ("http_request_denied", "TCP_DENIED", ("denied", "auth")),
    "port": ("http_request_denied", "TCP_DENIED", ("denied", "port")),
    "destination": ("http_request_denied", "TCP_DENIED", ("denied", "destination")),
    # the same, found on the address resolved for dialling (the name passed)
    "destination_ip": ("destination_ip_prohibited", "TCP_DENIED", ("denied", "destination")),
    "limit": ("connection_limit_reached", "TCP_DENIED", ("denied", "limit")),
    "header_too_large": ("http_request_error", "TAG_NONE", ("denied", "limit")),
    "header_timeout": ("http_request_error", "TAG_NONE", ("denied", "limit")),
    "idle": ("http_request_error", "TAG_NONE", ("denied", "limit")),
    "bad_request": ("http_request_error", "TAG_NONE", None),
    "not_implemented": ("http_request_error", "TAG_NONE", None),
    "version": ("http_request_error", "TAG_NONE", None),
    "too_large": ("http_request_error", "TAG_NONE", None),
    "not_a_proxy_request": ("http_request_error", "TAG_NONE", None),
    "method": ("http_request_denied", "TCP_DENIED", None),
    "max_forwards": ("proxy_internal_response", "TAG_NONE", None),
    # the inbound gateway's own answers
    "no_route": ("destination_not_found", "TAG_NONE", None),
    "redirect": ("proxy_internal_response", "TCP_REDIRECT", None),
    "unauthorized": ("http_request_denied", "TCP_DENIED", ("denied", "auth")),
    "unavailable": ("destination_unavailable", "TCP_MISS", None),
    "proxy_request": ("http_request_denied", "TCP_DENIED", None),
    # reaching or talking to the next hop
    "dns": ("dns_error", "TCP_MISS", ("upstream", "dns")),
    "refused": ("connection_refused", "TCP_MISS", ("upstream", "refused")),
    "timeout": ("connection_timeout", "TCP_MISS", ("upstream", "timeout")),
    "tls": ("tls_certificate_error", "TCP_MISS", ("upstream", "tls")),
    "upstream_refused": ("connection_refused", "TCP_MISS", ("upstream", "refused")),
    "incomplete": ("http_response_incomplete", "TCP_MISS", ("upstream", "reset")),
    # an HTTP/2 origin refused a stream it never processed (REFUSED_STREAM, GOAWAY): retried
    "stream_refused": ("destination_unavailable", "TCP_MISS", ("upstream", "reset")),
    "protocol": ("http_protocol_error", "TCP_MISS", ("upstream", "reset")),
    "internal": ("proxy_internal_error", "TCP_MISS", None),
    # endings without an answer
    "client_gone": ("connection_terminated", "TCP_MISS_ABORTED", None),
    "client_tls": ("tls_alert_received", "TCP_TUNNEL", None),
}


class Problem:
    """
    A refusal or a failure, as the client, the log and the metrics see it.

    @ivar status: what the client gets (0: nothing can be sent any more).
    @ivar code: the reason code (a key of L{CODES}).
    @ivar detail: one sentence saying what happened and, where it helps, what to do.
    """

    __slots__ = ("code", "detail", "status")

    def __init__(self, status: int, code: str, detail: str) -> None:
        if code not in CODES:
            raise ValueError(f"unknown problem code {code!r}")
        self.status = status
        self.code = code
        self.detail = detail

    @property
    def proxyStatus(self) -> str:
        """The RFC 9209 error type for the Proxy-Status field."""
        return CODES[self.code][0]

    @property
    def action(self) -> str:
        """The Squid result code of the access log line."""
        return CODES[self.code][1]

    def count(self, metrics) -> None:
        """Increment the counter this problem belongs to, if any."""
        counter = CODES[self.code][2]
        if counter is not None:
            name, label = counter
            family = metrics.denied if name == "denied" else metrics.upstreamErrors
            family.labels(label).inc()

    def __repr__(self) -> str:
        return f"<Problem {self.status} {self.code}: {self.detail}>"


_BY_STATUS = {
    400: "bad_request",
    405: "method",
    413: "too_large",
    414: "bad_request",
    417: "bad_request",
    431: "header_too_large",
    501: "not_implemented",
    502: "protocol",
    505: "version",
}


def problemForStatus(status: int, reason: str) -> Problem:
    """
    A parser's refusal (L{gateway.http1.parse.HTTPError}: a status and a reason phrase in
    lower case) as a problem: the code by status, the reason as a sentence.
    """
    sentence = reason[:1].upper() + reason[1:]
    if not sentence.endswith("."):
        sentence += "."
    return Problem(status, _BY_STATUS.get(status, "bad_request"), sentence)
