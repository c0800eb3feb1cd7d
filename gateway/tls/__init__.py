# -*- test-case-name: tests.test_tls -*-
"""
TLS for proxygate: the interception CA, per-host leaf certificates, the
C{ssl} contexts for both legs of an intercepted tunnel, and the TLS layer that
runs them on Twisted transports.

Import from here; the submodules are split by concern (C{ca}: files and the
CA; C{mint}: pure certificate minting; C{contexts}: C{ssl.SSLContext} set-up;
C{layer}: TLS over memory BIOs between a transport and a protocol).
"""

from gateway.tls.ca import CAError, CertificateAuthority, createCA, loadOrCreateCA
from gateway.tls.contexts import HTTP11, ServerContextCache, clientCreator
from gateway.tls.mint import mintLeaf, newLeafKey, normalizeHost, parseHost

__all__ = [
    "HTTP11",
    "CAError",
    "CertificateAuthority",
    "ServerContextCache",
    "clientCreator",
    "createCA",
    "loadOrCreateCA",
    "mintLeaf",
    "newLeafKey",
    "normalizeHost",
    "parseHost",
]
