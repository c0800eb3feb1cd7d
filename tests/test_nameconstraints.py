"""
``[mitm] name_constraints`` (issue 19, item 13): the CA proxygate creates carries critical
X.509 name constraints, so its key, if stolen, signs for nothing else a client accepts.

- configuration: domains and CIDRs, refused wildcards, IP ranges alone refused;
- the created CA: the extension, critical, with every IP excluded when no range is given;
- L{CertificateAuthority.permits} (the pure check the lead wires to a 403 at CONNECT) and
  the per-host contexts, which never mint outside the constraints;
- OpenSSL agrees: ``openssl verify`` accepts a leaf inside and rejects leaves outside
  ("permitted subtree violation", "excluded subtree violation");
- end to end under twistd: the CA created at first start is constrained, curl through the
  interception to a permitted host verifies, a host outside gets no certificate (the
  handshake fails cleanly, no traceback), and an existing CA without constraints is used
  with a warning saying how to get a constrained one.
"""

from __future__ import annotations

import ipaddress
import socket
import subprocess
from datetime import UTC, datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.config import ConfigError, parseConfig
from gateway.tls.ca import NameConstraints, createCA, permittedBy
from gateway.tls.hostcontexts import ServerContextCache
from gateway.tls.mint import mintLeaf, newLeafKey
from tests.support import LOOPBACK_INI, readResponse
from tests.test_mitm import (  # noqa: F401 (fixtures)
    CLEAN_ENV,
    _closeSessions,
    fetchCA,
    httpsOrigin,
    mitmIni,
    pki,
    pkiDir,
)

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def _constraints(text: str) -> NameConstraints:
    config = parseConfig(f"[mitm]\nname_constraints = {text}\n")
    assert config.mitm.name_constraints is not None
    return NameConstraints(*config.mitm.name_constraints)


def test_configAcceptsDomainsAndNetworks():
    nc = _constraints(".Corp.Example.com example.org 10.0.0.0/8 fd00::/8 192.0.2.7")
    assert nc.domains == ("corp.example.com", "example.org")
    assert [str(n) for n in nc.networks] == ["10.0.0.0/8", "fd00::/8", "192.0.2.7/32"]
    assert parseConfig("").mitm.name_constraints is None


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("*", "no wildcards"),
        ("*.example.com", "no wildcards"),
        ("self", "no wildcards or keywords"),
        ("10.0.0.0/8", "at least one DNS domain"),
        ("a!b.com", "bad label"),
    ],
)
def test_configRefuses(value, message):
    with pytest.raises(ConfigError, match=message):
        parseConfig(f"[mitm]\nname_constraints = {value}\n")


def test_createdCAIsConstrained():
    ca = createCA(now=NOW, nameConstraints=_constraints("corp.example.com"))
    ext = ca.cert.extensions.get_extension_for_class(x509.NameConstraints)
    assert ext.critical
    assert ext.value.permitted_subtrees == [x509.DNSName("corp.example.com")]
    assert set(ext.value.excluded_subtrees) == {
        x509.IPAddress(ipaddress.ip_network("0.0.0.0/0")),
        x509.IPAddress(ipaddress.ip_network("::/0")),
    }
    assert createCA(now=NOW).nameConstraints() is None


@pytest.mark.parametrize(
    ("host", "permitted"),
    [
        ("corp.example.com", True),
        ("API.Corp.Example.com.", True),
        ("a.b.corp.example.com", True),
        ("evilcorp.example.com", False),
        ("corp.example.com.evil.org", False),
        ("example.com", False),
        ("10.1.2.3", True),
        ("[fd00::1]", True),
        ("192.0.2.1", False),
        ("::1", False),
    ],
)
def test_permits(host, permitted):
    ca = createCA(now=NOW, nameConstraints=_constraints("corp.example.com 10.0.0.0/8 fd00::/8"))
    assert ca.permits(host) is permitted


def test_withoutNetworksNoAddressIsPermitted():
    ca = createCA(now=NOW, nameConstraints=_constraints("corp.example.com"))
    assert not ca.permits("10.1.2.3") and not ca.permits("::1")
    assert createCA(now=NOW).permits("anything.example") and permittedBy(None, "1.2.3.4")


def test_contextsNeverMintOutside():
    ca = createCA(nameConstraints=_constraints("localhost"))
    issued = []
    cache = ServerContextCache(ca, onIssued=lambda: issued.append(1))
    cache.contextFor("localhost")
    with pytest.raises(ValueError, match="outside the CA's name constraints"):
        cache.contextFor("example.org")
    with pytest.raises(ValueError, match="outside"):
        cache.contextFor("127.0.0.1")
    assert len(issued) == 1


def _verify(tmp_path, ca, host: str) -> subprocess.CompletedProcess:
    leaf = mintLeaf(ca, newLeafKey(), host, datetime.now(UTC))
    (tmp_path / "ca.pem").write_bytes(ca.pem())
    (tmp_path / "leaf.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    return subprocess.run(
        ["openssl", "verify", "-CAfile", str(tmp_path / "ca.pem"), str(tmp_path / "leaf.pem")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=10,
    )


def test_opensslEnforcesTheConstraints(tmp_path):
    ca = createCA(nameConstraints=_constraints("corp.example.com 10.0.0.0/8"))
    assert _verify(tmp_path, ca, "git.corp.example.com").returncode == 0
    assert _verify(tmp_path, ca, "10.9.8.7").returncode == 0
    outside = _verify(tmp_path, ca, "www.example.org")
    assert outside.returncode != 0 and "permitted subtree violation" in outside.stdout
    addressOutside = _verify(tmp_path, ca, "192.0.2.1")
    assert addressOutside.returncode != 0 and "subtree violation" in addressOutside.stdout
    onlyNames = createCA(nameConstraints=_constraints("corp.example.com"))
    excluded = _verify(tmp_path, onlyNames, "10.9.8.7")
    assert excluded.returncode != 0 and "excluded subtree violation" in excluded.stdout


# -- end to end ----------------------------------------------------------------------------


def _curl(proxy, ca, url: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["curl", "-sS", "--max-time", "10", "--cacert", str(ca), "-x", proxy.url, url],
        capture_output=True,
        text=True,
        env=CLEAN_ENV,
        timeout=30,
    )


def test_proxyCreatesAConstrainedCA(startProxy, tmp_path, pki, httpsOrigin):  # noqa: F811
    proxy = startProxy(mitmIni("name_constraints = localhost\n", bundle=pki.caCert))
    ca = fetchCA(proxy, tmp_path)
    cert = x509.load_pem_x509_certificate(ca.read_bytes())
    ext = cert.extensions.get_extension_for_class(x509.NameConstraints)
    assert ext.critical and ext.value.permitted_subtrees == [x509.DNSName("localhost")]
    inside = _curl(proxy, ca, f"https://localhost:{httpsOrigin.port}/echo")
    assert inside.returncode == 0, inside.stderr
    # 127.0.0.1 is outside (no IP range): no certificate is minted for it, the client
    # sees a failed handshake, and the proxy logs it without a traceback.
    outside = _curl(proxy, ca, f"https://127.0.0.1:{httpsOrigin.port}/echo")
    assert outside.returncode != 0
    assert _curl(proxy, ca, f"https://localhost:{httpsOrigin.port}/echo").returncode == 0
    proxy.settle()
    assert "Traceback" not in proxy.log()


def test_aConnectTheCAMayNotCertifyIsRefused(startProxy, tmp_path, pki, httpsOrigin):  # noqa: F811
    """Inspection was asked for: a host outside the constraints gets 403, never a blind tunnel."""
    proxy = startProxy(mitmIni("name_constraints = localhost\n", bundle=pki.caCert))
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
        target = f"127.0.0.1:{httpsOrigin.port}".encode()
        s.sendall(b"CONNECT " + target + b" HTTP/1.1\r\nHost: " + target + b"\r\n\r\n")
        status, headers, body = readResponse(s)
    assert status == 403
    assert headers["proxy-status"] == "proxygate; error=http_request_denied"
    assert b"name_constraints" in body
    assert proxy.metric("proxygate_tunnels_total", result="denied") == 1


def test_existingCAWithoutConstraintsIsUsedWithAWarning(startProxy, tmp_path):
    first = startProxy(LOOPBACK_INI + "\n[mitm]\nenabled = on\n")
    first.stop()
    again = startProxy(
        LOOPBACK_INI + "\n[mitm]\nenabled = on\nname_constraints = corp.example.com\n"
    )
    again.settle()
    assert "apply only to a CA proxygate creates" in again.log()
