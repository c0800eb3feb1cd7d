"""
Tests for gateway.auth: htpasswd parsing, the password hash schemes, and the Authenticator's
decoding, caching, throttling and reloading.

Most Authenticator tests use a fake thread pool that runs work only when told to, so that
"answered synchronously" and "went to the thread pool" can be told apart and counted; one
test uses the real reactor and thread pool. Tests that need Apache's htpasswd binary skip
when it is missing; the committed fixtures in tests/data/htpasswd were made with it.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bcrypt
import pytest
import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure

from gateway import auth
from gateway.auth import (
    MAX_HEADER_LENGTH,
    Authenticator,
    HtpasswdError,
    Verifier,
    md5Crypt,
    parseHtpasswd,
    shaCrypt,
)

DATA = Path(__file__).parent / "data" / "htpasswd"
FORMATS = DATA / "formats.htpasswd"
BAD_PLAIN = DATA / "bad-plain.htpasswd"
HTPASSWD = shutil.which("htpasswd")
needsHtpasswd = pytest.mark.skipif(HTPASSWD is None, reason="htpasswd (apache2-utils) missing")

LONG_PASSWORD = "x" * 72 + "y" * 28

# user -> (password, scheme) for tests/data/htpasswd/formats.htpasswd
FIXTURE_USERS = {
    "alice": ("correct horse battery staple", "bcrypt"),
    "bob": ("p@ss:w%rd/#", "apr1"),
    "carol": ("pässwörd", "sha256-crypt"),
    "dave": ("€uro", "sha512-crypt"),
    "frank": ("rounds & rounds", "sha256-crypt"),
    "grace": ("grace:under:pressure", "sha512-crypt"),
    "erin": ("s3cret", "sha1"),
    "henry": (LONG_PASSWORD, "bcrypt"),
    "ivan": ("pässwörd", "bcrypt"),
    "jürgen": ("geheim", "apr1"),
    "kate": ("kate-2b", "bcrypt"),
    "liam": ("liam-2a", "bcrypt"),
    "mia": ("mia-md5", "md5-crypt"),
}


# ---------------------------------------------------------------------------------------------
# helpers


def basic(
    user: str | bytes, password: str | bytes, encoding: str = "utf-8", scheme: bytes = b"Basic"
) -> bytes:
    """A Proxy-Authorization value, credentials encoded the way a given client would."""
    raw = user if isinstance(user, bytes) else user.encode(encoding)
    raw += b":" + (password if isinstance(password, bytes) else password.encode(encoding))
    return scheme + b" " + base64.b64encode(raw)


class FakeThreadPool:
    """Queues work instead of running it, so tests decide when "the thread" finishes."""

    def __init__(self) -> None:
        self.pending: list[tuple[Any, Any, tuple[Any, ...]]] = []
        self.maxPending = 0

    def callInThreadWithCallback(self, onResult: Any, f: Any, *args: Any) -> None:
        self.pending.append((onResult, f, args))
        self.maxPending = max(self.maxPending, len(self.pending))

    def runOne(self) -> None:
        onResult, f, args = self.pending.pop(0)
        try:
            result = f(*args)
        except BaseException:
            onResult(False, Failure())
        else:
            onResult(True, result)

    def runAll(self) -> None:
        while self.pending:
            self.runOne()


class FakeReactor:
    def __init__(self) -> None:
        self.pool = FakeThreadPool()

    def getThreadPool(self) -> FakeThreadPool:
        return self.pool

    def callFromThread(self, f: Any, *args: Any) -> None:
        f(*args)


_NOT_FIRED = object()


def fired(d: Deferred[Any]) -> Any:
    """The result of a Deferred that must already have fired (fails the test otherwise)."""
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "Deferred has not fired"
    if isinstance(box[0], Failure):
        box[0].raiseException()
    return box[0]


def outcome(d: Deferred[Any]) -> Any:
    """The result so far, or _NOT_FIRED; does not consume the result for other callbacks."""
    box: list[Any] = []

    def grab(r: Any) -> Any:
        box.append(r)
        return r

    d.addBoth(grab)
    return box[0] if box else _NOT_FIRED


@pytest.fixture
def htfile(tmp_path: Path) -> Path:
    """A writable copy of the known-answer fixture (for reload tests)."""
    path = tmp_path / "users.htpasswd"
    shutil.copyfile(FORMATS, path)
    return path


@pytest.fixture
def clock() -> Clock:
    """The Authenticator's monotonic clock (C{clock.seconds}), moved by C{advance}."""
    return Clock()


@pytest.fixture
def reactor() -> FakeReactor:
    return FakeReactor()


@pytest.fixture
def verifyCalls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Counts Verifier.verify calls (by scheme) without changing what they return."""
    calls: list[str] = []
    original = Verifier.verify

    def counting(self: Verifier, password: bytes) -> bool:
        calls.append(self.scheme)
        return original(self, password)

    monkeypatch.setattr(Verifier, "verify", counting)
    return calls


@pytest.fixture
def logEvents() -> Iterator[list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(events.append)


def messages(events: list[dict[str, Any]]) -> list[str]:
    return [formatEvent(e) for e in events if e.get("log_namespace") == "gateway.auth"]


def makeAuth(path: Path, reactor: FakeReactor, clock: Clock, **kwargs: Any) -> Authenticator:
    return Authenticator(str(path), "proxygate", reactor=reactor, clock=clock.seconds, **kwargs)


def check(authenticator: Authenticator, reactor: FakeReactor, header: bytes | None) -> Any:
    """authenticate() and let the fake thread pool finish whatever it queued."""
    d = authenticator.authenticate(header)
    reactor.pool.runAll()
    return fired(d)


def rewrite(path: Path, text: str, mtimeBump: float = 10.0) -> None:
    """Rewrite in place and move the mtime forward, as an editor on a coarse clock might."""
    before = path.stat().st_mtime
    path.write_text(text, encoding="utf-8")
    os.utime(path, (before + mtimeBump, before + mtimeBump))


def bcryptLine(user: str, password: str, cost: int = 4) -> str:
    return f"{user}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt(cost)).decode()}\n"


# ---------------------------------------------------------------------------------------------
# hash schemes: known-answer vectors


# Ulrich Drepper, "Unix crypt using SHA-256 and SHA-512", test vectors (also in glibc).
DREPPER_VECTORS = [
    (
        "$5$saltstring",
        "Hello world!",
        "$5$saltstring$5B8vYYiY.CVt1RlTTf8KbXBH3hsxY/GNooZaBBGWEc5",
    ),
    (
        "$5$rounds=10000$saltstringsaltstring",
        "Hello world!",
        "$5$rounds=10000$saltstringsaltst$3xv.VbSHBb41AL9AvLeujZkZRBAwqFMz2.opqey6IcA",
    ),
    (
        "$5$rounds=5000$toolongsaltstring",
        "This is just a test",
        "$5$rounds=5000$toolongsaltstrin$Un/5jzAHMgOGZ5.mWJpuVolil07guHPvOW8mGRcvxa5",
    ),
    (
        "$5$rounds=1400$anotherlongsaltstring",
        "a very much longer text to encrypt.  This one even stretches over morethan one line.",
        "$5$rounds=1400$anotherlongsalts$Rx.j8H.h8HjEDGomFU8bDkXm3XIUnzyxf12oP84Bnq1",
    ),
    (
        "$5$rounds=77777$short",
        "we have a short salt string but not a short password",
        "$5$rounds=77777$short$JiO1O3ZpDAxGJeaDIuqCoEFysAe1mZNJRs3pw0KQRd/",
    ),
    (
        "$5$rounds=123456$asaltof16chars..",
        "a short string",
        "$5$rounds=123456$asaltof16chars..$gP3VQ/6X7UUEW3HkBn2w1/Ptq2jxPyzV/cZKmF/wJvD",
    ),
    (
        "$5$rounds=10$roundstoolow",
        "the minimum number is still observed",
        "$5$rounds=1000$roundstoolow$yfvwcWrQ8l/K0DAWyuPMDNHpIVlTQebY9l/gL972bIC",
    ),
    (
        "$6$saltstring",
        "Hello world!",
        "$6$saltstring$svn8UoSVapNtMuq1ukKS4tPQd8iKwSMHWjl/O817G3uBnIFNjnQJu"
        "esI68u4OTLiBFdcbYEdFCoEOfaS35inz1",
    ),
    (
        "$6$rounds=10000$saltstringsaltstring",
        "Hello world!",
        "$6$rounds=10000$saltstringsaltst$OW1/O6BYHV6BcXZu8QVeXbDWra3Oeqh0sb"
        "HbbMCVNSnCM/UrjmM0Dp8vOuZeHBy/YTBmSK6H9qs/y3RnOaw5v.",
    ),
    (
        "$6$rounds=5000$toolongsaltstring",
        "This is just a test",
        "$6$rounds=5000$toolongsaltstrin$lQ8jolhgVRVhY4b5pZKaysCLi0QBxGoNeKQ"
        "zQ3glMhwllF7oGDZxUhx1yxdYcz/e1JSbq3y6JMxxl8audkUEm0",
    ),
    (
        "$6$rounds=1400$anotherlongsaltstring",
        "a very much longer text to encrypt.  This one even stretches over morethan one line.",
        "$6$rounds=1400$anotherlongsalts$POfYwTEok97VWcjxIiSOjiykti.o/pQs.wP"
        "vMxQ6Fm7I6IoYN3CmLs66x9t0oSwbtEW7o7UmJEiDwGqd8p4ur1",
    ),
    (
        "$6$rounds=77777$short",
        "we have a short salt string but not a short password",
        "$6$rounds=77777$short$WuQyW2YR.hBNpjjRhpYD/ifIw05xdfeEyQoMxIXbkvr0g"
        "ge1a1x3yRULJ5CCaUeOxFmtlcGZelFl5CxtgfiAc0",
    ),
    (
        "$6$rounds=123456$asaltof16chars..",
        "a short string",
        "$6$rounds=123456$asaltof16chars..$BtCwjqMJGx5hrJhZywWvt0RLE8uZ4oPwc"
        "elCjmw2kSYu.Ec6ycULevoBK25fs2xXgMNrCzIMVcgEJAstJeonj1",
    ),
    (
        "$6$rounds=10$roundstoolow",
        "the minimum number is still observed",
        "$6$rounds=1000$roundstoolow$kUMsbe306n21p9R.FRkW3IGn.S9NPN0x50YhH1x"
        "hLsPuWGsUSklZt58jaTfF4ZEQpyUNGc0dqbpBYYBaHHrsX.",
    ),
]


@pytest.mark.parametrize(
    ("setting", "password", "expected"), DREPPER_VECTORS, ids=[v[0] for v in DREPPER_VECTORS]
)
def test_shaCryptDrepperVectors(setting: str, password: str, expected: str) -> None:
    """
    The pure-Python SHA-crypt reproduces the specification's vectors, including salt
    truncation to 16 characters and rounds clamped to the 1000 minimum; and a file entry
    holding the expected string verifies that password and nothing else.
    """
    assert shaCrypt(password.encode(), setting) == expected
    verifier = parseHtpasswd(f"u:{expected}", "vectors")["u"]
    assert verifier.verify(password.encode())
    assert not verifier.verify(password.encode() + b"!")


# MD5-crypt vectors: the reference implementation's ($1$, salt cut to 8) and ones produced by
# `openssl passwd -apr1 / -1`, including awkward and empty passwords.
MD5_VECTORS = [
    ("$1$saltstring", "Hello world!", "$1$saltstri$YMyguxXMBpd2TEZ.vS/3q1"),
    ("$1$NaH5na7J", "Pässword", "$1$NaH5na7J$MvnEHcxaKZzgBk8QdjdAQ0"),
    ("$apr1$saltsalt", "Hello world!", "$apr1$saltsalt$6BwcdpRros16.J9J/tHRr/"),
    ("$apr1$saltsalt", "p@ss:w%rd/#", "$apr1$saltsalt$mUQ/27tMZxymBufR1oPqZ1"),
    ("$apr1$saltsalt", "pässwörd", "$apr1$saltsalt$i5XfNxJNeh2E8ljXycZFm0"),
    ("$apr1$saltsalt", "", "$apr1$saltsalt$a8ml/vK5HEjiZ5oypDWA7/"),
    ("$1$x.Y/9z", "Hello world!", "$1$x.Y/9z$CdFwYipY/ZSP5LyXfEenM/"),
    ("$1$x.Y/9z", "pässwörd", "$1$x.Y/9z$j9wtI.VQ/E6yx0slGNjOG."),
]


@pytest.mark.parametrize(
    ("setting", "password", "expected"), MD5_VECTORS, ids=[f"{v[0]}-{v[1]}" for v in MD5_VECTORS]
)
def test_md5CryptVectors(setting: str, password: str, expected: str) -> None:
    assert md5Crypt(password.encode(), setting) == expected
    verifier = parseHtpasswd(f"u:{expected}", "vectors")["u"]
    assert verifier.verify(password.encode())
    assert not verifier.verify(b"wrong")


def test_sha1Vector() -> None:
    """{SHA} is base64(SHA-1(password)); "password" has a well-known digest."""
    verifier = parseHtpasswd("u:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=", "v")["u"]
    assert verifier.scheme == "sha1"
    assert verifier.verify(b"password")
    assert not verifier.verify(b"Password")


@pytest.mark.parametrize("user", sorted(FIXTURE_USERS))
def test_fixtureKnownAnswers(user: str) -> None:
    """
    Every user in the htpasswd-generated fixture verifies with its password (as UTF-8 bytes,
    what the admin's terminal gave htpasswd) and not with a near miss.
    """
    users = parseHtpasswd(FORMATS.read_text(encoding="utf-8"), str(FORMATS))
    password, scheme = FIXTURE_USERS[user]
    verifier = users[user]
    assert verifier.scheme == scheme
    raw = password.encode()
    assert verifier.verify(raw)
    assert not verifier.verify(bytes([raw[0] ^ 1]) + raw[1:])
    if len(raw) < 72:  # bcrypt ignores bytes past 72: test_bcryptUsesTheFirst72Bytes
        assert not verifier.verify(raw[:-1])
        assert not verifier.verify(raw + b"x")


def test_fixtureHasExactlyTheDocumentedUsers() -> None:
    users = parseHtpasswd(FORMATS.read_text(encoding="utf-8"), str(FORMATS))
    assert set(users) == set(FIXTURE_USERS)


def test_bcryptUsesTheFirst72Bytes() -> None:
    """
    bcrypt (as htpasswd -B stores it) only reads 72 bytes; the bcrypt package >= 5 raises for
    longer input, so the verifier truncates instead of crashing on a long password.
    """
    verifier = parseHtpasswd(FORMATS.read_text(encoding="utf-8"), "f")["henry"]
    assert verifier.verify(LONG_PASSWORD.encode())
    assert verifier.verify(LONG_PASSWORD.encode()[:72])
    assert not verifier.verify(LONG_PASSWORD.encode()[:71])
    assert verifier.verify(LONG_PASSWORD.encode() + b"z" * 1000)


def test_bcryptPrefixesAllAccepted() -> None:
    for prefix in (b"2a", b"2b"):
        hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(4, prefix=prefix)).decode()
        for stored in (hashed, "$2y$" + hashed[4:]):
            assert parseHtpasswd(f"u:{stored}", "f")["u"].verify(b"pw")


def test_verifierReprHidesTheHash() -> None:
    users = parseHtpasswd(FORMATS.read_text(encoding="utf-8"), "f")
    for user, verifier in users.items():
        text = repr(verifier)
        assert verifier.scheme in text
        line = next(ln for ln in FORMATS.read_text("utf-8").splitlines() if ln.startswith(user))
        checksum = line.rsplit("$", 1)[-1] if "$" in line else line.split("}", 1)[-1]
        assert checksum not in text


# ---------------------------------------------------------------------------------------------
# parseHtpasswd: layout and refusals


def test_parseIgnoresBlankLinesCommentsAndLineEndings() -> None:
    text = (
        "\ufeff# comment\r\n"
        "\r\n"
        "   \n"
        "  # indented comment\n"
        "erin:{SHA}/vNB+F2HQ559kaLUZbmHHvZrXpg=\r\n"
        "bob:$apr1$m.BsQhWz$ggrt7KFa5HqQa/9TKWQn6/   \n"
    )
    users = parseHtpasswd(text.lstrip("\ufeff"), "f")
    assert set(users) == {"erin", "bob"}
    assert users["bob"].verify(b"p@ss:w%rd/#")


def test_parseEmptyFile() -> None:
    assert parseHtpasswd("", "f") == {}
    assert parseHtpasswd("# nobody\n\n", "f") == {}


@pytest.mark.parametrize(
    ("line", "fragment", "secret"),
    [
        ("bob:hunter2", "plain-text passwords are not accepted; use htpasswd -B", "hunter2"),
        (
            "bob:gPSblrUpGuBxQ",
            "plain-text or DES-crypt passwords are not accepted; use htpasswd -B",
            "gPSblrUpGuBxQ",
        ),
        ("bob:", "empty password field", None),
        ("bob:$y$j9T$abc$def", "unsupported hash format", "j9T$abc"),
        ("bob:$argon2id$v=19$m=65536", "unsupported hash format", "m=65536"),
        ("bob:{SSHA}abcdefgh", "unsupported hash format", "abcdefgh"),
        ("bob:$secretpassword", "unsupported hash format", "secretpassword"),
        ("bob:$2y$04$tooshort", "malformed bcrypt hash", "tooshort"),
        ("bob:$2y$03$" + "a" * 53, "malformed bcrypt hash", "a" * 53),
        ("bob:$2x$04$" + "a" * 53, "malformed bcrypt hash", "a" * 53),
        ("bob:$5$salt$tooshort", "malformed $5$ (SHA-crypt) hash", "tooshort"),
        ("bob:$6$salt$" + "a" * 43, "malformed $6$ (SHA-crypt) hash: wrong checksum", "a" * 43),
        ("bob:$5$rounds=x$salt$" + "a" * 43, "malformed $5$", "a" * 43),
        ("bob:$apr1$salt$short", "malformed $apr1$ (MD5) hash", "short"),
        ("bob:$apr1$toolongsalt$" + "a" * 22, "malformed $apr1$ (MD5) hash", "a" * 22),
        ("bob:$1$salt$" + "a" * 21, "malformed $1$ (MD5) hash", "a" * 21),
        ("bob:{SHA}notbase64!", "malformed {SHA} hash", "notbase64"),
        ("bob:{SHA}" + "A" * 28, "malformed {SHA} hash", "A" * 28),
        (
            "bob:$5$rounds=2000000$salt$" + "a" * 43,
            "rounds=2000000 is too slow to check per request",
            "a" * 43,
        ),
    ],
)
def test_parseRefusesWithLineNumberAndNoSecret(
    line: str, fragment: str, secret: str | None
) -> None:
    """
    One clear line naming file, line number, user and problem; never the stored value (which
    for a plain-text entry *is* the password).
    """
    text = f"# header\n\nalice:{{SHA}}W6ph5Mm5Pz8GgiULbPgzG37mj9g=\n{line}\n"
    with pytest.raises(HtpasswdError) as info:
        parseHtpasswd(text, "/etc/proxygate/users")
    message = str(info.value)
    assert message.startswith("/etc/proxygate/users: line 4: user 'bob': ")
    assert fragment in message
    assert "\n" not in message
    if secret is not None:
        assert secret not in message
    assert info.value.lineNumber == 4
    assert info.value.path == "/etc/proxygate/users"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("nocolonhere\n", "expected 'user:hash' (no ':' found)"),
        (":{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=\n", "empty user name"),
        (
            "bob:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=\nbob:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=\n",
            "user 'bob' is listed twice",
        ),
    ],
)
def test_parseRefusesBadLayout(text: str, fragment: str) -> None:
    with pytest.raises(HtpasswdError, match="line") as info:
        parseHtpasswd(text, "f")
    assert fragment in str(info.value)
    assert "nocolonhere" not in str(info.value)


def test_userNameWithControlCharactersIsQuotedInMessages() -> None:
    with pytest.raises(HtpasswdError) as info:
        parseHtpasswd("b\x1bob:plain\n", "f")
    assert "\x1b" not in str(info.value)
    assert "'b\\x1bob'" in str(info.value)


# ---------------------------------------------------------------------------------------------
# Authenticator: start-up and challenge


def test_startupWithBadFileRaisesWithLineNumber(reactor: FakeReactor, clock: Clock) -> None:
    with pytest.raises(HtpasswdError) as info:
        makeAuth(BAD_PLAIN, reactor, clock)
    assert str(info.value) == (
        f"{BAD_PLAIN}: line 3: user 'bob': plain-text passwords are not accepted; use htpasswd -B"
    )
    assert "hunter2" not in str(info.value)


def test_startupWithMissingFileRaises(tmp_path: Path, reactor: FakeReactor, clock: Clock) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(HtpasswdError, match="cannot read: No such file or directory") as info:
        makeAuth(missing, reactor, clock)
    assert str(info.value).startswith(str(missing) + ": ")


def test_startupWithNonUtf8FileRaises(tmp_path: Path, reactor: FakeReactor, clock: Clock) -> None:
    path = tmp_path / "latin1"
    path.write_bytes(b"# ok\nerin:{SHA}/vNB+F2HQ559kaLUZbmHHvZrXpg=\nj\xfcrgen:x\n")
    with pytest.raises(HtpasswdError, match=r"line 3: not valid UTF-8 text"):
        makeAuth(path, reactor, clock)


def test_startupAcceptsUtf8Bom(tmp_path: Path, reactor: FakeReactor, clock: Clock) -> None:
    path = tmp_path / "bom"
    path.write_bytes(b"\xef\xbb\xbferin:{SHA}/vNB+F2HQ559kaLUZbmHHvZrXpg=\n")
    authenticator = makeAuth(path, reactor, clock)
    assert authenticator.users == frozenset({"erin"})


def test_emptyFileStartsButWarns(
    tmp_path: Path, reactor: FakeReactor, clock: Clock, logEvents: list[dict[str, Any]]
) -> None:
    path = tmp_path / "empty"
    path.write_text("# nobody yet\n")
    authenticator = makeAuth(path, reactor, clock)
    assert authenticator.users == frozenset()
    assert any("lists no users" in m for m in messages(logEvents))
    assert check(authenticator, reactor, basic("alice", "x")) is None


def test_challenge(reactor: FakeReactor, clock: Clock) -> None:
    authenticator = makeAuth(FORMATS, reactor, clock)
    assert authenticator.challenge() == b'Basic realm="proxygate", charset="UTF-8"'
    assert authenticator.realm == "proxygate"
    assert authenticator.path == str(FORMATS)


def test_challengeQuotesRealm(reactor: FakeReactor, clock: Clock) -> None:
    authenticator = Authenticator(
        str(FORMATS), 'Corp "Gate" \\ Zürich', reactor=reactor, clock=clock.seconds
    )
    assert authenticator.challenge() == (
        b'Basic realm="Corp \\"Gate\\" \\\\ Z\xc3\xbcrich", charset="UTF-8"'
    )


@pytest.mark.parametrize("realm", ["a\r\nSet-Cookie: x=1", "tab\there", "nul\x00", "del\x7f"])
def test_challengeRefusesControlCharacters(realm: str, reactor: FakeReactor) -> None:
    """A CR/LF in the realm would split the 407's head: refuse it at construction."""
    with pytest.raises(ValueError, match="control characters"):
        Authenticator(str(FORMATS), realm, reactor=reactor)


def test_defaultReactorIsTheGlobalOne() -> None:
    from twisted.internet import reactor as globalReactor

    authenticator = Authenticator(str(FORMATS), "proxygate")
    assert authenticator._reactor is globalReactor


# ---------------------------------------------------------------------------------------------
# Authenticator: decoding the header


@pytest.mark.parametrize("user", sorted(FIXTURE_USERS))
def test_everyFormatAuthenticates(user: str, reactor: FakeReactor, clock: Clock) -> None:
    authenticator = makeAuth(FORMATS, reactor, clock)
    password = FIXTURE_USERS[user][0]
    assert check(authenticator, reactor, basic(user, password)) == user
    assert check(authenticator, reactor, basic(user, "!" + password)) is None


def test_missVerifiesInThreadPool(reactor: FakeReactor, clock: Clock) -> None:
    """A cache miss waits for the thread pool: nothing is hashed on the reactor thread."""
    authenticator = makeAuth(FORMATS, reactor, clock)
    d = authenticator.authenticate(basic("alice", "correct horse battery staple"))
    assert outcome(d) is _NOT_FIRED
    assert len(reactor.pool.pending) == 1
    reactor.pool.runAll()
    assert fired(d) == "alice"


@pytest.mark.parametrize("scheme", [b"Basic", b"basic", b"BASIC", b"bAsIc"])
def test_schemeIsCaseInsensitive(scheme: bytes, reactor: FakeReactor, clock: Clock) -> None:
    authenticator = makeAuth(FORMATS, reactor, clock)
    header = basic("erin", "s3cret", scheme=scheme)
    assert check(authenticator, reactor, header) == "erin"


def test_surroundingWhitespaceAndExtraSpacesTolerated(reactor: FakeReactor, clock: Clock) -> None:
    authenticator = makeAuth(FORMATS, reactor, clock)
    token = basic("erin", "s3cret").split(b" ")[1]
    assert check(authenticator, reactor, b"  Basic   " + token + b" \t") == "erin"


def test_passwordSplitOnFirstColon(reactor: FakeReactor, clock: Clock) -> None:
    authenticator = makeAuth(FORMATS, reactor, clock)
    assert check(authenticator, reactor, basic("bob", "p@ss:w%rd/#")) == "bob"
    assert check(authenticator, reactor, basic("grace", "grace:under:pressure")) == "grace"


@pytest.mark.parametrize(
    ("user", "password", "encoding"),
    [
        ("carol", "pässwörd", "utf-8"),  # curl
        ("carol", "pässwörd", "latin-1"),  # python-requests
        ("ivan", "pässwörd", "utf-8"),
        ("ivan", "pässwörd", "latin-1"),
        ("dave", "€uro", "utf-8"),
        ("jürgen", "geheim", "utf-8"),
        ("jürgen", "geheim", "latin-1"),
    ],
)
def test_nonAsciiCredentials(
    user: str, password: str, encoding: str, reactor: FakeReactor, clock: Clock
) -> None:
    """
    curl sends UTF-8, requests sends latin-1; the file holds the UTF-8 bytes htpasswd saw.
    Both must work, for the password and for the user name.
    """
    authenticator = makeAuth(FORMATS, reactor, clock)
    assert check(authenticator, reactor, basic(user, password, encoding)) == user


def test_nonAsciiWrongPasswordFailsBothWays(
    reactor: FakeReactor, clock: Clock, verifyCalls: list[str]
) -> None:
    """A wrong non-ASCII password costs at most two checks (UTF-8 and latin-1 readings)."""
    authenticator = makeAuth(FORMATS, reactor, clock)
    assert check(authenticator, reactor, basic("carol", "pässwört")) is None
    assert verifyCalls == ["sha256-crypt", "sha256-crypt"]
    verifyCalls.clear()
    assert check(authenticator, reactor, basic("carol", "passwort")) is None
    assert verifyCalls == ["sha256-crypt"]


def test_latin1HashedFileAndLatin1Client(
    tmp_path: Path, reactor: FakeReactor, clock: Clock
) -> None:
    """A legacy file hashed from latin-1 bytes still works for a latin-1 client."""
    path = tmp_path / "legacy"
    path.write_text("u:" + md5Crypt("pässwörd".encode("latin-1"), "$apr1$legacy") + "\n")
    authenticator = makeAuth(path, reactor, clock)
    assert check(authenticator, reactor, basic("u", "pässwörd", "latin-1")) == "u"


def test_realRequestsClientHeader(reactor: FakeReactor, clock: Clock) -> None:
    """The exact header python-requests builds (latin-1) is accepted."""
    requests = pytest.importorskip("requests")
    prepared = requests.Request("GET", "http://example.com/").prepare()
    requests.auth.HTTPProxyAuth("jürgen", "geheim")(prepared)
    header = prepared.headers["Proxy-Authorization"]
    header = header if isinstance(header, bytes) else header.encode("latin-1")
    authenticator = makeAuth(FORMATS, reactor, clock)
    assert check(authenticator, reactor, header) == "jürgen"


def token(raw: bytes) -> bytes:
    return b"Basic " + base64.b64encode(raw)


OBVIOUS_FAILURES = {
    "missing": None,
    "empty": b"",
    "scheme only": b"Basic",
    "scheme and space": b"Basic ",
    "other scheme": b"Bearer " + base64.b64encode(b"erin:s3cret"),
    "digest": b'Digest username="erin", realm="proxygate"',
    "basic prefix of another scheme": b"Basicx " + base64.b64encode(b"erin:s3cret"),
    "no space": b"Basic" + base64.b64encode(b"erin:s3cret"),
    "auth-param form": b'Basic user="erin"',
    "two tokens": b"Basic " + base64.b64encode(b"erin:s3cret") + b" extra",
    "not base64": b"Basic !!!!",
    "base64 with inner space": b"Basic ZXJpbjpz M2NyZXQ=",
    "base64 missing padding": b"Basic " + base64.b64encode(b"erin:s3cret").rstrip(b"="),
    "urlsafe base64": b"Basic " + base64.urlsafe_b64encode(b"erin:s3cret>>>?"),
    "bad padding": b"Basic ZXJpbjpzM2NyZXQ===",
    "no colon": token(b"erins3cret"),
    "empty user": token(b":s3cret"),
    "only colon": token(b":"),
    "unknown user": token(b"mallory:s3cret"),
    "user case differs": token(b"Erin:s3cret"),
    "NUL in password": token(b"erin:s3cret\x00"),
    "NUL in user": token(b"erin\x00:s3cret"),
    "newline in header": b"Basic " + base64.b64encode(b"erin:s3cret") + b"\r\nX: y",
    "too long": b"Basic " + b"A" * MAX_HEADER_LENGTH,
}


@pytest.mark.parametrize("header", OBVIOUS_FAILURES.values(), ids=OBVIOUS_FAILURES.keys())
def test_obviousFailuresAnswerSynchronously(
    header: bytes | None, reactor: FakeReactor, clock: Clock
) -> None:
    """Malformed or unknown credentials are refused at once, without a thread-pool hop."""
    authenticator = makeAuth(FORMATS, reactor, clock)
    assert fired(authenticator.authenticate(header)) is None
    assert reactor.pool.pending == []


def test_wrongPasswordFails(reactor: FakeReactor, clock: Clock) -> None:
    authenticator = makeAuth(FORMATS, reactor, clock)
    assert check(authenticator, reactor, basic("alice", "correct horse battery stapl")) is None
    assert check(authenticator, reactor, basic("alice", "")) is None


def test_overlongHeaderRefusedWithoutDecoding(
    reactor: FakeReactor, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More than 8 KiB is refused before any base64 or hashing work."""
    authenticator = makeAuth(FORMATS, reactor, clock)
    header = basic("erin", "s3cret" + "x" * MAX_HEADER_LENGTH)
    calls: list[bytes] = []
    monkeypatch.setattr(auth.base64, "b64decode", lambda *a, **k: calls.append(a[0]))
    monkeypatch.setattr(auth.hashlib, "blake2b", lambda *a, **k: calls.append(a[0]))
    assert fired(authenticator.authenticate(header)) is None
    assert calls == []


def test_headerAtTheLimitIsStillChecked(tmp_path: Path, reactor: FakeReactor, clock: Clock) -> None:
    prefix = len(b"Basic ")
    rawLength = (MAX_HEADER_LENGTH - prefix) // 4 * 3
    password = "p" * (rawLength - len("erin:"))
    path = tmp_path / "long"
    path.write_text(
        "erin:{SHA}" + base64.b64encode(hashlib.sha1(password.encode()).digest()).decode()
    )
    authenticator = makeAuth(path, reactor, clock)
    header = basic("erin", password)
    assert len(header) <= MAX_HEADER_LENGTH
    assert check(authenticator, reactor, header) == "erin"


# ---------------------------------------------------------------------------------------------
# Authenticator: caching


def test_cacheHitIsSynchronousAndDoesNotVerifyAgain(
    reactor: FakeReactor, clock: Clock, verifyCalls: list[str]
) -> None:
    authenticator = makeAuth(FORMATS, reactor, clock)
    header = basic("alice", "correct horse battery staple")
    assert check(authenticator, reactor, header) == "alice"
    assert verifyCalls == ["bcrypt"]
    for _ in range(5):
        d = authenticator.authenticate(header)
        assert d.called
        assert fired(d) == "alice"
        assert reactor.pool.pending == []
    assert verifyCalls == ["bcrypt"]


def test_cacheIsKeyedOnTheExactHeader(
    reactor: FakeReactor, clock: Clock, verifyCalls: list[str]
) -> None:
    """Another spelling of the same credentials (scheme case) is a separate entry."""
    authenticator = makeAuth(FORMATS, reactor, clock)
    assert check(authenticator, reactor, basic("erin", "s3cret")) == "erin"
    d = authenticator.authenticate(basic("erin", "s3cret", scheme=b"basic"))
    assert not d.called
    reactor.pool.runAll()
    assert fired(d) == "erin"
    assert verifyCalls == ["sha1", "sha1"]


def test_cacheDoesNotHoldTheHeader(reactor: FakeReactor, clock: Clock) -> None:
    """The cache key is a keyed hash: neither the header nor a plain digest of it is stored."""
    authenticator = makeAuth(FORMATS, reactor, clock)
    header = basic("erin", "s3cret")
    check(authenticator, reactor, header)
    (key,) = authenticator._successes
    assert header not in key
    assert key not in {hashlib.sha256(header).digest(), hashlib.sha1(header).digest()}
    other = makeAuth(FORMATS, reactor, clock)
    check(other, reactor, header)
    assert list(other._successes) != [key]


def test_cacheExpires(reactor: FakeReactor, clock: Clock, verifyCalls: list[str]) -> None:
    authenticator = makeAuth(FORMATS, reactor, clock, cacheSeconds=60)
    header = basic("erin", "s3cret")
    check(authenticator, reactor, header)
    clock.advance(59.9)
    assert fired(authenticator.authenticate(header)) == "erin"
    clock.advance(0.1)
    d = authenticator.authenticate(header)
    assert not d.called
    reactor.pool.runAll()
    assert fired(d) == "erin"
    assert verifyCalls == ["sha1", "sha1"]


def test_cacheExpiryIsAbsoluteNotSliding(
    reactor: FakeReactor, clock: Clock, verifyCalls: list[str]
) -> None:
    authenticator = makeAuth(FORMATS, reactor, clock, cacheSeconds=10)
    header = basic("erin", "s3cret")
    check(authenticator, reactor, header)
    for _ in range(9):
        clock.advance(1)
        assert authenticator.authenticate(header).called
    clock.advance(1)
    assert not authenticator.authenticate(header).called


def test_cacheIsBoundedLru(reactor: FakeReactor, clock: Clock, verifyCalls: list[str]) -> None:
    authenticator = makeAuth(FORMATS, reactor, clock, cacheSize=2)
    erin, bob, mia = basic("erin", "s3cret"), basic("bob", "p@ss:w%rd/#"), basic("mia", "mia-md5")
    check(authenticator, reactor, erin)
    check(authenticator, reactor, bob)
    assert authenticator.authenticate(erin).called  # erin is now the most recently used
    check(authenticator, reactor, mia)  # evicts bob
    assert len(authenticator._successes) == 2
    assert authenticator.authenticate(erin).called
    assert authenticator.authenticate(mia).called
    d = authenticator.authenticate(bob)
    assert not d.called
    reactor.pool.runAll()
    assert fired(d) == "bob"
    assert verifyCalls == ["sha1", "apr1", "md5-crypt", "apr1"]


def test_failuresCachedBriefly(reactor: FakeReactor, clock: Clock, verifyCalls: list[str]) -> None:
    """A burst of identical wrong credentials costs one check; a second later it is re-checked."""
    authenticator = makeAuth(FORMATS, reactor, clock)
    wrong = basic("alice", "guess")
    assert check(authenticator, reactor, wrong) is None
    for _ in range(10):
        d = authenticator.authenticate(wrong)
        assert d.called
        assert fired(d) is None
    assert verifyCalls == ["bcrypt"]
    clock.advance(1.0)
    d = authenticator.authenticate(wrong)
    assert not d.called
    reactor.pool.runAll()
    assert fired(d) is None
    assert verifyCalls == ["bcrypt", "bcrypt"]


def test_failureCacheIsBounded(reactor: FakeReactor, clock: Clock) -> None:
    authenticator = makeAuth(FORMATS, reactor, clock)
    authenticator.failureCacheSize = 3
    for i in range(10):
        assert check(authenticator, reactor, basic("erin", f"guess{i}")) is None
    assert len(authenticator._failures) == 3


def test_identicalConcurrentRequestsShareOneCheck(
    reactor: FakeReactor, clock: Clock, verifyCalls: list[str]
) -> None:
    """A browser opening six connections with new credentials causes one bcrypt, not six."""
    authenticator = makeAuth(FORMATS, reactor, clock)
    header = basic("alice", "correct horse battery staple")
    waiting = [authenticator.authenticate(header) for _ in range(6)]
    assert len(reactor.pool.pending) == 1
    assert not any(d.called for d in waiting)
    reactor.pool.runAll()
    assert [fired(d) for d in waiting] == ["alice"] * 6
    assert verifyCalls == ["bcrypt"]


def test_cancelledWaiterDoesNotDisturbOthers(reactor: FakeReactor, clock: Clock) -> None:
    """A caller whose client went away cancels; the others still get their answer."""
    authenticator = makeAuth(FORMATS, reactor, clock)
    header = basic("erin", "s3cret")
    first = authenticator.authenticate(header)
    second = authenticator.authenticate(header)
    first.cancel()
    with pytest.raises(CancelledError):
        fired(first)
    reactor.pool.runAll()
    assert fired(second) == "erin"
    assert fired(authenticator.authenticate(header)) == "erin"


# ---------------------------------------------------------------------------------------------
# Authenticator: bounding a guessing flood


def test_concurrentChecksAreBounded(reactor: FakeReactor, clock: Clock) -> None:
    authenticator = makeAuth(FORMATS, reactor, clock)
    guesses = [authenticator.authenticate(basic("alice", f"guess{i}")) for i in range(10)]
    assert len(reactor.pool.pending) == 4
    reactor.pool.runOne()
    assert len(reactor.pool.pending) == 4  # the next waiter took the free slot
    reactor.pool.runAll()
    assert reactor.pool.maxPending == 4
    assert [fired(d) for d in guesses] == [None] * 10


def test_cacheHitsBypassTheQueue(reactor: FakeReactor, clock: Clock) -> None:
    """While a flood occupies every slot, a known-good client is still answered at once."""
    authenticator = makeAuth(FORMATS, reactor, clock)
    good = basic("erin", "s3cret")
    check(authenticator, reactor, good)
    for i in range(20):
        authenticator.authenticate(basic("alice", f"guess{i}"))
    assert fired(authenticator.authenticate(good)) == "erin"
    reactor.pool.runAll()


def test_queueOverflowFailsFast(
    reactor: FakeReactor, clock: Clock, logEvents: list[dict[str, Any]]
) -> None:
    authenticator = makeAuth(FORMATS, reactor, clock, maxConcurrent=1, maxWaiting=2)
    queued = [authenticator.authenticate(basic("alice", f"guess{i}")) for i in range(3)]
    assert not any(d.called for d in queued)
    overflow = [authenticator.authenticate(basic("alice", f"more{i}")) for i in range(3)]
    assert [fired(d) for d in overflow] == [None] * 3
    assert len(reactor.pool.pending) == 1
    warnings = [m for m in messages(logEvents) if "Too many password checks" in m]
    assert len(warnings) == 1  # logged once per overload, not per refused request
    reactor.pool.runAll()
    assert [fired(d) for d in queued] == [None] * 3
    good = authenticator.authenticate(basic("erin", "s3cret"))
    reactor.pool.runAll()
    assert fired(good) == "erin"


def test_internalErrorFailsClosedAndIsLogged(
    reactor: FakeReactor,
    clock: Clock,
    monkeypatch: pytest.MonkeyPatch,
    logEvents: list[dict[str, Any]],
) -> None:
    authenticator = makeAuth(FORMATS, reactor, clock)

    def broken(self: Verifier, password: bytes) -> bool:
        raise RuntimeError("boom " + password.decode())

    monkeypatch.setattr(Verifier, "verify", broken)
    assert check(authenticator, reactor, basic("erin", "s3cret")) is None
    logged = messages(logEvents)
    assert any("failed internally (RuntimeError)" in m and "erin" in m for m in logged)
    assert not any("s3cret" in m for m in logged)
    assert authenticator._successes == {}


# ---------------------------------------------------------------------------------------------
# Authenticator: reloading


def test_reloadAppliesRemovedUserAndChangedPassword(
    htfile: Path, reactor: FakeReactor, clock: Clock
) -> None:
    authenticator = makeAuth(htfile, reactor, clock)
    alice = basic("alice", "correct horse battery staple")
    erin = basic("erin", "s3cret")
    assert check(authenticator, reactor, alice) == "alice"
    assert check(authenticator, reactor, erin) == "erin"
    assert check(authenticator, reactor, basic("zoe", "new")) is None  # failure cached
    text = htfile.read_text("utf-8")
    kept = [ln for ln in text.splitlines() if not ln.startswith(("alice:", "erin:"))]
    rewrite(
        htfile, "\n".join(kept) + "\n" + bcryptLine("erin", "changed") + bcryptLine("zoe", "new")
    )
    authenticator.reload()
    assert "alice" not in authenticator.users
    assert fired(authenticator.authenticate(alice)) is None  # cached success was dropped
    assert check(authenticator, reactor, erin) is None
    assert check(authenticator, reactor, basic("erin", "changed")) == "erin"
    assert check(authenticator, reactor, basic("zoe", "new")) == "zoe"


def test_reloadWithBadFileKeepsOldUsers(
    htfile: Path, reactor: FakeReactor, clock: Clock, logEvents: list[dict[str, Any]]
) -> None:
    authenticator = makeAuth(htfile, reactor, clock)
    erin = basic("erin", "s3cret")
    assert check(authenticator, reactor, erin) == "erin"
    rewrite(htfile, "# edited\nerin:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=\nmallory:letmein\n")
    authenticator.reload()  # must not raise
    assert authenticator.users == frozenset(FIXTURE_USERS)
    assert fired(authenticator.authenticate(erin)) == "erin"  # cache kept too
    assert check(authenticator, reactor, basic("bob", "p@ss:w%rd/#")) == "bob"
    logged = messages(logEvents)
    errors = [m for m in logged if "Not reloading htpasswd" in m]
    assert len(errors) == 1
    assert "line 3: user 'mallory': plain-text passwords are not accepted" in errors[0]
    assert "keeping the 13 users" in errors[0]
    assert not any("letmein" in m or "W6ph5Mm5" in m for m in logged)


def test_reloadWithUnreadableFileKeepsOldUsers(
    htfile: Path, reactor: FakeReactor, clock: Clock, logEvents: list[dict[str, Any]]
) -> None:
    authenticator = makeAuth(htfile, reactor, clock)
    htfile.unlink()
    authenticator.reload()
    assert authenticator.users == frozenset(FIXTURE_USERS)
    assert any("cannot read" in m for m in messages(logEvents))


def test_reloadLogsSuccess(
    htfile: Path, reactor: FakeReactor, clock: Clock, logEvents: list[dict[str, Any]]
) -> None:
    authenticator = makeAuth(htfile, reactor, clock)
    authenticator.reload()
    assert f"Loaded htpasswd {htfile}: 13 users" in messages(logEvents)


def test_reloadDuringCheckRefusesRemovedUser(
    htfile: Path, reactor: FakeReactor, clock: Clock
) -> None:
    """A check started before the reload must not let a just-removed user in."""
    authenticator = makeAuth(htfile, reactor, clock)
    d = authenticator.authenticate(basic("erin", "s3cret"))
    rewrite(htfile, bcryptLine("alice", "x"))
    authenticator.reload()
    reactor.pool.runAll()
    assert fired(d) is None


def test_reloadDuringCheckKeepsUnchangedUserButDoesNotCache(
    htfile: Path, reactor: FakeReactor, clock: Clock, verifyCalls: list[str]
) -> None:
    authenticator = makeAuth(htfile, reactor, clock)
    header = basic("erin", "s3cret")
    d = authenticator.authenticate(header)
    rewrite(htfile, htfile.read_text("utf-8") + bcryptLine("zoe", "new"))
    authenticator.reload()
    reactor.pool.runAll()
    assert fired(d) == "erin"
    assert not authenticator.authenticate(header).called
    reactor.pool.runAll()
    assert verifyCalls == ["sha1", "sha1"]


def test_maybeReloadOnMtimeChange(
    htfile: Path,
    reactor: FakeReactor,
    clock: Clock,
    verifyCalls: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """
    Same size, same inode, new content and mtime: noticed at the next once-a-second stat, and
    the cached success for the old password is gone.
    """
    authenticator = makeAuth(htfile, reactor, clock)
    old = basic("alice", "correct horse battery staple")
    assert check(authenticator, reactor, old) == "alice"
    text = htfile.read_text("utf-8")
    aliceLine = next(ln for ln in text.splitlines() if ln.startswith("alice:"))
    newLine = bcryptLine("alice", "new password").rstrip("\n")
    assert len(newLine) == len(aliceLine)
    inode = htfile.stat().st_ino
    rewrite(htfile, text.replace(aliceLine, newLine), mtimeBump=5)
    assert htfile.stat().st_ino == inode
    assert len(htfile.read_bytes()) == len(text.encode())

    stats: list[str] = []
    realStat = os.stat

    def countingStat(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        stats.append(str(path))
        return realStat(path, *args, **kwargs)

    monkeypatch.setattr(auth.os, "stat", countingStat)
    clock.advance(0.5)
    for _ in range(100):
        authenticator.maybeReload()
    assert stats == []  # less than a second since start-up
    assert fired(authenticator.authenticate(old)) == "alice"
    clock.advance(0.5)
    for _ in range(100):
        authenticator.maybeReload()
    assert stats == [str(htfile)]  # once, not per call
    assert check(authenticator, reactor, old) is None
    assert check(authenticator, reactor, basic("alice", "new password")) == "alice"
    clock.advance(1.0)
    authenticator.maybeReload()
    assert len(stats) == 2


def test_maybeReloadOnInodeChange(htfile: Path, reactor: FakeReactor, clock: Clock) -> None:
    """An atomic replace (write elsewhere, rename over) is noticed even with the same mtime."""
    authenticator = makeAuth(htfile, reactor, clock)
    stat = htfile.stat()
    text = htfile.read_text("utf-8")
    erinLine = next(ln for ln in text.splitlines() if ln.startswith("erin:"))
    replacement = htfile.with_name("users.tmp")
    replacement.write_text(text.replace(erinLine, "zara:" + erinLine[5:]), encoding="utf-8")
    os.utime(replacement, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    os.replace(replacement, htfile)
    assert htfile.stat().st_size == stat.st_size
    clock.advance(1.0)
    authenticator.maybeReload()
    assert "zara" in authenticator.users
    assert "erin" not in authenticator.users


def test_maybeReloadWithoutChangeDoesNothing(
    htfile: Path, reactor: FakeReactor, clock: Clock, verifyCalls: list[str]
) -> None:
    authenticator = makeAuth(htfile, reactor, clock)
    header = basic("erin", "s3cret")
    check(authenticator, reactor, header)
    clock.advance(5)
    authenticator.maybeReload()
    assert authenticator.authenticate(header).called  # cache survived


def test_maybeReloadWithBadFileLogsOncePerChange(
    htfile: Path, reactor: FakeReactor, clock: Clock, logEvents: list[dict[str, Any]]
) -> None:
    authenticator = makeAuth(htfile, reactor, clock)
    good = htfile.read_text("utf-8")
    rewrite(htfile, "broken\n")
    for _ in range(5):
        clock.advance(1.0)
        authenticator.maybeReload()
    assert len([m for m in messages(logEvents) if "Not reloading" in m]) == 1
    assert authenticator.users == frozenset(FIXTURE_USERS)
    rewrite(htfile, good + bcryptLine("zoe", "new"))
    clock.advance(1.0)
    authenticator.maybeReload()
    assert "zoe" in authenticator.users


def test_maybeReloadWithMissingFileLogsOnceAndKeepsUsers(
    htfile: Path, reactor: FakeReactor, clock: Clock, logEvents: list[dict[str, Any]]
) -> None:
    authenticator = makeAuth(htfile, reactor, clock)
    good = htfile.read_text("utf-8")
    htfile.unlink()
    for _ in range(5):
        clock.advance(1.0)
        authenticator.maybeReload()
    errors = [m for m in messages(logEvents) if "Cannot stat htpasswd" in m]
    assert len(errors) == 1
    assert authenticator.users == frozenset(FIXTURE_USERS)
    assert check(authenticator, reactor, basic("erin", "s3cret")) == "erin"
    htfile.write_text(good + bcryptLine("zoe", "new"), encoding="utf-8")
    clock.advance(1.0)
    authenticator.maybeReload()
    assert "zoe" in authenticator.users


# ---------------------------------------------------------------------------------------------
# secrets stay out of logs


def test_nothingSecretIsLogged(
    htfile: Path,
    reactor: FakeReactor,
    clock: Clock,
    logEvents: list[dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Walk through successes, failures, overload, errors and reloads; grep every log event."""
    authenticator = makeAuth(htfile, reactor, clock, maxConcurrent=1, maxWaiting=1)
    headers = [
        basic("alice", "correct horse battery staple"),
        basic("alice", "WrongHorse"),
        basic("carol", "pässwörd", "latin-1"),
        basic("nobody", "NobodysSecret"),
    ]
    for header in headers:
        authenticator.authenticate(header)
    reactor.pool.runAll()
    rewrite(htfile, htfile.read_text("utf-8") + "mallory:PlainTextSecret\n")
    authenticator.reload()
    clock.advance(2)
    authenticator.maybeReload()
    original = Verifier.verify
    monkeypatch.setattr(Verifier, "verify", lambda self, pw: 1 / 0)
    check(authenticator, reactor, basic("erin", "ErinSecret"))
    monkeypatch.setattr(Verifier, "verify", original)
    assert logEvents
    dumped = "\n".join(repr(e) + formatEvent(e) for e in logEvents)
    secrets = ["correct horse", "WrongHorse", "pässwörd", "NobodysSecret", "PlainTextSecret"]
    secrets += ["ErinSecret", "$2y$", "{SHA}", "$apr1$"]
    secrets += [h.split(b" ")[1].decode() for h in headers]
    for secret in secrets:
        assert secret not in dumped


# ---------------------------------------------------------------------------------------------
# fuzzing the header parser


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        st.binary(max_size=300),
        st.builds(
            lambda scheme, raw: scheme + b" " + base64.b64encode(raw),
            st.sampled_from([b"Basic", b"basic", b"Bearer"]),
            st.binary(max_size=120),
        ),
        st.builds(
            lambda user, pw: basic(user, pw),
            st.sampled_from(["erin", "bob", "mia", "jürgen", "mallory"]),
            st.binary(max_size=80),
        ),
    )
)
def test_authenticateNeverRaises(header: bytes) -> None:
    """Whatever the client sends, the answer is a user name or None, never an exception."""
    reactor, clock = FakeReactor(), Clock()
    authenticator = makeAuth(FORMATS, reactor, clock)
    result = check(authenticator, reactor, header)
    assert result is None or result in FIXTURE_USERS


# ---------------------------------------------------------------------------------------------
# real reactor and thread pool


@pytest_twisted.inlineCallbacks
def test_realThreadPool() -> Any:
    """End to end with the global reactor's thread pool: miss, then synchronous hit."""
    authenticator = Authenticator(str(FORMATS), "proxygate")
    header = basic("alice", "correct horse battery staple")
    d = authenticator.authenticate(header)
    assert not d.called
    user = yield d
    assert user == "alice"
    again = authenticator.authenticate(header)
    assert again.called
    assert (yield again) == "alice"


# ---------------------------------------------------------------------------------------------
# against the real htpasswd binary (skipped without apache2-utils)


AWKWARD_PASSWORDS = ["p@ss:w%rd/#", "pässwörd", "€uro", "with space", "'\"\\`$(x)", "a"]
HTPASSWD_FLAGS = [["-B", "-C", "4"], ["-m"], ["-2"], ["-5"], ["-s"], ["-2", "-r", "1500"]]


def runHtpasswd(*args: str) -> str:
    assert HTPASSWD is not None
    done = subprocess.run(
        [HTPASSWD, *args], capture_output=True, check=True, env={**os.environ, "LC_ALL": "C.UTF-8"}
    )
    return done.stdout.decode("utf-8")


@needsHtpasswd
@pytest.mark.parametrize("flags", HTPASSWD_FLAGS, ids=" ".join)
def test_htpasswdBinaryOutputVerifies(flags: list[str]) -> None:
    for password in AWKWARD_PASSWORDS:
        line = runHtpasswd("-nb", *flags, "user", password)
        verifier = parseHtpasswd(line, "htpasswd output")["user"]
        assert verifier.verify(password.encode())
        assert not verifier.verify(password.encode() + b"x")


@needsHtpasswd
@pytest.mark.parametrize(
    ("flag", "problem"),
    [("-p", "plain-text passwords"), ("-d", "plain-text or DES-crypt passwords")],
)
def test_htpasswdBinaryInsecureFormatsRefused(flag: str, problem: str) -> None:
    line = runHtpasswd("-nb", flag, "user", "secret12")
    with pytest.raises(HtpasswdError, match=problem):
        parseHtpasswd(line, "htpasswd output")


@needsHtpasswd
def test_htpasswdBinaryFileEndToEnd(tmp_path: Path, reactor: FakeReactor, clock: Clock) -> None:
    """A file built and edited by htpasswd itself, authenticated and then reloaded."""
    path = tmp_path / "users"
    runHtpasswd("-cbB", "-C", "4", str(path), "curl", "pässwörd")
    runHtpasswd("-bm", str(path), "requests", "pässwörd")
    authenticator = makeAuth(path, reactor, clock)
    assert check(authenticator, reactor, basic("curl", "pässwörd", "utf-8")) == "curl"
    assert check(authenticator, reactor, basic("requests", "pässwörd", "latin-1")) == "requests"
    runHtpasswd("-D", str(path), "curl")
    authenticator.reload()
    assert authenticator.users == frozenset({"requests"})
