"""
Just enough X.509 reading to name a certificate's issuer and subject, with the standard
library only.

Python's C{ssl} module describes a peer certificate only after it verified it; the one
certificate the doctor most needs to describe is the one that failed verification (an
intercepting proxy's leaf, signed by a CA the user does not trust yet). So the names are
read from the DER bytes here: a certificate is C{SEQUENCE {tbsCertificate, ...}} and the
names sit at fixed places in C{tbsCertificate}.
"""

from __future__ import annotations

import hashlib
import ssl
from dataclasses import dataclass

__all__ = ["CertificateNames", "certificateNames", "fingerprint", "pemCertificates"]

#: Attribute names as OpenSSL and curl print them.
_ATTRIBUTES = {
    "2.5.4.3": "CN",
    "2.5.4.6": "C",
    "2.5.4.7": "L",
    "2.5.4.8": "ST",
    "2.5.4.10": "O",
    "2.5.4.11": "OU",
    "1.2.840.113549.1.9.1": "emailAddress",
    "0.9.2342.19200300.100.1.25": "DC",
}

_STRINGS = {
    0x0C: "utf-8",  # UTF8String
    0x13: "ascii",  # PrintableString
    0x16: "ascii",  # IA5String
    0x14: "latin-1",  # TeletexString (read as latin-1, as most decoders do)
    0x1E: "utf-16-be",  # BMPString
    0x1C: "utf-32-be",  # UniversalString
}


@dataclass(frozen=True)
class CertificateNames:
    issuer: str
    subject: str


def _tlv(data: bytes, offset: int) -> tuple[int, int, int]:
    """(tag, start of the value, end of the value) of the DER element at C{offset}."""
    if offset + 2 > len(data):
        raise ValueError("truncated DER")
    tag, length = data[offset], data[offset + 1]
    offset += 2
    if length & 0x80:
        size = length & 0x7F
        if size == 0 or size > 4 or offset + size > len(data):
            raise ValueError("bad DER length")
        length = int.from_bytes(data[offset : offset + size], "big")
        offset += size
    end = offset + length
    if end > len(data):
        raise ValueError("truncated DER")
    return tag, offset, end


def _children(data: bytes, start: int, end: int):
    while start < end:
        tag, valueStart, valueEnd = _tlv(data, start)
        yield tag, valueStart, valueEnd
        start = valueEnd


def _oid(value: bytes) -> str:
    if not value:
        raise ValueError("empty OID")
    arcs = [min(value[0] // 40, 2), value[0] - 40 * min(value[0] // 40, 2)]
    current = 0
    for byte in value[1:]:
        current = (current << 7) | (byte & 0x7F)
        if not byte & 0x80:
            arcs.append(current)
            current = 0
    return ".".join(map(str, arcs))


def _name(data: bytes, start: int, end: int) -> str:
    """An RDN sequence as C{O=proxygate, CN=proxygate CA} (in DER order, as OpenSSL prints)."""
    parts = []
    for _, setStart, setEnd in _children(data, start, end):
        for _, attrStart, attrEnd in _children(data, setStart, setEnd):
            (_, oidStart, oidEnd), (tag, valueStart, valueEnd) = list(
                _children(data, attrStart, attrEnd)
            )[:2]
            oid = _oid(data[oidStart:oidEnd])
            raw = data[valueStart:valueEnd]
            value = raw.decode(_STRINGS.get(tag, "latin-1"), "replace")
            parts.append(f"{_ATTRIBUTES.get(oid, oid)}={value}")
    return ", ".join(parts)


def certificateNames(der: bytes) -> CertificateNames:
    """The issuer and subject names of a DER certificate (ValueError when it is not one)."""
    _, certStart, _ = _tlv(der, 0)
    _, tbsStart, tbsEnd = _tlv(der, certStart)
    fields = list(_children(der, tbsStart, tbsEnd))
    if fields and fields[0][0] == 0xA0:  # [0] EXPLICIT version
        fields = fields[1:]
    # serialNumber, signature, issuer, validity, subject
    if len(fields) < 5:
        raise ValueError("not a certificate")
    issuer, subject = fields[2], fields[4]
    return CertificateNames(_name(der, issuer[1], issuer[2]), _name(der, subject[1], subject[2]))


def fingerprint(der: bytes) -> str:
    """The SHA-256 fingerprint as OpenSSL prints it (AB:CD:...)."""
    return ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())


def pemCertificates(text: str) -> list[bytes]:
    """The DER certificates in a PEM text (other blocks are skipped)."""
    out = []
    begin, end = "-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----"
    start = text.find(begin)
    while start != -1:
        stop = text.find(end, start)
        if stop == -1:
            break
        try:
            out.append(ssl.PEM_cert_to_DER_cert(text[start : stop + len(end)]))
        except ValueError:
            pass
        start = text.find(begin, stop)
    return out
