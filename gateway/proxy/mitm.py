"""
TLS interception: which CONNECT tunnels are decrypted, and the TLS on each leg.

An intercepted tunnel is answered 200 like any other, then the client connection itself
switches to TLS with a certificate minted for the SNI name, and goes on reading HTTP
requests, now in origin form and implicitly `https://<CONNECT host>`. From there it is the
ordinary forward path (pooling, streaming, hop-by-hop rules, access log, WebSocket
upgrades), with a verified TLS connection to the real origin. Routing always uses the
CONNECT target that passed the policy, never a Host header, so a decrypted tunnel cannot be
used to reach anywhere else.

With C{[mitm] http2} the client's ALPN offer (read from its ClientHello) is offered to the
origin, and the client is agreed the origin's choice: L{Interceptor.originOffer},
L{Interceptor.clientProtocol}.
"""

from __future__ import annotations

from collections.abc import Callable

from ..config import MitmConfig
from ..metrics import Metrics
from ..tls.ca import loadOrCreateCA
from ..tls.contexts import HTTP11, agreedProtocol, alpnOffer, clientCreator
from ..tls.hostcontexts import ServerContextCache
from ..tls.layer import wrapEndpoint

__all__ = ["Interceptor"]


class Interceptor:
    """The CA, the per-host server contexts and the interception decision."""

    def __init__(self, config: MitmConfig, metrics: Metrics) -> None:
        self.config = config
        self.ca = loadOrCreateCA(config.ca_cert, config.ca_key)
        self.contexts = ServerContextCache(
            self.ca,
            onIssued=metrics.certificatesIssued.inc,
            onHit=metrics.certificateCacheHits.inc,
        )
        self.bundle = config.upstream_ca_bundle
        self.verify = config.verify_upstream
        self.http2 = config.http2
        if self.bundle:
            # Fail at start-up, not on the first request, when the bundle is unusable.
            clientCreator("localhost", self.bundle, self.verify)

    def intercepts(self, host: str) -> bool:
        if any(p.matchesName(host) or _addressMatch(p, host) for p in self.config.passthrough):
            return False
        return any(p.matchesName(host) or _addressMatch(p, host) for p in self.config.intercept)

    def serverCreator(self, host: str, protocol: str = HTTP11):
        """The client leg's TLS for CONNECT C{host}, agreeing to ALPN C{protocol}."""
        return self.contexts.serverCreator(host, protocol)

    def originOffer(self, offered: tuple[bytes, ...] | None) -> tuple[str, ...]:
        """The ALPN list to dial the origin with, for a client that offered C{offered}."""
        return alpnOffer(offered, self.http2)

    def clientProtocol(self, chosen: bytes | None) -> str:
        """The ALPN protocol to agree with the client, the origin having chosen C{chosen}."""
        return agreedProtocol(chosen, self.http2)

    def originCreator(self, host: str, alpn: tuple[str, ...] = (HTTP11,)):
        """The client TLS connection creator verifying the origin C{host}, offering C{alpn}."""
        return clientCreator(host, self.bundle, self.verify, alpn)

    def originTLS(self, host: str, alpn: tuple[str, ...] = (HTTP11,)) -> Callable:
        """Wraps an origin endpoint in TLS verified for C{host}, offering C{alpn}."""
        return wrapEndpoint(self.originCreator(host, alpn))


def _addressMatch(pattern, host: str) -> bool:
    from ..policy import parseIP

    ip = parseIP(host)
    return ip is not None and pattern.matchesAddress(ip)
