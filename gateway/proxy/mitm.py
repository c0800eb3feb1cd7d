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

import os
from collections.abc import Callable

from ..config import MitmConfig
from ..metrics import Metrics
from ..tls.ca import NameConstraints, loadOrCreateCA
from ..tls.contexts import HTTP11, agreedProtocol, alpnOffer, clientCreator
from ..tls.hostcontexts import ServerContextCache
from ..tls.layer import wrapEndpoint

__all__ = ["Interceptor"]


class Interceptor:
    """
    The CA, the per-host server contexts and the interception decision.

    A reload builds a new one from the new C{[mitm]} section and the one running
    (C{previous}): the CA and its minted contexts are kept when the CA files are the same
    ones, unchanged. With C{enabled = off} it decrypts no new tunnel, and exists only when
    interception was on before the reload: the tunnels decrypted until then still reach
    their origins, verified as the new section says.
    """

    def __init__(
        self, config: MitmConfig, metrics: Metrics, previous: Interceptor | None = None
    ) -> None:
        self.config = config
        if previous is not None and (not config.enabled or previous.source == _caSource(config)):
            self.source, self.ca, self.contexts = previous.source, previous.ca, previous.contexts
        else:
            constraints = None
            if config.name_constraints is not None:
                constraints = NameConstraints(*config.name_constraints)
            self.ca = loadOrCreateCA(config.ca_cert, config.ca_key, constraints)
            self.source = _caSource(config)  # the files as created, when they were not there
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

    def intercepts(self, host: str, port: int = 443) -> bool:
        """
        Whether a CONNECT to C{host}:C{port} is decrypted: it matches an C{intercept}
        pattern and no C{passthrough} one (which wins).
        """
        if not self.config.enabled:
            return False
        if any(p.matches(host, port) for p in self.config.passthrough):
            return False
        return any(p.matches(host, port) for p in self.config.intercept)

    def permits(self, host: str) -> bool:
        """
        Whether the CA may certify C{host} ([mitm] name_constraints, or those of a CA made
        elsewhere): a CONNECT to a host it may not is refused (403) rather than relayed
        blind, since the admin asked for it to be inspected.
        """
        return self.ca.permits(host)

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


def _caSource(config: MitmConfig) -> tuple:
    """The CA files and what they are now (inode, size, mtime): a change means reload it."""
    signature = []
    for path in (config.ca_cert, config.ca_key):
        try:
            st = os.stat(path)
        except OSError:
            signature.append((path, None))
        else:
            signature.append((path, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(signature)
