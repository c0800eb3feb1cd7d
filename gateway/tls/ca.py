# -*- test-case-name: tests.test_tls -*-
"""
The interception certificate authority: create it, write it, load it.

Creating a CA is a pure function of a name and a time so that tests and
callers can reason about it without touching the disk; all file I/O lives in
L{loadOrCreateCA}, which is the only thing the service calls at start-up.
Every problem it finds becomes one L{CAError} line that names the file, so a
bad C{[mitm]} configuration stops start-up with something a human can act on
instead of a traceback from deep inside C{cryptography}.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

from attrs import frozen
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from twisted.logger import Logger

from gateway.tls.contexts import CAError

__all__ = [
    "CAError",
    "CertificateAuthority",
    "NameConstraints",
    "createCA",
    "loadOrCreateCA",
    "permittedBy",
]

_log = Logger()

CAPrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

#: How long a freshly created CA lives.  Users install it in trust stores by
#: hand, so it should outlive any reasonable deployment.
CA_LIFETIME = timedelta(days=3650)

#: How far back a new certificate's notBefore is placed, so that clients whose
#: clocks run a little slow do not reject it as "not yet valid".
BACKDATE = timedelta(days=1)


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@frozen
class NameConstraints:
    """
    What a CA may certify ([mitm] name_constraints): DNS domains (each with all its
    subdomains, as X.509 dNSName constraints mean) and optionally IP networks. Without
    networks, no IP address at all may be certified: an X.509 name constraint that
    permits only DNS names leaves IP addresses unconstrained, so the CA excludes them
    explicitly (0.0.0.0/0 and ::/0).
    """

    domains: tuple[str, ...]
    networks: tuple[IPNetwork, ...] = ()

    def extension(self) -> x509.NameConstraints:
        permitted: list[x509.GeneralName] = [x509.DNSName(d) for d in self.domains]
        permitted += [x509.IPAddress(n) for n in self.networks]
        excluded = None
        if not self.networks:
            excluded = [
                x509.IPAddress(ipaddress.IPv4Network("0.0.0.0/0")),
                x509.IPAddress(ipaddress.IPv6Network("::/0")),
            ]
        return x509.NameConstraints(permitted_subtrees=permitted, excluded_subtrees=excluded)

    def __str__(self) -> str:
        return " ".join([*self.domains, *(str(n) for n in self.networks)])


def ipOrText(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | str:
    """
    The IP address C{host} spells (in brackets or not; an IPv6 zone id dropped), else its
    text without the brackets: a CONNECT target's or an SNI's host, before it is certified
    (L{gateway.tls.mint.parseHost}) or checked against name constraints.
    """
    text = host.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        return ipaddress.ip_address(text.split("%", 1)[0] if ":" in text else text)
    except ValueError:
        return text


def _hostIdentity(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | str:
    identity = ipOrText(host)
    return identity.rstrip(".").lower() if isinstance(identity, str) else identity


def _nameIn(name: str, constraint: str) -> bool:
    """RFC 5280 §4.2.1.10: the name, or it with labels added to the left ('.x': only those)."""
    constraint = constraint.lower()
    if constraint.startswith("."):
        return name.endswith(constraint)
    return not constraint or name == constraint or name.endswith("." + constraint)


def _subtrees(subtrees: Iterable[x509.GeneralName] | None, kind: type) -> list:
    return [general.value for general in subtrees or () if isinstance(general, kind)]


def permittedBy(constraints: x509.NameConstraints | None, host: str) -> bool:
    """
    Whether a leaf for C{host} (a DNS name or an IP literal) satisfies C{constraints},
    as a client checking the chain will decide: a name must fall in a permitted dNSName
    subtree when there are any, and in no excluded one; an address likewise for iPAddress
    subtrees. No constraints: anything.
    """
    if constraints is None:
        return True
    identity = _hostIdentity(host)
    if isinstance(identity, str):
        kind, inside = x509.DNSName, lambda value: _nameIn(identity, value)
    else:
        kind = x509.IPAddress

        def inside(network) -> bool:
            return network.version == identity.version and identity in network

    permitted = _subtrees(constraints.permitted_subtrees, kind)
    if permitted and not any(inside(value) for value in permitted):
        return False
    return not any(inside(value) for value in _subtrees(constraints.excluded_subtrees, kind))


@frozen
class CertificateAuthority:
    """
    A CA certificate with its private key, as used to sign per-host leaves.

    @ivar cert: The CA certificate.
    @ivar key: Its private key (EC or RSA).
    """

    cert: x509.Certificate
    key: CAPrivateKey

    def pem(self) -> bytes:
        """
        @return: The certificate in PEM form, the form users install into
            their trust stores (C{curl --cacert}, C{REQUESTS_CA_BUNDLE}).
        """
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def der(self) -> bytes:
        """
        @return: The certificate in DER form (what some OS import dialogs
            and Android expect).
        """
        return self.cert.public_bytes(serialization.Encoding.DER)

    def nameConstraints(self) -> x509.NameConstraints | None:
        """The certificate's name constraints extension, if it has one."""
        try:
            return self.cert.extensions.get_extension_for_class(x509.NameConstraints).value
        except x509.ExtensionNotFound:
            return None

    def permits(self, host: str) -> bool:
        """
        Whether this CA may certify C{host}: clients reject a leaf outside the CA's name
        constraints, so proxygate never mints one (a pure function of the certificate).
        """
        return permittedBy(self.nameConstraints(), host)


def _utcNow() -> datetime:
    return datetime.now(UTC)


def createCA(
    commonName: str = "proxygate CA",
    now: datetime | None = None,
    nameConstraints: NameConstraints | None = None,
) -> CertificateAuthority:
    """
    Create a new self-signed interception CA.

    The profile is what current clients demand of a root: basicConstraints
    CA:TRUE with pathlen 0 (it only ever signs leaves), keyUsage
    keyCertSign|cRLSign, both critical, and a subject key identifier that the
    leaves' authority key identifier points at.  EC P-256 keeps signing fast.

    @param commonName: The subject CN users will see in their trust stores.
    @param now: The creation time (default: the current time); injectable so
        the function stays pure and testable.
    @param nameConstraints: What the CA may certify, as a critical X.509 name
        constraints extension (RFC 5280 §4.2.1.10), so that its key, if stolen, signs
        for nothing else that clients accept; None: unconstrained.
    @return: The new CA.
    """
    if now is None:
        now = _utcNow()
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "proxygate"),
            x509.NameAttribute(NameOID.COMMON_NAME, commonName[:64]),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
            critical=False,
        )
    )
    if nameConstraints is not None:
        builder = builder.add_extension(nameConstraints.extension(), critical=True)
    cert = builder.sign(key, hashes.SHA256())
    return CertificateAuthority(cert=cert, key=key)


def loadOrCreateCA(
    certPath: str, keyPath: str, nameConstraints: NameConstraints | None = None
) -> CertificateAuthority:
    """
    Load the CA from C{certPath}/C{keyPath}, or create and write one when
    neither file exists.

    When only one of the two exists we refuse rather than create a fresh CA:
    silently replacing a CA that users have already installed would make
    every intercepted connection fail with a confusing trust error.

    The key is written through C{os.open(..., O_CREAT | O_EXCL, 0o600)} so
    that it is never readable by others, not even between creation and a
    later C{chmod}, and so that a concurrently created file is never
    overwritten.  C{certPath} and C{keyPath} may name the same file; it then
    holds both PEM blocks and is written with mode 0600.

    C{nameConstraints} go into a CA created here only: a CA that exists was made and
    installed elsewhere, and is used as it is (a warning says so when its constraints
    differ from the configured ones).

    @raise CAError: With one line naming the file and the problem.
    """
    certExists = os.path.lexists(certPath)
    keyExists = os.path.lexists(keyPath)
    if certExists and keyExists:
        ca = _loadCA(certPath, keyPath)
        if nameConstraints is not None and ca.nameConstraints() != nameConstraints.extension():
            _log.warn(
                "[mitm] name_constraints ({wanted}) apply only to a CA proxygate creates; "
                "the existing CA {certPath} has {have}: remove {certPath} and {keyPath} to "
                "have a constrained CA created (and install it in your clients again)",
                wanted=str(nameConstraints),
                have="other constraints" if ca.nameConstraints() else "none",
                certPath=certPath,
                keyPath=keyPath,
            )
        return ca
    if certExists:
        raise CAError(
            f"{keyPath}: CA key file is missing but the certificate {certPath} exists; "
            f"supply the matching key, or remove {certPath} to have a new CA created"
        )
    if keyExists:
        raise CAError(
            f"{certPath}: CA certificate file is missing but the key {keyPath} exists; "
            f"supply the matching certificate, or remove {keyPath} to have a new CA created"
        )
    ca = createCA(nameConstraints=nameConstraints)
    _writeCA(ca, certPath, keyPath)
    _log.info(
        "Created a new MITM CA: certificate {certPath}, key {keyPath}; "
        "install the certificate in your clients' trust stores",
        certPath=certPath,
        keyPath=keyPath,
    )
    return ca


def _readFile(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise CAError(f"{path}: cannot read the CA {what}: {e.strerror or e}") from None


def _parseCertificate(path: str, data: bytes) -> x509.Certificate:
    if b"-----BEGIN" in data:
        try:
            # The file may hold a chain or the key as well; the first
            # certificate is the CA.
            certs = x509.load_pem_x509_certificates(data)
        except ValueError:
            certs = []
        if certs:
            return certs[0]
    else:
        try:
            return x509.load_der_x509_certificate(data)
        except ValueError:
            pass
    raise CAError(f"{path}: not a PEM or DER X.509 certificate")


def _parseKey(path: str, data: bytes) -> CAPrivateKey:
    load = (
        serialization.load_pem_private_key
        if b"-----BEGIN" in data
        else serialization.load_der_private_key
    )
    try:
        key = load(data, password=None)
    except TypeError:
        raise CAError(
            f"{path}: the CA key is encrypted; proxygate needs an unencrypted key "
            f"(protect it with file permissions, mode 0600)"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        key = None
    if key is None:
        raise CAError(f"{path}: not a PEM or DER private key")
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise CAError(f"{path}: unsupported CA key type {type(key).__name__}; use an EC or RSA key")
    return key


def _publicBytes(key: object) -> bytes:
    return key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _checkCA(certPath: str, keyPath: str, ca: CertificateAuthority, now: datetime) -> None:
    cert = ca.cert
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    except ValueError as e:
        raise CAError(f"{certPath}: cannot parse the certificate's extensions: {e}") from None
    if bc is None or not bc.ca:
        raise CAError(
            f"{certPath}: the certificate is not a CA (basicConstraints CA:TRUE is missing); "
            f"point [mitm] ca_cert at a CA certificate, or remove both files to have one created"
        )
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        ku = None
    if ku is not None and not ku.key_cert_sign:
        raise CAError(f"{certPath}: the CA certificate's keyUsage does not allow keyCertSign")
    if _publicBytes(cert.public_key()) != _publicBytes(ca.key.public_key()):
        raise CAError(f"{keyPath}: the private key does not match the CA certificate {certPath}")
    if cert.not_valid_after_utc <= now:
        raise CAError(
            f"{certPath}: the CA certificate expired on {cert.not_valid_after_utc:%Y-%m-%d}; "
            f"remove both files to have a new CA created"
        )


def _loadCA(certPath: str, keyPath: str) -> CertificateAuthority:
    cert = _parseCertificate(certPath, _readFile(certPath, "certificate"))
    key = _parseKey(keyPath, _readFile(keyPath, "key"))
    ca = CertificateAuthority(cert=cert, key=key)
    _checkCA(certPath, keyPath, ca, _utcNow())
    try:
        mode = os.stat(keyPath).st_mode & 0o777
    except OSError:
        mode = 0
    if mode & 0o077:
        _log.warn(
            "MITM CA key {keyPath} is readable by other users (mode {mode:04o}); "
            "run chmod 600 on it",
            keyPath=keyPath,
            mode=mode,
        )
    return ca


def _writeExclusive(path: str, data: bytes, mode: int) -> None:
    """
    Create C{path} with C{mode} (never wider at any instant) and write
    C{data}; fail if it already exists.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), mode)
    try:
        # The umask may have narrowed the mode further; for the certificate
        # we want exactly 0644, for the key exactly 0600.
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _writeCA(ca: CertificateAuthority, certPath: str, keyPath: str) -> None:
    keyPem = ca.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    written: list[str] = []
    try:
        for path in {os.path.dirname(os.path.abspath(p)) for p in (certPath, keyPath)}:
            os.makedirs(path, exist_ok=True)
        if os.path.abspath(certPath) == os.path.abspath(keyPath):
            _writeExclusive(keyPath, ca.pem() + keyPem, 0o600)
            written.append(keyPath)
        else:
            _writeExclusive(keyPath, keyPem, 0o600)
            written.append(keyPath)
            _writeExclusive(certPath, ca.pem(), 0o644)
            written.append(certPath)
    except OSError as e:
        # Do not leave half a pair behind: the next start would refuse it.
        for path in written:
            try:
                os.unlink(path)
            except OSError:
                pass
        failed = e.filename if isinstance(e.filename, str) else certPath
        raise CAError(f"{failed}: cannot create the CA file: {e.strerror or e}") from None
