# -*- test-case-name: tests.test_tls -*-
"""
Per-host leaf certificates for TLS interception, as pure functions.

A leaf is a function of (CA, leaf key, host, now) and nothing else, so it can
be tested field by field and timed in isolation.  Key generation is kept out
of the per-host path on purpose: every host shares one EC P-256 leaf key (as
mitmproxy does), which makes a new host cost one ECDSA signature, well under a
millisecond, instead of an RSA key generation (~100 ms).

The profile is what browsers, curl, Python (including OpenSSL's X509_STRICT
checks that Python 3.13 turns on) and Apple's rules accept: the identity is in
subjectAltName (DNS or IP), EKU serverAuth, AKI/SKI, CA:FALSE, a validity
period shorter than 398 days, backdated a day against slow client clocks.
"""

from __future__ import annotations

import ipaddress
import os
import re
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.tls.ca import BACKDATE, CertificateAuthority, ipOrText

__all__ = ["LEAF_LIFETIME", "mintLeaf", "newLeafKey", "normalizeHost", "parseHost"]

#: Validity of a leaf counted from C{now}.  Apple and the CA/B Forum cap
#: server certificates at 398 days; with the one-day backdate the whole
#: period is 366 days.
LEAF_LIFETIME = timedelta(days=365)

LeafKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
HostIdentity = ipaddress.IPv4Address | ipaddress.IPv6Address | str

_LABEL = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")


def newLeafKey() -> ec.EllipticCurvePrivateKey:
    """
    Generate the key shared by all minted leaves (EC P-256: fast to
    generate, fast to sign with, accepted everywhere TLS 1.2+ is).
    """
    return ec.generate_private_key(ec.SECP256R1())


def parseHost(host: str) -> HostIdentity:
    """
    Classify and canonicalise a host as it arrives in a CONNECT target or an
    SNI extension.

    IP literals (IPv4, IPv6, optionally in brackets, an IPv6 zone id is
    dropped) become L{ipaddress} objects, because they must be certified by
    an IP-address SAN: clients never match an IP against a DNS SAN.
    Everything else becomes a lower-case A-label DNS name without a trailing
    dot.

    @raise ValueError: If C{host} is neither a valid IP literal nor a valid
        DNS name (empty, a label over 63 characters, a space, a wildcard...).
    """
    identity = ipOrText(host)
    if not isinstance(identity, str):
        return identity
    name = identity.rstrip(".").lower()
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            raise ValueError(f"not a valid host name: {host!r}") from None
    if not 0 < len(name) <= 253 or not all(_LABEL.match(label) for label in name.split(".")):
        raise ValueError(f"not a valid host name: {host!r}")
    return name


def normalizeHost(host: str) -> str:
    """
    The canonical text form of C{host} (see L{parseHost}): used as the
    certificate cache key, so that C{Example.COM}, C{example.com.} and
    C{[::1]}/C{::1} share one entry.

    @raise ValueError: As L{parseHost}.
    """
    return str(parseHost(host))


def _signatureHash(key: object) -> hashes.HashAlgorithm:
    """
    The digest to sign with: SHA-256, except SHA-384/512 for the larger EC
    curves, whose strength it should match.
    """
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if key.curve.key_size > 384:
            return hashes.SHA512()
        if key.curve.key_size > 256:
            return hashes.SHA384()
    return hashes.SHA256()


def _authorityKeyIdentifier(ca: CertificateAuthority) -> x509.AuthorityKeyIdentifier:
    """
    The AKI pointing at the CA: copied from the CA's SKI when it has one (so
    the two match byte for byte, whatever method the CA's issuer used), else
    derived from the CA public key.
    """
    try:
        ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key())
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def mintLeaf(
    ca: CertificateAuthority, leafKey: LeafKey, host: str, now: datetime
) -> x509.Certificate:
    """
    Mint a server certificate for C{host}, signed by C{ca}, for C{leafKey}.

    @param ca: The signing CA.
    @param leafKey: The leaf's private key (normally the one shared key from
        L{newLeafKey}).
    @param host: A DNS name or an IP literal (IPv4/IPv6, brackets allowed);
        see L{parseHost}.
    @param now: The issuing time (timezone-aware; a naive value is taken as
        UTC).  Passed in so that minting is pure.
    @return: The certificate: CN = host (truncated to 64 characters, the
        X.520 limit; clients only look at the SAN), SAN DNS or IP, random
        128-bit serial, notBefore = now - 1 day, notAfter = now + 365 days
        (clamped to the CA's own validity), EKU serverAuth, AKI = the CA's
        SKI, SKI, CA:FALSE, keyUsage digitalSignature (+keyEncipherment for an
        RSA leaf key, which RSA key exchange would need).
    @raise ValueError: If C{host} is not a valid name or the CA has expired.
    """
    identity = parseHost(host)
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    san: x509.GeneralName = (
        x509.DNSName(identity) if isinstance(identity, str) else x509.IPAddress(identity)
    )
    notBefore = max(now - BACKDATE, ca.cert.not_valid_before_utc)
    notAfter = min(now + LEAF_LIFETIME, ca.cert.not_valid_after_utc)
    if notAfter <= notBefore:
        raise ValueError("the CA certificate has expired; cannot mint leaf certificates")
    isRSA = isinstance(leafKey, rsa.RSAPrivateKey)
    # 128 random bits; OR-ing the bottom bit keeps it non-zero as RFC 5280
    # requires, and 16 bytes stays under the 20-octet limit.
    serial = int.from_bytes(os.urandom(16), "big") | 1
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(identity)[:64])])
    if not isinstance(identity, str) and ca.nameConstraints() is not None:
        # OpenSSL checks a leaf's CN against the CA's DNS name constraints when the leaf
        # has no DNS SAN, and "10.1.2.3" reads as a DNS name there: an address leaf of a
        # constrained CA has an empty subject, with the SAN critical (RFC 5280 §4.2.1.6).
        subject = x509.Name([])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.cert.subject)
        .public_key(leafKey.public_key())
        .serial_number(serial)
        .not_valid_before(notBefore)
        .not_valid_after(notAfter)
        .add_extension(x509.SubjectAlternativeName([san]), critical=not subject)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=isRSA,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(_authorityKeyIdentifier(ca), critical=False)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(leafKey.public_key()), critical=False
        )
    )
    return builder.sign(ca.key, _signatureHash(ca.key))
