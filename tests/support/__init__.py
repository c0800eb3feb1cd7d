"""
Helpers shared by the tests (pytest fixtures stay in tests/conftest.py, as thin wrappers).

The everyday ones are importable from here (C{from tests.support import ProxyProcess,
waitFor}); the specialised origins and clients from their modules:

- L{tests.support.proxy}: proxygate under twistd (L{ProxyProcess}), the twistd command lines;
- L{tests.support.net}: bounded waits, refusing and non-accepting ports, raw requests;
- L{tests.support.payload}: deterministic bodies;
- L{tests.support.origin}: plain HTTP origins (L{Origin}, L{RawOrigin});
- L{tests.support.tlsorigin}: a throwaway CA, an HTTPS origin, a WebSocket echo server;
- L{tests.support.tunnel}: raw TCP origins and a socket-level CONNECT client;
- L{tests.support.wsframes}: the client side of an absolute-form WebSocket upgrade;
- L{tests.support.recorder}: a scripted recording origin and a strict client (conformance);
- L{tests.support.mitmorigin}: HTTPS/WSS origins with their own PKI (interception tests).
"""

from tests.support.net import (
    closedPort,
    freePort,
    nonAcceptingPort,
    rawRequest,
    readResponse,
    waitFor,
    waitForPort,
)
from tests.support.origin import Origin, OriginHandler, RawOrigin, SinkOrigin
from tests.support.payload import payload, payloadChunks, payloadDigest
from tests.support.proxy import (
    LOOPBACK_INI,
    PYTHON,
    REPO,
    TWISTD,
    TWISTD_WITHOUT_PYOPENSSL,
    ProxyProcess,
    bracketed,
    rss,
    sslListen,
    stopProcess,
    waitForListeners,
)

__all__ = [
    "LOOPBACK_INI",
    "PYTHON",
    "REPO",
    "TWISTD",
    "TWISTD_WITHOUT_PYOPENSSL",
    "Origin",
    "OriginHandler",
    "ProxyProcess",
    "RawOrigin",
    "SinkOrigin",
    "bracketed",
    "closedPort",
    "freePort",
    "nonAcceptingPort",
    "payload",
    "payloadChunks",
    "payloadDigest",
    "rawRequest",
    "readResponse",
    "rss",
    "sslListen",
    "stopProcess",
    "waitFor",
    "waitForListeners",
    "waitForPort",
]
