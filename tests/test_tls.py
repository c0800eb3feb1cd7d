"""
Tests for gateway.tls: the CA, leaf minting, server contexts with SNI, and the
upstream client creator.

Three layers: pure tests of certificate fields; file tests of
loadOrCreateCA; and loopback end-to-end tests over real sockets, driving the
server (a L{gateway.tls.layer.TLSLayer}, as in the proxy) with C{openssl
s_client} (spawned through the reactor, which the server runs on), curl and
Python, and the client creators against a Twisted (pyOpenSSL) TLS origin.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import ssl
import stat
import subprocess
import time
from datetime import UTC, datetime, timedelta

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.ssl import CertificateOptions
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from gateway.tls import (
    HTTP11,
    CAError,
    CertificateAuthority,
    ServerContextCache,
    clientCreator,
    createCA,
    loadOrCreateCA,
    mintLeaf,
    newLeafKey,
    normalizeHost,
)
from gateway.tls import contexts as contextsModule
from gateway.tls.layer import startTLS, wrapEndpoint

OPENSSL = shutil.which("openssl")
needsOpenSSL = pytest.mark.skipif(OPENSSL is None, reason="no openssl binary")

#: A whole-second "now" (certificates keep seconds only); the shared test CA
#: is created an hour before it so leaves minted at NOW are not clamped.
NOW = datetime.now(UTC).replace(microsecond=0)


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return createCA("test CA", now=NOW - timedelta(hours=1))


@pytest.fixture(scope="module")
def otherCA() -> CertificateAuthority:
    return createCA("some other CA")


@pytest.fixture(scope="module")
def leafKey() -> ec.EllipticCurvePrivateKey:
    return newLeafKey()


@pytest.fixture(scope="module")
def pemDir(tmp_path_factory, ca, otherCA):
    """
    ca.pem and other.pem on disk, for openssl and for clientCreator bundles.
    """
    d = tmp_path_factory.mktemp("pems")
    (d / "ca.pem").write_bytes(ca.pem())
    (d / "other.pem").write_bytes(otherCA.pem())
    (d / "both.pem").write_bytes(otherCA.pem() + ca.pem())
    return d


def ext(cert: x509.Certificate, cls):
    return cert.extensions.get_extension_for_class(cls)


# ------------------------------------------------------------- pure: createCA


def test_createCAProfile():
    """
    A new CA is a constrained, long-lived EC P-256 root with SKI.
    """
    authority = createCA("proxygate CA", now=NOW)
    cert = authority.cert
    assert isinstance(authority.key, ec.EllipticCurvePrivateKey)
    assert authority.key.curve.name == "secp256r1"
    assert cert.subject == cert.issuer
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "proxygate CA"
    bc = ext(cert, x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = ext(cert, x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    assert not ku.value.digital_signature
    ski = ext(cert, x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(authority.key.public_key())
    assert cert.not_valid_before_utc < NOW
    assert cert.not_valid_after_utc - NOW >= timedelta(days=3649)
    cert.verify_directly_issued_by(cert)
    assert authority.pem().startswith(b"-----BEGIN CERTIFICATE-----")
    assert x509.load_der_x509_certificate(authority.der()) == cert


# ------------------------------------------------------------- pure: mintLeaf


def test_mintLeafDNSProfile(ca, leafKey):
    """
    A DNS host gets a DNS SAN and the modern server profile, chained to the
    CA by AKI == CA SKI and by signature.
    """
    cert = mintLeaf(ca, leafKey, "API.Example.test.", NOW)
    san = ext(cert, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["api.example.test"]
    assert san.get_values_for_type(x509.IPAddress) == []
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "api.example.test"
    assert cert.issuer == ca.cert.subject
    assert ext(cert, x509.ExtendedKeyUsage).value == x509.ExtendedKeyUsage(
        [ExtendedKeyUsageOID.SERVER_AUTH]
    )
    caSKI = ext(ca.cert, x509.SubjectKeyIdentifier).value
    assert ext(cert, x509.AuthorityKeyIdentifier).value.key_identifier == caSKI.digest
    assert ext(cert, x509.SubjectKeyIdentifier).value == x509.SubjectKeyIdentifier.from_public_key(
        leafKey.public_key()
    )
    bc = ext(cert, x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    ku = ext(cert, x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_encipherment
    assert cert.not_valid_before_utc == NOW - timedelta(days=1)
    assert cert.not_valid_after_utc == NOW + timedelta(days=365)
    assert cert.not_valid_after_utc - cert.not_valid_before_utc <= timedelta(days=397)
    assert 0 < cert.serial_number < 2**128
    assert cert.public_key() == leafKey.public_key()
    cert.verify_directly_issued_by(ca.cert)


@pytest.mark.parametrize(
    ("host", "address"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("::1", "::1"),
        ("[2001:DB8::1]", "2001:db8::1"),
        ("fe80::1%eth0", "fe80::1"),
    ],
)
def test_mintLeafIPLiteral(ca, leafKey, host, address):
    """
    IP literals (brackets and zone ids allowed) get an IP SAN, no DNS SAN.
    """
    cert = mintLeaf(ca, leafKey, host, NOW)
    san = ext(cert, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address(address)]
    assert san.get_values_for_type(x509.DNSName) == []


def test_mintLeafLongNameAndIDN(ca, leafKey):
    """
    The CN is cut at 64 characters while the SAN keeps the full name; an
    internationalised name is certified in its A-label form.
    """
    longName = ".".join(["a" * 60, "b" * 60, "example", "test"])
    cert = mintLeaf(ca, leafKey, longName, NOW)
    assert len(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value) == 64
    assert ext(cert, x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName) == [
        longName
    ]
    idn = mintLeaf(ca, leafKey, "bücher.example", NOW)
    assert ext(idn, x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName) == [
        "xn--bcher-kva.example"
    ]


def test_mintLeafClampedToCA(leafKey):
    """
    A leaf never outlives its CA, and an expired CA mints nothing.
    """
    shortCA = createCA(now=NOW - timedelta(days=3600))
    cert = mintLeaf(shortCA, leafKey, "x.test", NOW)
    assert cert.not_valid_after_utc == shortCA.cert.not_valid_after_utc
    with pytest.raises(ValueError, match="expired"):
        mintLeaf(shortCA, leafKey, "x.test", NOW + timedelta(days=100))


@pytest.mark.parametrize("host", ["", "a b.test", "*.example.test", "x" * 64 + ".test", "a..b"])
def test_mintLeafRejectsBadNames(ca, leafKey, host):
    """
    Names that cannot be a host are refused rather than certified.
    """
    with pytest.raises(ValueError):
        mintLeaf(ca, leafKey, host, NOW)


def test_normalizeHost():
    assert normalizeHost("Example.COM.") == "example.com"
    assert normalizeHost("[::1]") == "::1"
    assert normalizeHost("0:0::1") == "::1"


@needsOpenSSL
def test_opensslVerifiesLeaf(tmp_path, ca, leafKey):
    """
    C{openssl verify} (strict X.509 checks, and the name/IP checks) accepts
    minted leaves against the CA alone.
    """
    (tmp_path / "ca.pem").write_bytes(ca.pem())
    now = datetime.now(UTC)
    for host, check in [("api.example.test", "-verify_hostname"), ("10.1.2.3", "-verify_ip")]:
        leaf = mintLeaf(ca, leafKey, host, now)
        (tmp_path / "leaf.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
        result = subprocess.run(
            [
                *(OPENSSL, "verify", "-x509_strict", "-purpose", "sslserver", check, host),
                *("-CAfile", str(tmp_path / "ca.pem"), str(tmp_path / "leaf.pem")),
            ],
            capture_output=True,
            text=True,
            timeout=10,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert ": OK" in result.stdout


def test_mintTime(ca, leafKey, capsys):
    """
    With the shared key, minting is a signature, not a key generation: well
    under 5 ms per new host (about 0.2-0.3 ms measured), and a complete
    context (a new ssl.SSLContext loading the leaf and key) about 2 ms.
    """
    now = datetime.now(UTC)
    start = time.perf_counter()
    for i in range(200):
        mintLeaf(ca, leafKey, f"host{i}.mint.test", now)
    mint = (time.perf_counter() - start) / 200
    cache = ServerContextCache(ca)
    start = time.perf_counter()
    for i in range(200):
        cache.contextFor(f"host{i}.ctx.test")
    build = (time.perf_counter() - start) / 200
    with capsys.disabled():
        print(f"\nmintLeaf: {mint * 1000:.3f} ms/host; contextFor miss: {build * 1000:.3f} ms/host")
    assert mint < 0.005
    assert build < 0.005


# ---------------------------------------------------------- loadOrCreateCA


def test_loadOrCreateCACreatesThenReloads(tmp_path):
    """
    Missing files are created (parent directory too): key 0600, cert 0644;
    the next start loads the very same CA.
    """
    certPath = tmp_path / "sub" / "dir" / "ca.pem"
    keyPath = tmp_path / "sub" / "dir" / "ca.key"
    created = loadOrCreateCA(str(certPath), str(keyPath))
    assert stat.S_IMODE(os.stat(keyPath).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(certPath).st_mode) == 0o644
    assert certPath.read_bytes() == created.pem()
    assert ext(created.cert, x509.BasicConstraints).value.ca
    loaded = loadOrCreateCA(str(certPath), str(keyPath))
    assert loaded.cert == created.cert
    assert loaded.key.private_numbers() == created.key.private_numbers()


def test_loadOrCreateCAKeyNeverWidelyReadable(tmp_path):
    """
    Even with a permissive umask the key is created 0600.
    """
    old = os.umask(0)
    try:
        loadOrCreateCA(str(tmp_path / "ca.pem"), str(tmp_path / "ca.key"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "ca.key").st_mode) == 0o600


def test_loadOrCreateCACombinedFile(tmp_path):
    """
    ca_cert and ca_key may be one file holding both (mitmproxy style).
    """
    path = str(tmp_path / "ca-combined.pem")
    created = loadOrCreateCA(path, path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert loadOrCreateCA(path, path).cert == created.cert


def _writePair(tmp_path, authority: CertificateAuthority, cert=None, key=None):
    certPath, keyPath = tmp_path / "ca.pem", tmp_path / "ca.key"
    certPath.write_bytes((cert or authority.cert).public_bytes(serialization.Encoding.PEM))
    keyPath.write_bytes(
        (key or authority.key).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    os.chmod(keyPath, 0o600)
    return str(certPath), str(keyPath)


def test_loadOrCreateCAMismatch(tmp_path, ca, otherCA):
    certPath, keyPath = _writePair(tmp_path, ca, key=otherCA.key)
    with pytest.raises(CAError, match="does not match") as e:
        loadOrCreateCA(certPath, keyPath)
    assert keyPath in str(e.value)


def test_loadOrCreateCAOneMissing(tmp_path, ca):
    certPath, keyPath = _writePair(tmp_path, ca)
    os.unlink(keyPath)
    with pytest.raises(CAError, match="missing") as e:
        loadOrCreateCA(certPath, keyPath)
    assert str(e.value).startswith(keyPath)
    assert not os.path.exists(keyPath)  # never silently replaced
    certPath, keyPath = _writePair(tmp_path, ca)
    os.unlink(certPath)
    with pytest.raises(CAError, match="missing") as e:
        loadOrCreateCA(certPath, keyPath)
    assert str(e.value).startswith(certPath)


def test_loadOrCreateCAGarbage(tmp_path, ca):
    certPath, keyPath = _writePair(tmp_path, ca)
    with open(certPath, "wb") as f:
        f.write(b"not a certificate\n")
    with pytest.raises(CAError, match=r"not a PEM or DER X\.509 certificate") as e:
        loadOrCreateCA(certPath, keyPath)
    assert str(e.value).startswith(certPath)
    certPath, keyPath = _writePair(tmp_path, ca)
    with open(keyPath, "wb") as f:
        f.write(b"-----BEGIN PRIVATE KEY-----\nbroken\n-----END PRIVATE KEY-----\n")
    with pytest.raises(CAError, match="private key") as e:
        loadOrCreateCA(certPath, keyPath)
    assert str(e.value).startswith(keyPath)


def test_loadOrCreateCAUnreadable(tmp_path, ca):
    """
    An unreadable file (here: a directory, which fails even as root) is
    named in the error.
    """
    certPath, keyPath = _writePair(tmp_path, ca)
    os.unlink(keyPath)
    os.mkdir(keyPath)
    with pytest.raises(CAError, match="cannot read") as e:
        loadOrCreateCA(certPath, keyPath)
    assert str(e.value).startswith(keyPath)


def test_loadOrCreateCAEncryptedKey(tmp_path, ca):
    certPath, keyPath = _writePair(tmp_path, ca)
    with open(keyPath, "wb") as f:
        f.write(
            ca.key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"secret"),
            )
        )
    with pytest.raises(CAError, match="encrypted") as e:
        loadOrCreateCA(certPath, keyPath)
    assert str(e.value).startswith(keyPath)


def test_loadOrCreateCANotACA(tmp_path, ca, leafKey):
    """
    A leaf certificate (CA:FALSE) with its own key is refused as a CA.
    """
    leaf = mintLeaf(ca, leafKey, "not-a-ca.test", datetime.now(UTC))
    certPath, keyPath = _writePair(tmp_path, ca, cert=leaf, key=leafKey)
    with pytest.raises(CAError, match="not a CA") as e:
        loadOrCreateCA(certPath, keyPath)
    assert str(e.value).startswith(certPath)


def test_loadOrCreateCAExpired(tmp_path):
    old = createCA(now=datetime.now(UTC) - timedelta(days=4000))
    certPath, keyPath = _writePair(tmp_path, old)
    with pytest.raises(CAError, match="expired") as e:
        loadOrCreateCA(certPath, keyPath)
    assert str(e.value).startswith(certPath)


def test_loadOrCreateCARSA(tmp_path):
    """
    A user-supplied RSA CA loads and signs leaves (SHA-256, and the RSA leaf
    profile adds keyEncipherment).
    """
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rsa CA")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    certPath, keyPath = _writePair(tmp_path, CertificateAuthority(cert, key))
    loaded = loadOrCreateCA(certPath, keyPath)
    leaf = mintLeaf(loaded, key, "rsa.test", now)
    assert ext(leaf, x509.KeyUsage).value.key_encipherment
    assert isinstance(leaf.signature_hash_algorithm, hashes.SHA256)
    # No SKI on this CA: the AKI is derived from its public key.
    assert ext(leaf, x509.AuthorityKeyIdentifier).value.key_identifier == (
        x509.SubjectKeyIdentifier.from_public_key(key.public_key()).digest
    )
    leaf.verify_directly_issued_by(cert)


# ------------------------------------------------------ ServerContextCache unit


def test_contextCacheLRUAndCounters(ca):
    """
    Hits and issues are counted; keys are case-insensitive; the least
    recently used host is evicted beyond C{size}.
    """
    counts = {"issued": 0, "hit": 0}
    cache = ServerContextCache(
        ca,
        size=2,
        onIssued=lambda: counts.__setitem__("issued", counts["issued"] + 1),
        onHit=lambda: counts.__setitem__("hit", counts["hit"] + 1),
    )
    a = cache.contextFor("a.test")
    assert cache.contextFor("A.TEST.") is a
    b = cache.contextFor("b.test")
    assert cache.contextFor("a.test") is a  # a is now most recent
    cache.contextFor("c.test")  # evicts b
    assert len(cache) == 2
    assert cache.contextFor("a.test") is a
    assert cache.contextFor("b.test") is not b
    assert counts == {"issued": 4, "hit": 3}


def test_contextCacheRemintsOldLeaves(ca):
    """
    A cached leaf older than about 30 days is replaced on next use.
    """
    clock = [NOW]
    issued = []
    cache = ServerContextCache(ca, clock=lambda: clock[0], onIssued=lambda: issued.append(1))
    first = cache.contextFor("old.test")
    clock[0] = NOW + timedelta(days=29)
    assert cache.contextFor("old.test") is first
    clock[0] = NOW + timedelta(days=31)
    assert cache.contextFor("old.test") is not first
    assert len(issued) == 2


def test_serverCreatorRejectsBadDefaultHost(ca):
    with pytest.raises(ValueError):
        ServerContextCache(ca).serverCreator("bad host name")


# ------------------------------------------------------------ end to end


class _HelloServer(protocol.Protocol):
    """
    What the MITM handler does, reduced: start TLS right after connecting
    (as after a CONNECT's 200), then answer one HTTP/1.1 request, naming the
    negotiated ALPN protocol and the SNI the client sent.
    """

    def connectionMade(self):
        self.buffer = b""
        startTLS(self, self.factory.cache.serverCreator(self.factory.defaultHost))

    def dataReceived(self, data):
        self.buffer += data
        if b"\r\n\r\n" not in self.buffer:
            return
        body = b"hello alpn=%s sni=%s\n" % (
            self.alpn() or b"none",
            (self.serverName() or "none").encode(),
        )
        self.transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
            % (len(body), body)
        )
        self.transport.loseConnection()

    def alpn(self) -> bytes | None:
        return self.transport.negotiatedProtocol

    def serverName(self) -> str | None:
        return getattr(self.transport._tls, "sniSeen", None)


class _RecordingCache(ServerContextCache):
    """Remembers, on the connection, the SNI its client sent (for the answer)."""

    def _onServerName(self, tls, serverName, ctx):
        tls.sniSeen = serverName
        super()._onServerName(tls, serverName, ctx)


class _Counter:
    def __init__(self):
        self.issued = 0
        self.hits = 0

    def onIssued(self):
        self.issued += 1

    def onHit(self):
        self.hits += 1


@pytest.fixture
def mitmServer(ca):
    """
    A loopback server (IPv4) doing startTLS with a fresh ServerContextCache.
    """
    counter = _Counter()
    factory = protocol.Factory.forProtocol(_HelloServer)
    factory.cache = _RecordingCache(ca, onIssued=counter.onIssued, onHit=counter.onHit)
    factory.defaultHost = "fallback.test"
    factory.counter = counter
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    factory.port = port.getHost().port
    yield factory
    pytest_twisted.blockon(defer.maybeDeferred(port.stopListening))


@pytest.fixture(autouse=True)
def noLoggedErrors():
    """
    Nothing in these tests may log an error or a failure (the SNI callback
    logs instead of raising into OpenSSL, so a bug there would otherwise
    only show as a failed handshake).
    """
    bad: list[str] = []

    def observer(event):
        if event.get("log_failure") is not None or event.get("log_level") in (
            LogLevel.error,
            LogLevel.critical,
        ):
            bad.append(formatEvent(event))

    globalLogPublisher.addObserver(observer)
    yield
    globalLogPublisher.removeObserver(observer)
    assert bad == []


class _ProcessOutput(protocol.ProcessProtocol):
    def __init__(self, stdin: bytes):
        self.stdin = stdin
        self.out: list[bytes] = []
        self.err: list[bytes] = []
        self.done: defer.Deferred = defer.Deferred()

    def connectionMade(self):
        self.transport.write(self.stdin)
        self.transport.closeStdin()

    def outReceived(self, data):
        self.out.append(data)

    def errReceived(self, data):
        self.err.append(data)

    def processEnded(self, reason):
        self.done.callback(
            (b"".join(self.out).decode(), b"".join(self.err).decode(), reason.value.exitCode)
        )


def runProcess(argv: list[str], stdin: bytes = b"", timeout: float = 10) -> defer.Deferred:
    """
    Run a program through the reactor (a blocking subprocess call would
    freeze the server under test) and fire with (stdout, stderr, exit code).
    """
    proto = _ProcessOutput(stdin)
    transport = reactor.spawnProcess(proto, argv[0], argv, env=os.environ)
    killer = reactor.callLater(timeout, transport.signalProcess, "KILL")
    proto.done.addBoth(lambda r: (killer.active() and killer.cancel(), r)[1])
    return proto.done


def sClient(port: int, *args: str) -> defer.Deferred:
    """
    C{openssl s_client} against the loopback server, sending one GET and
    staying until the server closes (C{-ign_eof}).
    """
    argv = [OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}", "-ign_eof", *args]
    return runProcess(argv, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")


def peerCertificate(output: str) -> x509.Certificate:
    """
    The server certificate that s_client printed.
    """
    start = output.index("-----BEGIN CERTIFICATE-----")
    end = output.index("-----END CERTIFICATE-----") + len("-----END CERTIFICATE-----")
    return x509.load_pem_x509_certificate(output[start:end].encode())


def sanOf(cert: x509.Certificate) -> list:
    san = ext(cert, x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.DNSName) + [
        str(a) for a in san.get_values_for_type(x509.IPAddress)
    ]


@needsOpenSSL
@pytest_twisted.inlineCallbacks
def test_sClientVerifiesSNICertificateAndALPN(mitmServer, pemDir):
    """
    (a) with SNI, s_client verifies the chain to the CA (strictly), the
    name matches, ALPN picks http/1.1 although h2 is offered first, and the
    request is served over the intercepted connection.  (e) the second
    connection for the same name is a cache hit.
    """
    args = ["-servername", "api.example.test", "-CAfile", str(pemDir / "ca.pem")]
    args += ["-verify_return_error", "-x509_strict", "-verify_hostname", "api.example.test"]
    args += ["-alpn", "h2,http/1.1"]
    out, err, code = yield sClient(mitmServer.port, *args)
    assert code == 0, out + err
    assert "Verify return code: 0 (ok)" in out
    assert "ALPN protocol: http/1.1" in out
    assert "h2" not in out.split("ALPN protocol:")[1].splitlines()[0]
    assert "hello alpn=http/1.1 sni=api.example.test" in out
    assert sanOf(peerCertificate(out)) == ["api.example.test"]
    assert (mitmServer.counter.issued, mitmServer.counter.hits) == (1, 0)

    out, err, code = yield sClient(mitmServer.port, *args)
    assert "Verify return code: 0 (ok)" in out
    assert (mitmServer.counter.issued, mitmServer.counter.hits) == (1, 1)


@needsOpenSSL
@pytest_twisted.inlineCallbacks
def test_sClientH2OnlyGetsNoALPN(mitmServer, pemDir):
    """
    A client offering only h2 is not refused; it just gets no ALPN (and so
    speaks HTTP/1.1).
    """
    args = ["-servername", "h2only.test", "-CAfile", str(pemDir / "ca.pem")]
    args += ["-verify_return_error", "-alpn", "h2"]
    out, err, _ = yield sClient(mitmServer.port, *args)
    assert "Verify return code: 0 (ok)" in out, out + err
    assert "No ALPN negotiated" in out
    assert "hello alpn=none" in out


@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl binary")
@pytest_twisted.inlineCallbacks
def test_curlAcceptsMintedCertificate(mitmServer, pemDir):
    """
    curl --cacert (OpenSSL or GnuTLS backend, whichever it was built with)
    accepts the certificate for the name it connects to and uses http/1.1
    although it would prefer h2.
    """
    host = "curl.example.test"
    out, err, code = yield runProcess(
        [
            shutil.which("curl"),
            *("-sS", "--http2", "--cacert", str(pemDir / "ca.pem")),
            *("--resolve", f"{host}:{mitmServer.port}:127.0.0.1"),
            f"https://{host}:{mitmServer.port}/",
        ]
    )
    assert code == 0, err
    assert out == f"hello alpn=http/1.1 sni={host}\n"


@pytest_twisted.inlineCallbacks
def test_pythonStrictClientAcceptsMintedCertificate(mitmServer, pemDir):
    """
    Python's ssl with VERIFY_X509_STRICT (the default from Python 3.13,
    which rejects leaves without AKI and the like) accepts the leaf; the
    client runs in a thread because it blocks.
    """
    import socket
    import ssl

    from twisted.internet.threads import deferToThread

    def get() -> tuple[str | None, bytes]:
        context = ssl.create_default_context(cafile=str(pemDir / "ca.pem"))
        context.verify_flags |= ssl.VERIFY_X509_STRICT
        context.set_alpn_protocols(["h2", "http/1.1"])
        with (
            socket.create_connection(("127.0.0.1", mitmServer.port), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname="py.example.test") as tls,
        ):
            tls.sendall(b"GET / HTTP/1.1\r\nHost: py.example.test\r\n\r\n")
            data = b""
            while chunk := tls.recv(4096):
                data += chunk
            return tls.selected_alpn_protocol(), data

    alpn, data = yield deferToThread(get)
    assert alpn == "http/1.1"
    assert data.endswith(b"hello alpn=http/1.1 sni=py.example.test\n")


@needsOpenSSL
@pytest_twisted.inlineCallbacks
def test_oldTLSRefused(mitmServer, pemDir):
    """
    TLS 1.1 is refused by the server (the client is told to allow it), and
    TLS 1.2 works with a forward-secret AEAD suite.
    """
    args = ["-servername", "old.test", "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"]
    out, err, code = yield sClient(mitmServer.port, *args)
    assert code != 0
    assert "protocol version" in err or "unsupported protocol" in err, err
    args = ["-servername", "tls12.test", "-tls1_2", "-CAfile", str(pemDir / "ca.pem")]
    out, err, code = yield sClient(mitmServer.port, *args, "-verify_return_error")
    assert code == 0, out + err
    assert "Protocol  : TLSv1.2" in out
    cipher = out.split("Cipher    : ")[1].split()[0]
    assert cipher.startswith("ECDHE-ECDSA-"), cipher
    assert "GCM" in cipher or "CHACHA20" in cipher, cipher


@needsOpenSSL
@pytest_twisted.inlineCallbacks
def test_sClientWithoutSNIGetsFallbackHost(mitmServer, pemDir):
    """
    (b) without SNI the certificate names the CONNECT host.
    """
    args = ["-noservername", "-CAfile", str(pemDir / "ca.pem"), "-verify_return_error"]
    args += ["-verify_hostname", "fallback.test"]
    out, err, code = yield sClient(mitmServer.port, *args)
    assert code == 0, out + err
    assert "Verify return code: 0 (ok)" in out
    assert sanOf(peerCertificate(out)) == ["fallback.test"]
    assert "sni=none" in out


@needsOpenSSL
@pytest_twisted.inlineCallbacks
def test_sClientIPLiteral(mitmServer, pemDir):
    """
    (c) a tunnel to an IP literal (clients send no SNI for IPs) gets an IP
    SAN that s_client's IP check accepts.
    """
    mitmServer.defaultHost = "127.0.0.1"
    args = ["-noservername", "-CAfile", str(pemDir / "ca.pem"), "-verify_return_error"]
    args += ["-verify_ip", "127.0.0.1"]
    out, err, code = yield sClient(mitmServer.port, *args)
    assert code == 0, out + err
    assert "Verify return code: 0 (ok)" in out
    assert sanOf(peerCertificate(out)) == ["127.0.0.1"]


@needsOpenSSL
@pytest_twisted.inlineCallbacks
def test_untrustingClientFailsServerKeepsServing(mitmServer, pemDir):
    """
    (d) a client that does not trust the CA aborts the handshake; the
    server is unaffected and serves the next client.
    """
    args = ["-servername", "api.example.test", "-CAfile", str(pemDir / "other.pem")]
    out, err, code = yield sClient(mitmServer.port, *args, "-verify_return_error")
    assert code != 0
    assert "certificate verify failed" in err
    args = ["-servername", "api.example.test", "-CAfile", str(pemDir / "ca.pem")]
    out, err, code = yield sClient(mitmServer.port, *args, "-verify_return_error")
    assert code == 0, out + err
    assert "Verify return code: 0 (ok)" in out


@needsOpenSSL
@pytest_twisted.inlineCallbacks
def test_unusableSNIFallsBack(mitmServer, pemDir):
    """
    An SNI we cannot certify (here: with an underscore-free but invalid
    label) falls back to the CONNECT host rather than failing.
    """
    args = ["-servername", "-bad-.test", "-CAfile", str(pemDir / "ca.pem")]
    out, err, _ = yield sClient(mitmServer.port, *args)
    assert "Verify return code: 0 (ok)" in out, out + err
    assert sanOf(peerCertificate(out)) == ["fallback.test"]


# ---------------------------------------------- Twisted TLS clients (both legs)


class _GetClient(protocol.Protocol):
    """
    Sends one GET, collects the answer; fires C{done} with (negotiated ALPN,
    peer certificate, response bytes) or fails with the connection's reason.
    """

    def __init__(self):
        self.done: defer.Deferred = defer.Deferred()
        self.data = b""
        self.alpn = None
        self.peer = None

    def connectionMade(self):
        self.transport.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")

    def dataReceived(self, data):
        if self.peer is None:
            self.alpn = self.transport.negotiatedProtocol
            der = self.transport._tls.getpeercert(binary_form=True)
            self.peer = x509.load_der_x509_certificate(der)
        self.data += data

    def connectionLost(self, reason):
        if self.peer is None or not self.data:
            self.done.errback(reason)
        else:
            self.done.callback((self.alpn, self.peer, self.data))


def fetch(creator, port: int, host: str = "127.0.0.1") -> defer.Deferred:
    client = _GetClient()
    endpointType = TCP6ClientEndpoint if ":" in host else TCP4ClientEndpoint
    endpoint = wrapEndpoint(creator)(endpointType(reactor, host, port, timeout=5))
    d = endpoint.connect(protocol.Factory.forProtocol(lambda: client))
    d.addCallback(lambda _: client.done)
    return d.addTimeout(10, reactor)


@pytest.fixture
def originServer(ca, leafKey):
    """
    A loopback TLS origin with one fixed certificate for origin.test from
    the test CA (not an SNI minting one, so that wrong names really fail).
    """
    leaf = mintLeaf(ca, leafKey, "origin.test", datetime.now(UTC))
    options = CertificateOptions(
        privateKey=leafKey,
        certificate=leaf,
        extraCertChain=[ca.cert],
        acceptableProtocols=[HTTP11.encode()],
    )

    class Origin(_HelloServer):
        def connectionMade(self):
            self.buffer = b""
            self.transport.startTLS(options)

        def alpn(self):
            return self.transport.getHandle().get_alpn_proto_negotiated()

        def serverName(self):
            name = self.transport.getHandle().get_servername()
            return name.decode() if name else None

    port = reactor.listenTCP(0, protocol.Factory.forProtocol(Origin), interface="127.0.0.1")
    yield port.getHost().port
    pytest_twisted.blockon(defer.maybeDeferred(port.stopListening))


@pytest.fixture(autouse=True)
def _freshClientCache():
    contextsModule._clientCreators.clear()
    contextsModule._clientContexts.clear()


@pytest_twisted.inlineCallbacks
def test_clientCreatorVerifiesWithBundle(originServer, pemDir):
    """
    The upstream creator trusts every CA in the bundle (the right one is the
    second of two), checks the name, and offers http/1.1.
    """
    creator = clientCreator("origin.test", str(pemDir / "both.pem"), True)
    alpn, peer, data = yield fetch(creator, originServer)
    assert alpn == b"http/1.1"
    assert sanOf(peer) == ["origin.test"]
    assert data.startswith(b"HTTP/1.1 200 OK")
    assert clientCreator("origin.test", str(pemDir / "both.pem"), True) is creator


@pytest_twisted.inlineCallbacks
def test_clientCreatorRejectsWrongHostname(originServer, pemDir):
    creator = clientCreator("wrong.test", str(pemDir / "ca.pem"), True)
    with pytest.raises(ssl.SSLCertVerificationError) as e:
        yield fetch(creator, originServer)
    assert "wrong.test" in e.value.verify_message


@pytest_twisted.inlineCallbacks
def test_clientCreatorRejectsOtherCA(originServer, pemDir):
    creator = clientCreator("origin.test", str(pemDir / "other.pem"), True)
    with pytest.raises(ssl.SSLCertVerificationError):
        yield fetch(creator, originServer)


@pytest_twisted.inlineCallbacks
def test_clientCreatorSystemTrust(originServer):
    """
    Without a bundle the system trust store is used, which does not contain
    the test CA.
    """
    with pytest.raises(ssl.SSLCertVerificationError):
        yield fetch(clientCreator("origin.test", None, True), originServer)


@pytest_twisted.inlineCallbacks
def test_clientCreatorUnverified(originServer, mitmServer):
    """
    verify=False accepts a wrong name from an unknown CA, and still sends
    SNI (the SNI-minting server answers with a certificate for it).
    """
    _, peer, data = yield fetch(clientCreator("wrong.test", None, False), originServer)
    assert sanOf(peer) == ["origin.test"]
    assert data.startswith(b"HTTP/1.1 200 OK")
    _, peer, data = yield fetch(clientCreator("sni.test", None, False), mitmServer.port)
    assert sanOf(peer) == ["sni.test"]
    assert b"sni=sni.test" in data


@pytest_twisted.inlineCallbacks
def test_clientCreatorIPLiteral(mitmServer, pemDir):
    """
    An IP-literal origin is verified against the IP SAN (no SNI is sent, so
    the MITM server falls back to its CONNECT host, here the IP); a
    certificate for another IP is refused.  Brackets are accepted.
    """
    mitmServer.defaultHost = "127.0.0.1"
    bundle = str(pemDir / "ca.pem")
    alpn, peer, data = yield fetch(clientCreator("[127.0.0.1]", bundle, True), mitmServer.port)
    assert sanOf(peer) == ["127.0.0.1"]
    assert alpn == b"http/1.1"
    assert b"sni=none" in data
    mitmServer.defaultHost = "127.0.0.2"
    with pytest.raises(ssl.SSLCertVerificationError) as e:
        yield fetch(clientCreator("127.0.0.1", bundle, True), mitmServer.port)
    assert "IP address mismatch" in e.value.verify_message


@pytest_twisted.inlineCallbacks
def test_clientCreatorIPv6Literal(ca, pemDir):
    """
    The same for an IPv6 literal, over ::1 when the host has it.
    """
    factory = protocol.Factory.forProtocol(_HelloServer)
    factory.cache = _RecordingCache(ca)
    factory.defaultHost = "::1"
    try:
        port = reactor.listenTCP(0, factory, interface="::1")
    except Exception as e:  # pragma: no cover - no IPv6 loopback here
        pytest.skip(f"no IPv6 loopback: {e}")
    try:
        creator = clientCreator("[::1]", str(pemDir / "ca.pem"), True)
        _, peer, _ = yield fetch(creator, port.getHost().port, host="::1")
        assert sanOf(peer) == ["::1"]
    finally:
        yield port.stopListening()


def test_clientCreatorBadBundle(tmp_path):
    (tmp_path / "empty.pem").write_bytes(b"nothing here\n")
    with pytest.raises(CAError, match="no PEM certificates") as e:
        clientCreator("x.test", str(tmp_path / "empty.pem"), True)
    assert str(tmp_path / "empty.pem") in str(e.value)
    with pytest.raises(CAError, match="cannot read"):
        clientCreator("x.test", str(tmp_path / "missing.pem"), True)
