# -*- test-case-name: tests.test_inbound_rewrite -*-
"""
What a backend sees of a request and what a client sees of a response, on the wire-neutral
field lists of L{gateway.message} (lists of (name, value) bytes pairs, hop-by-hop
fields already removed by the side that read them).

Request (L{RequestRewriter}):

- C{Host} is not a field here: the exchange keeps the client's authority (port included),
  and the backend's side writes it as C{Host}.
- Forwarding fields are the gateway's own. An edge gateway cannot tell a client's
  C{X-Forwarded-For} from a forged one, so every client copy of the forwarding family
  (C{X-Forwarded-*}, C{Forwarded}, C{X-Real-IP}, C{X-Scheme}...) is dropped and the
  gateway sets C{X-Forwarded-For} (the client address it sees; behind a load balancer, the
  PROXY protocol makes that the real client), C{-Proto}, C{-Host}, C{-Port} (the Host's
  port, else the scheme's default), and C{-Prefix} when the prefix was stripped.
- Identity fields are the gateway's own too: every client copy of C{user_header} and of the
  identity headers apps and auth proxies use (L{IDENTITY_FIELDS}) is dropped, with their
  underscore spellings (CGI and WSGI read C{Remote_User} as C{Remote-User}); with edge auth
  the authenticated user goes in C{user_header}, and the client's C{Authorization} (the
  gateway's own credentials) does not travel on.
- C{request_headers} lines come last, with their placeholders filled in, and replace any
  field of the same name the client or the gateway set (so
  C{X-Forwarded-Proto: https} in the INI wins when TLS ends in front of the gateway).

Response (L{ResponseRewriter}): with C{rewrite_location}, a C{Location}, C{Content-Location}
or C{Refresh} URL that names a backend of the route (C{http://127.0.0.1:8787/x}, as nginx's
C{proxy_redirect default} recognises it) becomes the public URL
(C{https://apps.example.com/rstudio/x}). Relative URLs are left alone: they already resolve
against the public URL. The sticky cookie is added as C{Set-Cookie}.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from attrs import frozen

from ..http1.headers import HOP_BY_HOP
from ..message import Fields, bracketed
from .balance import BackendURL

__all__ = [
    "FORWARDING_FIELDS",
    "IDENTITY_FIELDS",
    "HeaderTemplate",
    "RequestRewriter",
    "ResponseRewriter",
    "forwardedPort",
    "parseRequestHeaders",
]

#: Fields that tell a backend where a request came from. A client's copies are lies until
#: proven otherwise; the gateway sets its own.
FORWARDING_FIELDS = frozenset(
    {
        b"forwarded",  # RFC 7239
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-forwarded-port",
        b"x-forwarded-prefix",  # Traefik's StripPrefix, Werkzeug's ProxyFix, Spring
        b"x-forwarded-server",
        b"x-forwarded-ssl",  # Rack, Django SECURE_PROXY_SSL_HEADER setups
        b"x-forwarded-scheme",
        b"x-real-ip",  # nginx's realip convention
        b"x-scheme",  # Tornado (Jupyter) reads it like X-Forwarded-Proto
        b"x-url-scheme",
        b"front-end-https",
        b"x-rstudio-root-path",  # Posit: the prefix; only request_headers may set it
        b"x-rsc-request",  # Posit Connect: the original URL
    }
)

#: Identity headers that apps trust from an authenticating proxy, gathered from their docs.
#: Whatever the route's user_header is, a client must not be able to send any of these.
IDENTITY_FIELDS = frozenset(
    {
        b"remote-user",  # Apache REMOTE_USER, JupyterHub's REMOTE_USER authenticators
        b"x-remote-user",
        b"remote-email",  # Authelia
        b"remote-groups",
        b"remote-name",
        b"x-forwarded-user",  # oauth2-proxy, proxygate's default user_header
        b"x-forwarded-email",
        b"x-forwarded-groups",
        b"x-forwarded-preferred-username",
        b"x-forwarded-access-token",
        b"x-auth-request-user",  # oauth2-proxy with nginx auth_request
        b"x-auth-request-email",
        b"x-auth-request-groups",
        b"x-auth-request-preferred-username",
        b"x-auth-request-access-token",
        b"x-auth-username",  # Posit Connect ProxyAuth default
        b"x-auth-user",
        b"x-auth-email",
        b"x-auth-groups",
        b"x-rstudio-username",  # Posit Workbench auth-proxy
        b"x-rstudio-user",
        b"x-webauth-user",  # Grafana auth.proxy default
        b"x-webauth-email",
        b"x-webauth-groups",
        b"x-authenticated-user",
        b"x-authenticated-userid",
        b"x-user",
        b"x-username",
        b"x-email",
        b"x-remote-email",
        b"x-remote-group",
        b"x-ms-client-principal-name",  # Azure App Service authentication
        b"x-ms-client-principal-id",
        b"x-goog-authenticated-user-email",  # Google IAP
        b"x-goog-authenticated-user-id",
        b"cf-access-authenticated-user-email",  # Cloudflare Access
    }
)

_PLACEHOLDERS = ("prefix", "scheme", "host", "url")
_TEMPLATE = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
#: Names a request_headers line may not set: the side frames the message and writes Host.
_RESERVED = HOP_BY_HOP | {b"host", b"content-length", b"transfer-encoding"}
_DEFAULT_PORTS = {"http": b"80", "https": b"443"}
#: The longest field name or Host a rewriter remembers: longer ones are worked out each time.
_KEPT = 256


@frozen
class HeaderTemplate:
    """One C{request_headers} line: a field name and its value, in parts."""

    name: bytes
    #: literal bytes and placeholder names (str), in order
    parts: tuple[bytes | str, ...]

    def render(self, values: dict[str, bytes]) -> bytes:
        return b"".join(p if isinstance(p, bytes) else values[p] for p in self.parts)


def checkFieldName(name: str, what: str) -> bytes:
    """A field name a route may set (user_header, request_headers); ValueError if not."""
    if not _TOKEN.fullmatch(name):
        raise ValueError(f"invalid {what} {name!r}: a header name is letters, digits and -_.")
    lower = name.lower().encode("ascii")
    if lower in _RESERVED or lower.replace(b"_", b"-") in _RESERVED:
        raise ValueError(f"{what} {name!r}: the gateway writes that header itself")
    return name.encode("ascii")


def parseRequestHeaders(text: str) -> tuple[HeaderTemplate, ...]:
    """
    Read C{request_headers}: one C{Name: value} per line, values with C{{prefix}},
    C{{scheme}}, C{{host}} and C{{url}} (C{{{}} and C{}}} for literal braces).

    @raise ValueError: with a one-line problem naming the line.
    """
    templates = []
    seen: set[bytes] = set()
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        name, colon, value = line.partition(":")
        if not colon:
            raise ValueError(f"line {line!r}: expected 'Name: value'")
        nameBytes = checkFieldName(name.strip(), "header name")
        if nameBytes.lower() in seen:
            raise ValueError(f"header {name.strip()!r} is set twice")
        seen.add(nameBytes.lower())
        value = value.strip()
        if not value.isascii() or not value.isprintable():
            raise ValueError(f"header {name.strip()!r}: the value must be printable ASCII")
        parts: list[bytes | str] = []
        for literal, match in _split(value):
            if literal and parts and isinstance(parts[-1], bytes):
                parts[-1] += literal.encode("ascii")
            elif literal:
                parts.append(literal.encode("ascii"))
            if match is None:
                continue
            if match not in _PLACEHOLDERS:
                known = " ".join("{" + p + "}" for p in _PLACEHOLDERS)
                raise ValueError(
                    f"header {name.strip()!r}: unknown placeholder {{{match}}} (use {known}, "
                    "or {{ and }} for braces)"
                )
            parts.append(match)
        templates.append(HeaderTemplate(nameBytes, tuple(parts)))
    return tuple(templates)


def _split(value: str):
    """(literal text, placeholder name or None) pairs of a template value."""
    position = 0
    for m in _TEMPLATE.finditer(value):
        literal = value[position : m.start()]
        token = m.group(0)
        position = m.end()
        if token == "{{":
            yield literal + "{", None
        elif token == "}}":
            yield literal + "}", None
        elif m.group(1) is not None:
            yield literal, m.group(1)
        else:
            raise ValueError(f"unmatched {token!r} in {value!r} (write {token * 2} for a brace)")
    yield value[position:], None


def forwardedPort(authority: bytes, scheme: str) -> bytes:
    """The port the client connected to, as X-Forwarded-Port says it: Host's, or the default."""
    close = authority.rfind(b"]")
    colon = authority.rfind(b":")
    if colon > close and authority[colon + 1 :].isdigit():
        return authority[colon + 1 :]
    return _DEFAULT_PORTS.get(scheme, b"80")


def _normalName(name: bytes) -> bytes:
    return name.lower().replace(b"_", b"-")


class RequestRewriter:
    """
    The request fields of one route, built once per route (the drop set and the templates
    are computed here, not per request).

    @param userHeader: where the authenticated user goes (None: nowhere).
    @param templates: the route's C{request_headers}.
    @param edgeAuth: the route authenticates: its C{Authorization} is the gateway's.
    """

    def __init__(
        self,
        userHeader: bytes | None,
        templates: Sequence[HeaderTemplate] = (),
        edgeAuth: bool = False,
    ) -> None:
        self.userHeader = userHeader
        self.templates = tuple(templates)
        drop = set(FORWARDING_FIELDS | IDENTITY_FIELDS)
        if userHeader:
            drop.add(_normalName(userHeader))
        drop.update(_normalName(t.name) for t in self.templates)
        if edgeAuth:
            drop.add(b"authorization")
        self._drop = frozenset(drop)
        # The forwarding fields a request_headers line sets instead of the gateway.
        self._overridden = frozenset(_normalName(t.name) for t in self.templates)
        self._verdicts: dict[bytes, bool] = {}  # field spelling -> dropped
        self._forwarding: dict[tuple, Fields] = {}  # (client, scheme, Host, prefix) -> fields

    def fields(
        self,
        fields: Fields,
        *,
        client: str,
        scheme: str,
        authority: bytes,
        prefix: bytes = b"",
        stripped: bytes | None = None,
        publicTarget: bytes = b"/",
        user: str | None = None,
    ) -> Fields:
        """
        The fields to send to the backend.

        @param fields: the request's end-to-end fields, as received.
        @param client: the client's address (after a PROXY header).
        @param scheme: the listener's scheme: C{"http"} or C{"https"}.
        @param authority: the client's Host (port included).
        @param prefix: the route's public prefix (C{{prefix}}; C{b""} for the root).
        @param stripped: the prefix stripped from the path (X-Forwarded-Prefix), or None.
        @param publicTarget: the path and query the client asked for (C{{url}}).
        @param user: the user edge auth verified, or None.
        """
        verdicts = self._verdicts
        out = []
        for field in fields:
            dropped = verdicts.get(field[0])
            if dropped is None:
                dropped = self._dropped(field[0])
            if not dropped:
                out.append(field)
        schemeBytes = scheme.encode("ascii")
        key = (client, scheme, authority, stripped)
        forwarding = self._forwarding.get(key)
        if forwarding is None:
            # The same for every request of a connection: made once, kept (bounded).
            forwarding = [
                (b"X-Forwarded-For", client.encode("ascii", "replace")),
                (b"X-Forwarded-Proto", schemeBytes),
                (b"X-Forwarded-Host", authority),
                (b"X-Forwarded-Port", forwardedPort(authority, scheme)),
            ]
            if stripped is not None:
                forwarding.append((b"X-Forwarded-Prefix", stripped))
            if self._overridden:
                forwarding = [f for f in forwarding if f[0].lower() not in self._overridden]
            if len(authority) <= _KEPT:
                if len(self._forwarding) >= 1024:
                    self._forwarding.clear()
                self._forwarding[key] = forwarding
        out += forwarding
        if user is not None and self.userHeader:
            value = user.encode("utf-8")
            # htpasswd names cannot hold these, but a field value must never be able to.
            if not any(c < 0x20 or c == 0x7F for c in value):
                out.append((self.userHeader, value))
        if self.templates:
            values = {
                "prefix": prefix,
                "scheme": schemeBytes,
                "host": authority,
                "url": schemeBytes + b"://" + authority + publicTarget,
            }
            for template in self.templates:
                out.append((template.name, template.render(values)))
        return out

    def _dropped(self, name: bytes) -> bool:
        verdict = self._verdicts.get(name)
        if verdict is None:
            verdict = _normalName(name) in self._drop
            if len(name) <= _KEPT:  # what clients send must not fill memory
                if len(self._verdicts) >= 1024:
                    self._verdicts.clear()
                self._verdicts[name] = verdict
        return verdict


_LOCATION_FIELDS = frozenset({b"location", b"content-location"})
_REFRESH = re.compile(
    rb"(?P<head>\s*[0-9.]+\s*[;,]\s*(?:url\s*=\s*)?)(?P<quote>['\"]?)(?P<url>.*?)(?P=quote)(?P<tail>\s*)",
    re.IGNORECASE | re.DOTALL,
)
_LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


class ResponseRewriter:
    """
    The response fields of one route: backend URLs in Location, Content-Location and
    Refresh made public (when C{rewrite} is on), and the sticky cookie.

    @param backends: the route's backends: a URL naming any of them is rewritten (the
        answering backend may name another, and a loopback backend may call itself
        C{localhost}).
    """

    def __init__(self, backends: Sequence[BackendURL], rewrite: bool = True) -> None:
        self.rewrite = rewrite
        origins: set[bytes] = set()
        for backend in backends:
            hosts = {backend.host}
            if backend.host in _LOOPBACK_NAMES or backend.host.startswith("127."):
                hosts |= _LOOPBACK_NAMES
            for host in hosts:
                shown = bracketed(host)
                ports = [f":{backend.port}"]
                if backend.port == (80 if backend.scheme == "http" else 443):
                    ports.append("")
                for port in ports:
                    origins.add(f"{backend.scheme}://{shown}{port}".encode("ascii"))
        self._origins = origins

    def fields(
        self,
        fields: Fields,
        *,
        scheme: str,
        authority: bytes,
        prefix: bytes = b"",
        setCookie: bytes | None = None,
    ) -> Fields:
        """
        The fields to send to the client. C{prefix} is what the backend does not see of the
        public path (the stripped prefix, else C{b""}). The list is returned as it is when
        nothing changes (almost every response).
        """
        if self.rewrite:
            public = scheme.encode("ascii") + b"://" + authority + prefix
            changed = None
            for index, (name, value) in enumerate(fields):
                if len(name) not in (7, 8, 16):  # Refresh, Location, Content-Location
                    continue
                lower = name.lower()
                if lower in _LOCATION_FIELDS:
                    new = self._url(value, public)
                elif lower == b"refresh":
                    new = self._refresh(value, public)
                else:
                    continue
                if new is not value:
                    if changed is None:
                        changed = list(fields)
                    changed[index] = (name, new)
            if changed is not None:
                fields = changed
        if setCookie is not None:
            fields = [*fields, (b"Set-Cookie", setCookie)]
        return fields

    def _url(self, url: bytes, public: bytes) -> bytes:
        """C{url} with a backend origin replaced by C{public}, or C{url} itself."""
        scheme, sep, rest = url.partition(b"://")
        if not sep:
            return url
        end = len(rest)
        for delimiter in (b"/", b"?", b"#"):
            i = rest.find(delimiter)
            if 0 <= i < end:
                end = i
        origin = scheme.lower() + b"://" + rest[:end].lower()
        if origin not in self._origins:
            return url
        tail = rest[end:]
        if not tail.startswith(b"/"):
            tail = b"/" + tail
        return public + tail

    def _refresh(self, value: bytes, public: bytes) -> bytes:
        m = _REFRESH.fullmatch(value)
        if m is None:
            return value
        url = self._url(m.group("url"), public)
        if url is m.group("url"):
            return value
        quote = m.group("quote")
        return m.group("head") + quote + url + quote + m.group("tail")
