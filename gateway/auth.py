"""
Proxy Basic authentication against an Apache htpasswd file.

Two layers, kept apart so the first can be tested without a reactor:

- pure logic: L{parseHtpasswd} turns file text into L{Verifier} values, and the password
  hashing schemes htpasswd writes (bcrypt, SHA-256/512-crypt, Apache MD5, {SHA}) are
  implemented or wrapped here;
- L{Authenticator}: the per-request check. It owns the loaded user table, a success cache
  (so the hot path is a dict lookup), a short failure cache, a bound on concurrent
  thread-pool verifications, and the reload logic (SIGHUP or a changed file).

Lessons from other proxies' CVEs are built in: the header is length-bounded before any
decoding, base64 is decoded strictly, the scheme is matched case-insensitively, credentials
are split on the first colon, digests are compared in constant time, and neither passwords
nor the header are ever logged or put into an exception message.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import bcrypt
from attrs import field, frozen
from twisted.internet.defer import Deferred, DeferredSemaphore, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = [
    "MAX_HEADER_LENGTH",
    "MAX_SHA_CRYPT_ROUNDS",
    "Authenticator",
    "HtpasswdError",
    "Verifier",
    "md5Crypt",
    "parseHtpasswd",
    "shaCrypt",
]

_log = Logger(namespace="gateway.auth")

#: A Proxy-Authorization value longer than this is refused before it is decoded or hashed
#: (Squid CVE-2023-46847: auth parsing is attack surface). Real Basic credentials are tiny.
MAX_HEADER_LENGTH = 8192

#: SHA-crypt files may ask for any number of rounds; this pure-Python implementation does
#: about a million rounds a second, so more than this would make every cache miss stall a
#: thread (and hold the GIL) for seconds. htpasswd's default is 5000.
MAX_SHA_CRYPT_ROUNDS = 1_000_000

#: bcrypt (crypt_blowfish, as used by Apache) only looks at the first 72 bytes of a password;
#: the bcrypt package >= 5 refuses longer input instead of truncating, so we truncate to match
#: what htpasswd -B stored.
_BCRYPT_MAX_PASSWORD = 72


class HtpasswdError(Exception):
    """
    An htpasswd file that cannot be used.

    The message is one line naming the file, the line number and the problem, so start-up
    can print it as is. It never contains a hash or a password: a start-up error ends up in
    logs and terminals that are less protected than the file itself.
    """

    def __init__(self, path: str, problem: str, lineNumber: int | None = None) -> None:
        self.path = path
        self.problem = problem
        self.lineNumber = lineNumber
        where = path if lineNumber is None else f"{path}: line {lineNumber}"
        super().__init__(f"{where}: {problem}")


# ---------------------------------------------------------------------------------------------
# crypt(3)-style hashing, pure Python


_CRYPT_ALPHABET = b"./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def _cryptBase64(data: bytes, groups: tuple[tuple[int, ...], ...]) -> str:
    """
    The crypt(3) base64 variant: each group of byte indices (most significant first) is
    packed into an integer and emitted six bits at a time, least significant first. Groups
    of three bytes give four characters; the final short group gives two or three.
    """
    out = bytearray()
    for group in groups:
        value = 0
        for index in group:
            value = (value << 8) | data[index]
        for _ in range(len(group) + 1):
            out.append(_CRYPT_ALPHABET[value & 0x3F])
            value >>= 6
    return out.decode("ascii")


# Byte orders from Ulrich Drepper's "Unix crypt using SHA-256 and SHA-512" specification
# (and, for MD5, from md5crypt.c): which digest bytes feed each group of output characters.
# fmt: off
_SHA256_ORDER = (
    (0, 10, 20), (21, 1, 11), (12, 22, 2), (3, 13, 23), (24, 4, 14), (15, 25, 5),
    (6, 16, 26), (27, 7, 17), (18, 28, 8), (9, 19, 29), (31, 30),
)
_SHA512_ORDER = (
    (0, 21, 42), (22, 43, 1), (44, 2, 23), (3, 24, 45), (25, 46, 4), (47, 5, 26),
    (6, 27, 48), (28, 49, 7), (50, 8, 29), (9, 30, 51), (31, 52, 10), (53, 11, 32),
    (12, 33, 54), (34, 55, 13), (56, 14, 35), (15, 36, 57), (37, 58, 16), (59, 17, 38),
    (18, 39, 60), (40, 61, 19), (62, 20, 41), (63,),
)
_MD5_ORDER = ((0, 6, 12), (1, 7, 13), (2, 8, 14), (3, 9, 15), (4, 10, 5), (11,))
# fmt: on

_SHA_CRYPT_DEFAULT_ROUNDS = 5000
_SHA_CRYPT_MIN_ROUNDS = 1000
_SHA_CRYPT_MAX_ROUNDS = 999_999_999
_SHA_CRYPT_SALT_MAX = 16
_SHA_CRYPT_SPEC = {
    "5": (hashlib.sha256, _SHA256_ORDER, 43),
    "6": (hashlib.sha512, _SHA512_ORDER, 86),
}


def _shaCryptDigest(password: bytes, salt: bytes, rounds: int, algorithm: Any) -> bytes:
    """
    The raw SHA-crypt digest (Drepper's steps 1-21), before encoding.

    The 42-round cycle of the main loop (lcm of 2, 3 and 7) is precomputed as pairs of
    prefix/suffix byte strings so each round is a single hash call: this keeps the pure-Python
    cost at well under a microsecond per round.
    """
    size = algorithm().digest_size
    length = len(password)
    alternate = algorithm(password + salt + password).digest()
    context = algorithm(password + salt)
    context.update(alternate * (length // size) + alternate[: length % size])
    bits = length
    while bits:
        context.update(alternate if bits & 1 else password)
        bits >>= 1
    digest = context.digest()

    passwordBytes = algorithm(password * length).digest()
    p = (passwordBytes * (length // size + 1))[:length]
    saltBytes = algorithm(salt * (16 + digest[0])).digest()
    s = (saltBytes * (len(salt) // size + 1))[: len(salt)]

    cycle = []
    for i in range(42):
        middle = (s if i % 3 else b"") + (p if i % 7 else b"")
        cycle.append((p + middle, b"") if i & 1 else (b"", middle + p))
    full, rest = divmod(rounds, 42)
    for _ in range(full):
        for prefix, suffix in cycle:
            digest = algorithm(prefix + digest + suffix).digest()
    for prefix, suffix in cycle[:rest]:
        digest = algorithm(prefix + digest + suffix).digest()
    return digest


_SHA_CRYPT_SETTING = re.compile(r"\$([56])\$(?:rounds=([0-9]{1,10})\$)?([^$:]*)(?:\$.*)?\Z", re.S)


def shaCrypt(password: bytes, setting: str) -> str:
    """
    SHA-256-crypt (C{$5$}) or SHA-512-crypt (C{$6$}) of C{password}, per Drepper's spec.

    C{setting} is a salt string such as C{"$5$rounds=10000$saltstring"} or a complete hash
    (anything after the salt is ignored, as crypt(3) does). As in the spec, salts are cut to
    16 characters and rounds are clamped to 1000..999999999; the result names the rounds only
    when the setting did. Exposed (rather than private) so the spec's published vectors can
    be checked directly.
    """
    match = _SHA_CRYPT_SETTING.match(setting)
    if match is None:
        raise ValueError("not a $5$ or $6$ setting")
    kind, roundsText, saltText = match.groups()
    algorithm, order, _ = _SHA_CRYPT_SPEC[kind]
    salt = saltText.encode("utf-8")[:_SHA_CRYPT_SALT_MAX]
    rounds = _SHA_CRYPT_DEFAULT_ROUNDS
    prefix = f"${kind}$"
    if roundsText is not None:
        rounds = min(max(int(roundsText), _SHA_CRYPT_MIN_ROUNDS), _SHA_CRYPT_MAX_ROUNDS)
        prefix += f"rounds={rounds}$"
    digest = _shaCryptDigest(password, salt, rounds, algorithm)
    return f"{prefix}{salt.decode('utf-8', 'replace')}${_cryptBase64(digest, order)}"


def _md5CryptDigest(password: bytes, salt: bytes, magic: bytes) -> bytes:
    """
    The raw digest of Poul-Henning Kamp's MD5-crypt, which Apache reuses with the magic
    C{$apr1$} (glibc uses C{$1$}; the algorithm is otherwise identical).
    """
    length = len(password)
    alternate = hashlib.md5(password + salt + password).digest()
    context = hashlib.md5(password + magic + salt)
    context.update((alternate * (length // 16 + 1))[:length])
    bits = length
    while bits:
        # A historical quirk kept by every implementation: a zero byte, not the digest.
        context.update(b"\0" if bits & 1 else password[:1])
        bits >>= 1
    digest = context.digest()
    cycle = []
    for i in range(42):
        middle = (salt if i % 3 else b"") + (password if i % 7 else b"")
        cycle.append((password + middle, b"") if i & 1 else (b"", middle + password))
    for i in range(1000):
        prefix, suffix = cycle[i % 42]
        digest = hashlib.md5(prefix + digest + suffix).digest()
    return digest


_MD5_CRYPT_SETTING = re.compile(r"\$(apr1|1)\$([^$:]*)(?:\$.*)?\Z", re.S)


def md5Crypt(password: bytes, setting: str) -> str:
    """
    Apache MD5 (C{$apr1$}, htpasswd's default) or MD5-crypt (C{$1$}) of C{password}.

    C{setting} is C{"$apr1$salt"} or a complete hash; the salt is cut to 8 characters.
    """
    match = _MD5_CRYPT_SETTING.match(setting)
    if match is None:
        raise ValueError("not an $apr1$ or $1$ setting")
    kind, saltText = match.groups()
    magic = f"${kind}$".encode("ascii")
    salt = saltText.encode("utf-8")[:8]
    digest = _md5CryptDigest(password, salt, magic)
    return f"${kind}${salt.decode('utf-8', 'replace')}${_cryptBase64(digest, _MD5_ORDER)}"


# ---------------------------------------------------------------------------------------------
# The user table


@frozen
class Verifier:
    """
    How to check one user's password: the scheme and the stored hash, already parsed.

    Parsing happens once at load time so the per-request work is only the hash itself, and so
    a malformed entry is reported at start-up rather than as a mysterious 407 later. The hash
    fields are kept out of C{repr} so a Verifier that ends up in a log or a traceback does not
    leak them. Equality compares the hash, which lets a reload tell whether a user's entry
    changed while a check was running.
    """

    scheme: str
    """One of C{bcrypt}, C{sha256-crypt}, C{sha512-crypt}, C{apr1}, C{md5-crypt}, C{sha1}."""
    salt: bytes = field(repr=False, default=b"")
    rounds: int = 0
    expected: bytes = field(repr=False, default=b"")
    """The value a correct password reproduces: the full bcrypt hash, the encoded crypt
    checksum, or the raw SHA-1 digest."""

    def verify(self, password: bytes) -> bool:
        """
        Whether C{password} (the bytes the hash was made from) matches. Can take tens of
        milliseconds (bcrypt, SHA-crypt), so L{Authenticator} calls it in a thread.
        """
        if self.scheme == "bcrypt":
            return bcrypt.checkpw(password[:_BCRYPT_MAX_PASSWORD], self.expected)
        if self.scheme == "sha1":
            computed = hashlib.sha1(password).digest()
        elif self.scheme in ("sha256-crypt", "sha512-crypt"):
            algorithm, order, _ = _SHA_CRYPT_SPEC["5" if self.scheme == "sha256-crypt" else "6"]
            digest = _shaCryptDigest(password, self.salt, self.rounds, algorithm)
            computed = _cryptBase64(digest, order).encode("ascii")
        else:
            magic = b"$apr1$" if self.scheme == "apr1" else b"$1$"
            computed = _cryptBase64(_md5CryptDigest(password, self.salt, magic), _MD5_ORDER)
            computed = computed.encode("ascii")
        return hmac.compare_digest(computed, self.expected)


_CRYPT_CHARS = "./0-9A-Za-z"
_BCRYPT_HASH = re.compile(rf"\$2[aby]\$([0-9]{{2}})\$[{_CRYPT_CHARS}]{{53}}\Z")
_SHA_CRYPT_HASH = re.compile(
    rf"\$([56])\$(?:rounds=([0-9]{{1,10}})\$)?([^$:\s]{{0,16}})\$([{_CRYPT_CHARS}]+)\Z"
)
_MD5_CRYPT_HASH = re.compile(rf"\$(apr1|1)\$([^$:\s]{{0,8}})\$([{_CRYPT_CHARS}]{{22}})\Z")
_SHA1_HASH = re.compile(r"\{SHA\}([A-Za-z0-9+/]{27}=)\Z")
_DES_HASH = re.compile(rf"[{_CRYPT_CHARS}]{{13}}\Z")
_ADVICE = "use htpasswd -B"


def _parseHash(hashed: str) -> Verifier:
    """
    Turn one stored hash into a L{Verifier}, or raise C{ValueError} with a message that names
    the scheme but never repeats the hash.
    """
    if hashed.startswith("$2"):
        match = _BCRYPT_HASH.match(hashed)
        if match is None or not 4 <= int(match.group(1)) <= 31:
            raise ValueError(f"malformed bcrypt hash; {_ADVICE}")
        return Verifier("bcrypt", expected=hashed.encode("ascii"))
    if hashed.startswith(("$5$", "$6$")):
        name = hashed[:3]
        match = _SHA_CRYPT_HASH.match(hashed)
        if match is None:
            raise ValueError(f"malformed {name} (SHA-crypt) hash")
        kind, roundsText, salt, checksum = match.groups()
        if len(checksum) != _SHA_CRYPT_SPEC[kind][2]:
            raise ValueError(f"malformed {name} (SHA-crypt) hash: wrong checksum length")
        rounds = _SHA_CRYPT_DEFAULT_ROUNDS
        if roundsText is not None:
            rounds = min(max(int(roundsText), _SHA_CRYPT_MIN_ROUNDS), _SHA_CRYPT_MAX_ROUNDS)
        if rounds > MAX_SHA_CRYPT_ROUNDS:
            raise ValueError(
                f"{name} hash with rounds={rounds} is too slow to check per request "
                f"(at most {MAX_SHA_CRYPT_ROUNDS}); {_ADVICE}"
            )
        return Verifier(
            "sha256-crypt" if kind == "5" else "sha512-crypt",
            salt=salt.encode("utf-8"),
            rounds=rounds,
            expected=checksum.encode("ascii"),
        )
    if hashed.startswith(("$apr1$", "$1$")):
        match = _MD5_CRYPT_HASH.match(hashed)
        if match is None:
            name = "$apr1$" if hashed.startswith("$apr1$") else "$1$"
            raise ValueError(f"malformed {name} (MD5) hash")
        kind, salt, checksum = match.groups()
        return Verifier(
            "apr1" if kind == "apr1" else "md5-crypt",
            salt=salt.encode("utf-8"),
            expected=checksum.encode("ascii"),
        )
    if hashed.startswith("{SHA}"):
        match = _SHA1_HASH.match(hashed)
        if match is None:
            raise ValueError("malformed {SHA} hash")
        return Verifier("sha1", expected=base64.b64decode(match.group(1)))
    if not hashed:
        raise ValueError(f"empty password field; {_ADVICE}")
    if hashed.startswith("$") or hashed.startswith("{"):
        # Named only generically: if this is in fact a plain-text password that happens to
        # start with "$", echoing its prefix would leak part of it.
        raise ValueError(
            "unsupported hash format (supported: bcrypt, $5$, $6$, $apr1$, $1$, {SHA}); " + _ADVICE
        )
    if _DES_HASH.match(hashed):
        raise ValueError(f"plain-text or DES-crypt passwords are not accepted; {_ADVICE}")
    raise ValueError(f"plain-text passwords are not accepted; {_ADVICE}")


def parseHtpasswd(text: str, path: str) -> dict[str, Verifier]:
    """
    Parse htpasswd file text into user name -> L{Verifier}.

    Lines are C{user:hash}, split on the first colon. Blank lines and lines starting with
    C{#} are ignored; surrounding whitespace (including a CR from Windows line ends) is
    stripped. Every problem raises L{HtpasswdError} naming C{path} and the line: an unusable
    file should stop start-up (or be refused by a reload) rather than silently lock users
    out. A user listed twice is an error, because Apache would use the first entry and the
    second is almost certainly a mistake the admin wants to know about.

    @param path: only used in error messages.
    """
    users: dict[str, Verifier] = {}
    for lineNumber, rawLine in enumerate(text.splitlines(), start=1):
        line = rawLine.strip()
        if not line or line.startswith("#"):
            continue
        user, colon, hashed = line.partition(":")
        if not colon:
            raise HtpasswdError(path, "expected 'user:hash' (no ':' found)", lineNumber)
        if not user:
            raise HtpasswdError(path, "empty user name", lineNumber)
        if user in users:
            raise HtpasswdError(path, f"user {user!r} is listed twice", lineNumber)
        try:
            users[user] = _parseHash(hashed)
        except ValueError as e:
            raise HtpasswdError(path, f"user {user!r}: {e}", lineNumber) from None
    return users


def _decodeFile(data: bytes, path: str) -> str:
    """
    Decode htpasswd bytes as UTF-8 (a leading BOM is dropped), reporting the line of the
    first invalid byte rather than a byte offset.
    """
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        lineNumber = data[: e.start].count(b"\n") + 1
        raise HtpasswdError(path, "not valid UTF-8 text", lineNumber) from None


def _readFile(path: str) -> tuple[dict[str, Verifier], tuple[int, ...]]:
    """
    Read and parse the file; return the users and the identity of the file that was read
    (from C{fstat} of the open file, so it describes exactly the content parsed).
    """
    try:
        with open(path, "rb") as f:
            signature = _signature(os.fstat(f.fileno()))
            data = f.read()
    except OSError as e:
        raise HtpasswdError(path, f"cannot read: {e.strerror or e}") from None
    return parseHtpasswd(_decodeFile(data, path), path), signature


def _signature(st: os.stat_result) -> tuple[int, ...]:
    """What "the file changed" means: another inode (replaced by rename), size or mtime."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


# ---------------------------------------------------------------------------------------------
# Basic credentials


_BASIC_CREDENTIALS = re.compile(
    rb"[ \t]*([!#$%&'*+.^_`|~0-9A-Za-z-]+) +([A-Za-z0-9+/]+={0,2})[ \t]*\Z"
)

_Attempt = tuple[str, Verifier, bytes]


def _decodeCredentials(header: bytes) -> list[tuple[str, bytes]] | None:
    """
    The (user, password bytes) readings of a Proxy-Authorization value, or C{None} when it is
    not well-formed Basic credentials.

    RFC 7617 leaves the charset to the client: curl sends UTF-8, python-requests latin-1, and
    htpasswd hashed whatever bytes the admin's (UTF-8) terminal produced. So the readings are,
    in order: the bytes as UTF-8; the bytes as latin-1 re-encoded to UTF-8; and, when the bytes
    are not UTF-8 at all, latin-1 user with the raw password bytes (a file hashed on a latin-1
    terminal). Duplicates are dropped so an ASCII password is checked once.
    """
    match = _BASIC_CREDENTIALS.match(header)
    if match is None or match.group(1).lower() != b"basic":
        return None
    try:
        decoded = base64.b64decode(match.group(2), validate=True)
    except (binascii.Error, ValueError):
        return None
    userBytes, colon, password = decoded.partition(b":")
    if not colon or not userBytes or b"\0" in decoded:
        # crypt(3) implementations stop at NUL, so a NUL-carrying password could match a
        # prefix; no htpasswd entry can contain one, so refuse outright.
        return None
    try:
        decoded.decode("utf-8")
        isUtf8 = True
    except UnicodeDecodeError:
        isUtf8 = False
    readings: list[tuple[str, bytes]] = []
    if isUtf8:
        readings.append((userBytes.decode("utf-8"), password))
    latin1 = (userBytes.decode("latin-1"), password.decode("latin-1").encode("utf-8"))
    if latin1 not in readings:
        readings.append(latin1)
    if not isUtf8:
        readings.append((latin1[0], password))
    return readings


def _verifyAttempts(attempts: list[_Attempt]) -> str | None:
    """
    Run in a pool thread: the first user whose password verifies, else C{None}. Touches no
    shared state; the attempts carry the L{Verifier}s captured on the reactor thread.
    """
    for user, verifier, password in attempts:
        if verifier.verify(password):
            return user
    return None


def _quoteRealm(realm: str) -> bytes:
    """
    The realm as an RFC 9110 quoted-string. Control characters cannot be quoted at all (a CR
    or LF would split the response head), so they are refused at construction.
    """
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in realm):
        raise ValueError("realm must not contain control characters")
    escaped = realm.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'.encode()


class Authenticator:
    """
    Proxy Basic authentication against an htpasswd file, fit for the per-request hot path.

    - A request whose exact header was verified recently is a dict lookup and gets an
      already-fired Deferred: the success cache is keyed on a keyed BLAKE2 hash of the header
      (the key is random per process, so the cache never holds a fast, offline-guessable hash
      of anyone's password), bounded LRU, with absolute expiry after C{cacheSeconds}.
    - Malformed headers, other schemes and unknown users also answer synchronously: they
      cost nothing to decide. (This lets a client learn which user names exist from timing;
      a proxy's user names are not secrets worth a bcrypt per guess.)
    - Anything else is verified in the reactor's thread pool, because bcrypt at cost 10+ takes
      tens of milliseconds. At most C{maxConcurrent} verifications run at once and at most
      C{maxWaiting} wait; beyond that requests are refused at once, so a password-guessing
      flood costs a bounded amount of CPU and memory. Identical headers arriving while one is
      being verified share that verification. Wrong passwords are remembered for one second
      (bounded), which absorbs a client retrying the same bad credentials on many connections.
    - L{reload} (on SIGHUP) and L{maybeReload} (call it per request or from a timer: it stats
      the file at most once a second) replace the user table and clear both caches, so a
      removed user or a changed password takes effect at once.
    """

    failureSeconds = 1.0
    failureCacheSize = 1024

    def __init__(
        self,
        path: str,
        realm: str,
        *,
        reactor: Any = None,
        clock: Callable[[], float] = time.monotonic,
        cacheSeconds: float = 300.0,
        cacheSize: int = 4096,
        maxConcurrent: int = 4,
        maxWaiting: int = 1024,
    ) -> None:
        """
        Load C{path} now, so a bad file stops start-up with an L{HtpasswdError}.

        @param reactor: provides C{getThreadPool} and C{callFromThread}; the global reactor
            when omitted (looked up lazily so importing this module does not install one).
        @param clock: monotonic seconds, for cache expiry and the stat throttle.
        @raise ValueError: a realm with control characters.
        """
        if reactor is None:
            from twisted.internet import reactor as globalReactor

            reactor = globalReactor
        self._path = path
        self._realm = realm
        self._challenge = b"Basic realm=" + _quoteRealm(realm) + b', charset="UTF-8"'
        self._reactor = reactor
        self._clock = clock
        self._cacheSeconds = cacheSeconds
        self._cacheSize = cacheSize
        self._maxWaiting = maxWaiting
        self._semaphore = DeferredSemaphore(maxConcurrent)
        self._cacheKey = secrets.token_bytes(32)
        self._successes: OrderedDict[bytes, tuple[str, float]] = OrderedDict()
        self._failures: OrderedDict[bytes, float] = OrderedDict()
        self._inflight: dict[bytes, list[Deferred[str | None]]] = {}
        self._overloaded = False
        self._users, self._signature = _readFile(path)
        self._generation = 0
        self._nextStat = clock() + 1.0
        self._statProblem: str | None = None
        if not self._users:
            _log.warn("htpasswd file {path} lists no users: every request will get 407", path=path)
        else:
            _log.info("Loaded htpasswd {path}: {count} users", path=path, count=len(self._users))

    @property
    def path(self) -> str:
        return self._path

    @property
    def realm(self) -> str:
        return self._realm

    @property
    def users(self) -> frozenset[str]:
        """The user names currently loaded (for status pages and tests)."""
        return frozenset(self._users)

    def challenge(self) -> bytes:
        """The C{Proxy-Authenticate} value for a 407: Basic, the realm, and UTF-8 as charset."""
        return self._challenge

    def authenticate(self, proxyAuthorization: bytes | None) -> Deferred[str | None]:
        """
        Check a C{Proxy-Authorization} value: fires with the user name, or C{None} for any
        failure (missing, not Basic, malformed, unknown user, wrong password, overloaded).
        Never errbacks: the caller's only decision is "407 or not".
        """
        if proxyAuthorization is None or len(proxyAuthorization) > MAX_HEADER_LENGTH:
            return succeed(None)
        now = self._clock()
        key = hashlib.blake2b(proxyAuthorization, key=self._cacheKey, digest_size=16).digest()
        hit = self._successes.get(key)
        if hit is not None:
            if now < hit[1]:
                self._successes.move_to_end(key)
                return succeed(hit[0])
            del self._successes[key]
        failedUntil = self._failures.get(key)
        if failedUntil is not None:
            if now < failedUntil:
                return succeed(None)
            del self._failures[key]
        waiters = self._inflight.get(key)
        if waiters is not None:
            waiter: Deferred[str | None] = Deferred()
            waiters.append(waiter)
            return waiter
        return self._verify(key, proxyAuthorization)

    def _verify(self, key: bytes, header: bytes) -> Deferred[str | None]:
        """The slow path: decode, find the users, queue a thread-pool verification."""
        readings = _decodeCredentials(header)
        if readings is None:
            return succeed(None)
        attempts = [
            (user, self._users[user], password)
            for user, password in readings
            if user in self._users
        ]
        if not attempts:
            return succeed(None)
        semaphore = self._semaphore
        if semaphore.tokens == 0 and len(semaphore.waiting) >= self._maxWaiting:
            if not self._overloaded:
                self._overloaded = True
                _log.warn(
                    "Too many password checks waiting ({count}); refusing new ones until the "
                    "queue drains (password-guessing flood?)",
                    count=len(semaphore.waiting),
                )
            return succeed(None)
        self._overloaded = False
        waiter: Deferred[str | None] = Deferred()
        self._inflight[key] = [waiter]
        generation = self._generation
        work = semaphore.run(
            deferToThreadPool,
            self._reactor,
            self._reactor.getThreadPool(),
            _verifyAttempts,
            attempts,
        )
        work.addBoth(self._verified, key, generation, attempts)
        return waiter

    def _verified(
        self, result: str | Failure | None, key: bytes, generation: int, attempts: list[_Attempt]
    ) -> None:
        """Back on the reactor thread: cache the outcome and answer everyone who waited."""
        if isinstance(result, Failure):
            _log.error(
                "Password check for user {user} failed internally ({error}); refusing",
                user=attempts[0][0],
                error=result.type.__name__,
            )
            result = None
        if generation != self._generation:
            # The file was reloaded meanwhile: trust the answer only if the user's entry is
            # unchanged, and do not cache it (the caches belong to the new table).
            if result is not None and not any(
                user == result and self._users.get(user) == verifier
                for user, verifier, _ in attempts
            ):
                result = None
        elif result is None:
            self._remember(self._failures, key, self._clock() + self.failureSeconds)
            while len(self._failures) > self.failureCacheSize:
                self._failures.popitem(last=False)
        else:
            self._remember(self._successes, key, (result, self._clock() + self._cacheSeconds))
            while len(self._successes) > self._cacheSize:
                self._successes.popitem(last=False)
        for waiter in self._inflight.pop(key, []):
            if not waiter.called:  # a caller may have cancelled (connection lost)
                waiter.callback(result)

    @staticmethod
    def _remember(cache: OrderedDict[bytes, Any], key: bytes, value: Any) -> None:
        cache[key] = value
        cache.move_to_end(key)

    def reload(self) -> None:
        """
        Re-read the file (on SIGHUP or when L{maybeReload} sees a change). A bad or unreadable
        file keeps the users already loaded and logs one error line: a typo while editing must
        not lock everyone out of a running proxy. Never raises.
        """
        try:
            users, signature = _readFile(self._path)
        except HtpasswdError as e:
            _log.error(
                "Not reloading htpasswd, keeping the {count} users loaded before: {problem}",
                count=len(self._users),
                problem=str(e),
            )
            return
        except Exception:
            _log.failure("Not reloading htpasswd {path}: unexpected error", path=self._path)
            return
        self._users = users
        self._signature = signature
        self._generation += 1
        self._successes.clear()
        self._failures.clear()
        _log.info("Loaded htpasswd {path}: {count} users", path=self._path, count=len(users))

    def maybeReload(self) -> None:
        """
        Cheap enough to call per request: at most once a second (by C{clock}) it stats the
        file, and reloads when its inode, size or mtime differ from what was loaded. A missing
        or unreadable file is logged once and the loaded users are kept.
        """
        now = self._clock()
        if now < self._nextStat:
            return
        self._nextStat = now + 1.0
        try:
            signature = _signature(os.stat(self._path))
        except OSError as e:
            problem = e.strerror or str(e)
            if problem != self._statProblem:
                self._statProblem = problem
                _log.error(
                    "Cannot stat htpasswd {path} ({problem}); keeping the loaded users",
                    path=self._path,
                    problem=problem,
                )
            return
        self._statProblem = None
        if signature != self._signature:
            # Remember what we saw even if the reload fails, so a broken file is reported once
            # per change rather than once a second.
            self._signature = signature
            self.reload()
