# -*- test-case-name: tests.test_ftp -*-
"""
FTP replies in HTTP terms, and the few FTP replies whose content matters. Pure functions.

What a client of the HTTP proxy gets for an ftp:// URL:

================================================  =======================================
the FTP server says                               the client gets
================================================  =======================================
530/532 to USER or PASS (login refused)           401 with C{WWW-Authenticate: Basic
                                                  realm="FTP host"}
550 to CWD, SIZE or RETR (no such file or         404
directory, or not readable)
421 (closing), 425/426 (data connection), any     502 with the server's reply (sanitised)
other 4xx/5xx, a malformed or unexpected reply,
a PASV/EPSV reply that is malformed or names a
port outside ftp_data_ports
no reply, or no data, within the timeout          504
================================================  =======================================

Why 401 rather than 403 for a refused login: the credentials are the client's to change
(the URL's user and password, or an Authorization field, as Squid and browsers do for
FTP), and 401 with a challenge is how HTTP asks for them; 403 would say no credentials can
help. Why 404 for every 550: the server does not say whether the file is missing or
unreadable, and a client cannot tell either apart.

Directory listings are sent as the server's own listing (C{LIST}, or C{NLST} for
C{;type=d}), as C{text/plain; charset=utf-8} with LF line ends: the lines a user of C{curl
ftp://} or an FTP client sees, which scripts (R's C{download.file}, shell tools) can parse,
streamed however long the directory. Not HTML: a page built from file names an FTP server
chose needs careful escaping (script in a name), and Squid's HTML listings have a history
of parser bugs (CVE-2026-47729, an over-read leaking other users' data); text needs
neither. RFC 2640 makes UTF-8 the encoding of FTP names.
"""

from __future__ import annotations

import mimetypes
import re

__all__ = [
    "ListingText",
    "PassiveReplyError",
    "contentType",
    "parsePassivePort",
    "replyCode",
    "replyText",
    "statusFor",
]


class PassiveReplyError(ValueError):
    """A PASV or EPSV reply proxygate will not connect to."""


def replyCode(lines: list[str]) -> int:
    """The code of a reply (its last line starts with it), 0 when there is none."""
    last = lines[-1] if lines else ""
    return int(last[:3]) if last[:3].isdigit() else 0


def replyText(lines: list[str], limit: int = 200) -> str:
    """A reply for a message to the client or the log: one line, printable, bounded."""
    text = " ".join(line.strip() for line in lines)
    text = "".join(c if c.isprintable() else " " for c in text)
    return text[:limit] + ("..." if len(text) > limit else "")


def statusFor(code: int, stage: str) -> int:
    """
    The HTTP status for an FTP failure reply C{code} to a command of C{stage}: "login"
    (USER, PASS, the greeting), "path" (CWD, SIZE, RETR, LIST) or "other".
    """
    if stage == "login" and code in (530, 532, 331, 332):
        return 401
    if stage == "path" and code == 550:
        return 404
    return 502


_PASV = re.compile(r"\(?\s*(\d{1,3}),(\d{1,3}),(\d{1,3}),(\d{1,3}),(\d{1,3}),(\d{1,3})\s*\)?")
_EPSV = re.compile(r"\(([!-~])\1\1(\d{1,5})\1\)")


def parsePassivePort(lines: list[str]) -> int:
    """
    The data port of a 227 (PASV, RFC 959) or 229 (EPSV, RFC 2428) reply.

    Only the port is taken: the address of a PASV reply is ignored, since the data
    connection goes to the control connection's address (a PASV reply naming another
    host is the FTP bounce, an SSRF through the proxy). The numbers must be in range.

    @raise PassiveReplyError: for any other reply, or numbers out of range.
    """
    code = replyCode(lines)
    last = lines[-1] if lines else ""
    if code == 229:
        match = _EPSV.search(last)
        if match is None:
            raise PassiveReplyError(f"malformed EPSV reply: {replyText(lines, 80)}")
        port = int(match.group(2))
    elif code == 227:
        match = _PASV.search(last[4:])
        if match is None:
            raise PassiveReplyError(f"malformed PASV reply: {replyText(lines, 80)}")
        numbers = [int(n) for n in match.groups()]
        if any(n > 255 for n in numbers):
            raise PassiveReplyError(f"PASV reply out of range: {replyText(lines, 80)}")
        port = numbers[4] << 8 | numbers[5]
    else:
        raise PassiveReplyError(f"not a passive mode reply: {replyText(lines, 80)}")
    if not 0 < port < 65536:
        raise PassiveReplyError(f"passive data port {port} out of range")
    return port


LISTING_TYPE = b"text/plain; charset=utf-8"


class ListingText:
    """
    A listing as text/plain, streamed: the server's lines (CRLF on the wire, RFC 959's
    ASCII form) with LF ends, as C{curl ftp://host/dir/} prints them and as line-reading
    scripts expect. A CR split from its LF across two reads is held back until the next.
    """

    __slots__ = ("_held",)

    def __init__(self) -> None:
        self._held = b""

    def feed(self, data: bytes) -> bytes:
        data = self._held + data
        self._held = b""
        if data.endswith(b"\r"):
            data, self._held = data[:-1], b"\r"
        return data.replace(b"\r\n", b"\n")

    def flush(self) -> bytes:
        held, self._held = self._held, b""
        return held


#: What an unknown file is: bytes (never guessed from its content).
BINARY_TYPE = b"application/octet-stream"


def contentType(name: str, ascii: bool = False) -> bytes:
    """The Content-Type of a file: from its extension, text/plain for ;type=a."""
    if ascii:
        return b"text/plain"
    guessed, encoding = mimetypes.guess_type(name, strict=True)
    if guessed is None or encoding is not None:
        # foo.tar.gz is a gzip file to a client, not a tar with Content-Encoding
        # (which a client would decode and store under the wrong name).
        return BINARY_TYPE if encoding is None else _ENCODED.get(encoding, BINARY_TYPE)
    return guessed.encode("ascii")


_ENCODED = {
    "gzip": b"application/gzip",
    "bzip2": b"application/x-bzip2",
    "xz": b"application/x-xz",
    "compress": b"application/x-compress",
    "br": b"application/x-brotli",
}
