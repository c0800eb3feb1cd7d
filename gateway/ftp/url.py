# -*- test-case-name: tests.test_ftp -*-
"""
ftp:// URLs as HTTP proxy clients send them (RFC 1738 §3.2): C{GET
ftp://[user[:password]@]host[:port]/dir/file;type=i HTTP/1.1}. Pure functions.

The path is a list of directories to change into, one C{CWD} each, and a last segment
(the file, or empty for a directory listing), each percent-decoded to bytes and sent on
the control connection as those bytes. CR, LF and NUL would end or cut an FTP command
(a second command smuggled into the control connection): they are refused (400), as are
more than L{MAX_SEGMENTS} segments. C{;type=a} (ASCII), C{;type=i} (binary, the default)
and C{;type=d} (a listing of names, NLST) may end the path. A path starting C{//} is
absolute (C{CWD /} first), as curl reads it.
"""

from __future__ import annotations

from urllib.parse import unquote_to_bytes

from attrs import field, frozen

from ..http1.headers import parseAuthority
from ..http1.parse import HTTPError

__all__ = [
    "DEFAULT_PORT",
    "MAX_SEGMENTS",
    "Credentials",
    "FTPPath",
    "FTPTarget",
    "parseFTPPath",
    "parseFTPTarget",
]

DEFAULT_PORT = 21
#: More directories than any real tree has; each is one command on the control connection.
MAX_SEGMENTS = 64
_TYPES = {b"a": "a", b"i": "i", b"d": "d"}


@frozen(repr=False)
class Credentials:
    """
    A login, as bytes held in latin-1 characters (what goes on the wire after USER and
    PASS). Its repr never shows the password.
    """

    user: str
    password: str = field(default="")

    def __repr__(self) -> str:
        return f"Credentials(user={self.user!r}, password=<hidden>)"


#: What browsers and Squid send when a URL has no user: the password is by convention
#: an e-mail address, and proxygate has none to give.
ANONYMOUS = Credentials("anonymous", "proxygate@")


@frozen
class FTPPath:
    """
    What to fetch: C{directories} to change into in order (C{"/"} first for an absolute
    path), then C{name}: a file, or C{""} for a listing of the last directory. C{type}
    is C{"a"}, C{"i"} or C{"d"} from C{;type=}, or None. Strings hold the decoded bytes
    as latin-1 characters, which Twisted's FTP client writes back as the same bytes.
    """

    directories: tuple[str, ...]
    name: str
    type: str | None = None

    @property
    def listing(self) -> bool:
        return self.name == "" or self.type == "d"

    def shown(self) -> str:
        """The path for messages: decoded, control characters escaped."""
        parts = [*self.directories, self.name]
        text = "/".join(parts)
        if not text.startswith("/"):
            text = "/" + text
        return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)[:200]


def parseFTPPath(path: bytes) -> FTPPath:
    """
    The path part of an ftp:// URL (from its first C{/}, C{b"/"} when empty).

    @raise HTTPError: 400 for CR, LF or NUL in a segment, a bad C{;type=}, or too many
        segments.
    """
    if not path:
        path = b"/"
    if not path.startswith(b"/"):
        raise HTTPError(400, "an ftp:// path must start with '/'")
    kind = None
    head, sep, params = path.rpartition(b";")
    if sep and b"/" not in params:
        name, equals, value = params.partition(b"=")
        if name.lower() != b"type" or not equals or value.lower() not in _TYPES:
            raise HTTPError(400, "invalid ;type= in the ftp:// URL (a, i or d)")
        kind = _TYPES[value.lower()]
        path = head
    raw = path.split(b"/")[1:]
    absolute = len(raw) > 1 and raw[0] == b""
    segments = [_decode(segment) for segment in raw]
    if len(segments) > MAX_SEGMENTS:
        raise HTTPError(400, "too many segments in the ftp:// path")
    *directories, name = segments
    directories = [d for d in directories if d]
    if absolute:
        directories.insert(0, "/")
    if kind == "d" and name:
        directories.append(name)
        name = ""
    return FTPPath(tuple(directories), name, kind)


def _decode(segment: bytes) -> str:
    decoded = unquote_to_bytes(segment)
    if b"\r" in decoded or b"\n" in decoded or b"\x00" in decoded:
        raise HTTPError(400, "CR, LF or NUL in the ftp:// path")
    return decoded.decode("latin-1")


@frozen(repr=False)
class FTPTarget:
    """
    An absolute ftp:// request target: where to connect, as whom, and the path (raw, as
    the request carried it, for L{parseFTPPath} and logs). C{authority} and L{url} never
    hold the credentials.
    """

    host: str
    port: int
    authority: bytes
    path: bytes
    credentials: Credentials | None = None

    def url(self) -> str:
        """The URL for logs: no credentials."""
        authority = self.authority.decode("ascii", "replace")
        return f"ftp://{authority}{self.path.decode('ascii', 'replace')}"

    def __repr__(self) -> str:
        return f"<FTPTarget {self.url()}{' with credentials' if self.credentials else ''}>"


def parseFTPTarget(target: bytes) -> FTPTarget:
    """
    Read C{ftp://[user[:password]@]host[:port]/path} (the scheme in any case).

    @raise HTTPError: 400 for anything that is not such a URL (the host as strictly as
        for http://, see L{parseAuthority}), and for a path L{parseFTPPath} refuses.
    """
    if target[:6].lower() != b"ftp://":
        raise HTTPError(400, "not an ftp:// URL")
    rest = target[6:]
    slash = rest.find(b"/")
    authority, path = (rest, b"/") if slash < 0 else (rest[:slash], rest[slash:])
    if b"?" in authority or b"#" in authority:
        raise HTTPError(400, "invalid ftp:// authority")
    credentials = None
    if b"@" in authority:
        userinfo, _, authority = authority.rpartition(b"@")
        user, _, password = userinfo.partition(b":")
        decodedUser, decodedPassword = unquote_to_bytes(user), unquote_to_bytes(password)
        if not decodedUser or any(c in decodedUser + decodedPassword for c in b"\r\n\x00"):
            raise HTTPError(400, "invalid user name or password in the ftp:// URL")
        # The bytes as they were percent-encoded (UTF-8 from curl and browsers), held as
        # latin-1 characters: Twisted's FTP client writes them back as the same bytes.
        credentials = Credentials(decodedUser.decode("latin-1"), decodedPassword.decode("latin-1"))
    host, port = parseAuthority(authority, DEFAULT_PORT)
    parseFTPPath(path)  # refuse now what the fetch would refuse
    shownAuthority = authority.lower()
    if port == DEFAULT_PORT and shownAuthority.endswith((b":21", b":")):
        shownAuthority = shownAuthority[: shownAuthority.rfind(b":")]
    return FTPTarget(host, port, shownAuthority, path, credentials)
