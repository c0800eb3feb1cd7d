# -*- test-case-name: tests.test_h2_fields -*-
"""
What RFC 9113 §8.2 and §8.3 require of a received header block, checked in one pass that
also takes it apart: the pseudo-header fields, content-length (which the connection checks
the DATA against), Host, and the other fields, cookies joined (§8.2.3).

 - names: lower case, tokens (RFC 9110 §5.1: what an HTTP/1.1 leg can carry, a little
   stricter than §8.2.1 asks), pseudo-header fields first, known, not repeated, none in
   trailers, the request ones in requests and :status in responses;
 - values: no NUL, CR or LF, no leading or trailing space or tab;
 - no connection-specific field (§8.2.2), TE only "trailers" (and dropped but in requests);
 - a request has :method, and :scheme and :path unless it is a CONNECT (§8.3.1), a
   non-empty :path, the same Host as :authority if both are there; a response a 3-digit
   :status; content-length values that agree.

A block that breaks one is malformed (L{Malformed}): a stream error, not a connection one
(§8.1.1). Names and short values seen to be valid are remembered (bounded): the fields of
a connection's requests are mostly the same objects, out of the HPACK tables, so checking
them again costs a lookup.
"""

from __future__ import annotations

import re

from .hpack import NeverIndexed

__all__ = ["Malformed", "requestHead", "responseHead", "trailerFields"]

Headers = list[tuple[bytes, bytes]]


class Malformed(ValueError):
    """A header block HTTP/2 forbids (RFC 9113 §8.1.1): the stream's PROTOCOL_ERROR."""


# What a name is, for the checks: regular fields are 0.
_REGULAR = 0
_METHOD = 1
_SCHEME = 2
_AUTHORITY = 3
_PATH = 4
_PROTOCOL = 5
_STATUS = 6
_FORBIDDEN = 7
_TE = 8
_LENGTH = 9
_HOST = 10
_COOKIE = 11
_PSEUDO = 12  # an unknown pseudo-header field
_CONTENT_TYPE = 13

_SPECIAL = {
    b":method": _METHOD,
    b":scheme": _SCHEME,
    b":authority": _AUTHORITY,
    b":path": _PATH,
    b":protocol": _PROTOCOL,
    b":status": _STATUS,
    b"connection": _FORBIDDEN,
    b"proxy-connection": _FORBIDDEN,
    b"keep-alive": _FORBIDDEN,
    b"transfer-encoding": _FORBIDDEN,
    b"upgrade": _FORBIDDEN,
    b"te": _TE,
    b"content-length": _LENGTH,
    b"host": _HOST,
    b"cookie": _COOKIE,
    b"content-type": _CONTENT_TYPE,
}

_TOKEN = re.compile(rb"[a-z0-9!#$%&'*+\-.^_`|~]+").fullmatch
_BAD_VALUE = re.compile(rb"[\x00\r\n]").search

#: Names and values seen to be valid; bounded (emptied when full).
_names: dict[bytes, int] = dict(_SPECIAL)
_values: set[bytes] = set()
_NAMES_KEPT = 4096
_VALUES_KEPT = 4096
_VALUE_LONGEST = 256


def _kind(name: bytes) -> int:
    """What C{name} is, for a name not seen before; raises L{Malformed} for an invalid one."""
    if name[:1] == b":":
        kind = _PSEUDO
    elif _TOKEN(name) is not None:
        kind = _REGULAR
    elif not name:
        raise Malformed("an empty field name")
    elif name.lower() != name:
        raise Malformed(f"an upper-case field name {name[:64]!r}")
    else:
        raise Malformed(f"an invalid field name {name[:64]!r}")
    if len(_names) >= _NAMES_KEPT:
        _names.clear()
        _names.update(_SPECIAL)
    _names[name] = kind
    return kind


def _checkValue(value: bytes) -> None:
    if _BAD_VALUE(value) is not None:
        raise Malformed("a field value with NUL, CR or LF")
    if value[0] in (0x20, 0x09) or value[-1] in (0x20, 0x09):
        raise Malformed("a field value with leading or trailing whitespace")
    if len(value) <= _VALUE_LONGEST:
        if len(_values) >= _VALUES_KEPT:
            _values.clear()
        _values.add(value)


def _split(
    headers: Headers, pseudo: dict[int, bytes], request: bool
) -> tuple[Headers, int, bytes | None, bytes]:
    """
    The one pass: C{pseudo} gets the pseudo-header fields (by kind); the regular fields
    come back without content-length and Host (and TE but in a C{request}: it means
    nothing elsewhere), cookies joined, with content-length (-1: none), Host (None: none)
    and content-type (empty: none).
    """
    fields: Headers = []
    append = fields.append
    names = _names
    values = _values
    length = -1
    host = None
    contentType = b""
    cookies = None
    cookieAt = 0
    regular = False
    for field in headers:
        name, value = field
        kind = names.get(name)
        if kind is None:
            kind = _kind(name)
        if value and value not in values:
            _checkValue(value)
        if kind == _REGULAR:
            regular = True
            append(field)
            continue
        if kind < _FORBIDDEN or kind == _PSEUDO:
            if regular:
                raise Malformed(f"the pseudo-header field {name!r} after a regular one")
            if kind == _PSEUDO:
                raise Malformed(f"an unknown pseudo-header field {name[:64]!r}")
            if kind in pseudo:
                raise Malformed(f"a repeated {name.decode()}")
            pseudo[kind] = value
            continue
        regular = True
        if kind == _CONTENT_TYPE:
            contentType = value
            append(field)
        elif kind == _COOKIE:
            if cookies is None:
                cookies = [field]
                cookieAt = len(fields)  # where the joined field goes, should others come
                append(field)
            else:
                cookies.append(field)
        elif kind == _LENGTH:
            if not value.isdigit() or len(value) > 18:
                raise Malformed("an invalid content-length")
            if length >= 0 and int(value) != length:
                raise Malformed("content-length values that disagree")
            length = int(value)
        elif kind == _HOST:
            if host is not None:
                raise Malformed("a repeated host")
            host = value
        elif kind == _TE:
            if value.lower() != b"trailers":
                raise Malformed("TE other than trailers")
            if request:
                append(field)
        else:
            raise Malformed(f"the connection-specific field {name.decode()}")
    if cookies is not None and len(cookies) > 1:
        joined = b"; ".join([value for _, value in cookies])
        secret = any(field.__class__ is NeverIndexed for field in cookies)
        fields[cookieAt] = NeverIndexed((b"cookie", joined)) if secret else (b"cookie", joined)
    return fields, length, host, contentType


def requestHead(
    headers: Headers,
) -> tuple[bytes, bytes | None, bytes | None, bytes | None, Headers, int, bytes | None]:
    """
    A request's header block taken apart: (method, scheme, authority, path, fields,
    content-length or -1, host). @raise Malformed: see the module's docstring.
    """
    pseudo: dict[int, bytes] = {}
    fields, length, host, _ = _split(headers, pseudo, True)
    method = pseudo.get(_METHOD)
    scheme = pseudo.get(_SCHEME)
    path = pseudo.get(_PATH)
    authority = pseudo.get(_AUTHORITY)
    if _STATUS in pseudo:
        raise Malformed("a request with :status")
    if method is None:
        raise Malformed("a request without :method")
    if method == b"CONNECT" and _PROTOCOL not in pseudo:
        if scheme is not None or path is not None:
            raise Malformed("a CONNECT with :scheme or :path")
        if authority is None:
            raise Malformed("a CONNECT without :authority")
    else:
        if _PROTOCOL in pseudo and method != b"CONNECT":
            raise Malformed(":protocol in a request other than CONNECT")
        if scheme is None or path is None:
            raise Malformed("a request without :scheme or :path")
        if not path:
            raise Malformed("an empty :path")
    if host is not None and authority is not None and host != authority:
        raise Malformed("a host that is not the :authority")
    return method, scheme, authority, path, fields, length, host


def responseHead(headers: Headers) -> tuple[int, Headers, int, bytes]:
    """
    A response's header block taken apart: (status, fields, content-length or -1,
    content-type or empty).
    @raise Malformed: see the module's docstring.
    """
    pseudo: dict[int, bytes] = {}
    fields, length, host, contentType = _split(headers, pseudo, False)
    status = pseudo.pop(_STATUS, None)
    if pseudo:
        raise Malformed("a response with a request's pseudo-header field")
    if status is None or len(status) != 3 or not status.isdigit() or status[0] == 0x30:
        raise Malformed("a response without a valid :status")
    if host is not None:
        fields.append((b"host", host))
    return int(status), fields, length, contentType


def trailerFields(headers: Headers) -> Headers:
    """
    Trailers' fields (content-length and Host dropped: nothing they could mean there).
    @raise Malformed: a pseudo-header field, or what the module's docstring says.
    """
    pseudo: dict[int, bytes] = {}
    fields = _split(headers, pseudo, False)[0]
    if pseudo:
        raise Malformed("a pseudo-header field in trailers")
    return fields
