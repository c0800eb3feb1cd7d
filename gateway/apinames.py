# -*- test-case-name: tests.test_apinames -*-
"""
The C{api} label of decrypted requests: the path a request calls, with everything that
identifies a thing or carries a secret folded, so that one endpoint is one series and no
secret from a URL reaches Prometheus.

The rule, segment by segment (the path without its query, at most L{MAX_SEGMENTS}
non-empty segments, each percent-decoded, matrix parameters after C{;} dropped):

==========================================================  ==========
a segment that                                              becomes
==========================================================  ==========
holds an C{@} (an e-mail address, C{user@host})             C{:email}
is a digest: C{sha256:…}, C{md5=…}, C{blake2b-…} + hex/b64  C{:digest}
is a JWT (C{eyJ…}), starts like a known API key             C{:token}
(C{sk_live_}, C{ghp_}, C{xoxb-}, C{AKIA…}, C{AIza…}, …)
is longer than 40 characters, or holds anything but         C{:token}
ASCII letters, digits and C{-._~:+}
is digits (with C{-_.,:} between: dates, versions, ids)     C{:id}
is a UUID, or 8+ hexadecimal digits                         C{:id}
is 6+ characters and not made of words (below)              C{:id} with a digit,
                                                            else C{:token}
==========================================================  ==========

Everything else is kept as it is: readable names. A segment is "made of words" when

- letters and digits alternate fewer than four times (C{a1b2-c3d4} does not);
- each of its pieces (separated by C{-_.:~+}) is at most four characters (C{v2}, C{k8s},
  C{4o}), a version (C{v1beta2}), or letters with at most three digits at the end whose
  camelCase parts (C{getUserID}: get, User, ID) hold at most one part of one or two
  letters that is not an acronym (random mixed case falls apart into many: C{kJGKFJyNcGs})
  and, from five letters on, a vowel;
- its runs of letters read like names: a table of how much likelier each letter pair is
  in identifiers than in random letters (built from Python's standard library) scores
  each run of eight letters or more, and the whole segment's letters once they make twelve
  pairs (a token cut into word-sized pieces by C{-} and C{_} is still random).

So C{/v1/users/:id/repos}, C{/pkg.Service/Method}, C{/api/v2beta1/oauth2-token} and
C{/apis/apiextensions.k8s.io} keep their names, and C{a1b2c3d4}, C{dQw4w9WgXcQ},
C{dGhpcyBpcyBzZWNyZXQ} and random letters of twelve or more do not. A file extension
survives the folding of its stem (C{123.json} becomes C{:id.json}).

What the rule cannot tell from a name, it keeps: a user name that reads like a word
(C{/users/alice}) stays, and so do a few random strings shorter than twelve characters
that happen to read like one (of random lower-case letters, one in seven at eight
letters, one in forty at twelve; of random base62, one in a hundred at ten characters,
none seen at sixteen). Acronym-heavy or vowel-less names (C{HTTPSProxy}, C{xmlrpc}) may
be folded. The series cap of L{gateway.metrics.Metrics.api} bounds what that
can cost, and L{MAX_SEGMENTS} keeps deep paths from multiplying series.
"""

from __future__ import annotations

import re
from urllib.parse import unquote_to_bytes

__all__ = ["MAX_SEGMENTS", "foldSegment", "grpcMethod", "normaliseAPI"]

#: Segments kept per path: enough for /v1/users/:id/repos, and a bound on series per API.
MAX_SEGMENTS = 4
#: Longer readable segments are rarer than secrets of that length: fold them.
MAX_NAME = 40
#: Shorter segments are kept whatever they look like: too short to be a secret (x509, a1).
MIN_TOKEN = 6

_SAFE = re.compile(r"[A-Za-z0-9._~:+\-]+")
_DIGITS = re.compile(r"[0-9]+(?:[-_.,:][0-9]+)*")
_UUID = re.compile(
    r"[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}"
)
_HEX = re.compile(r"(?:0[xX])?[0-9a-fA-F]{8,}")
_DIGEST = re.compile(
    r"(?:md5|sha-?1|sha-?224|sha-?256|sha-?384|sha-?512|sha3-\d+|blake2[bs]?|blake3|b3|crc32c?)"
    r"[:=_\-][A-Za-z0-9+/=_\-]{8,}",
    re.IGNORECASE,
)
_JWT = re.compile(r"eyJ[A-Za-z0-9_\-]*")
# Prefixes of widely used API keys and tokens (Stripe, GitHub, GitLab, Slack, AWS, Google,
# npm, PyPI, Hugging Face, Shopify, DigitalOcean, SendGrid, OpenAI, Anthropic): a short one
# would pass the entropy rules below.
_KEY = re.compile(
    r"(?:(?:sk|pk|rk)_(?:live|test)_|whsec_|ghp_|gho_|ghu_|ghs_|ghr_|github_pat_|glpat-|"
    r"xox[abposr]-|xapp-|(?:AKIA|ASIA)[0-9A-Z]{12}|AIza|ya29\.|npm_|pypi-|hf_|shp(?:at|ss|ca)_|"
    r"dop_v1_|SG\.|sk-(?:proj-|ant-)?)",
)
_PIECES = re.compile(r"[-_.:~+]")
_EXTENSION = re.compile(r"(.+)\.([A-Za-z][A-Za-z0-9]{0,4})")
_NUMBER = re.compile(r"[0-9]{1,4}|v[0-9]{1,3}(?:(?:alpha|beta|rc)[0-9]{0,3})?")
_TRAILING_DIGITS = re.compile(r"([A-Za-z]+)[0-9]{0,3}")
# camelCase, PascalCase, acronyms: getUserID -> get, User, ID; iOS -> i, OS.
_CAMEL = re.compile(r"[A-Z]{2,}(?![a-z])|[A-Z]?[a-z]+|[A-Z]")
# How much likelier each letter pair (row: first letter, column: second) is in names than
# in random letters: log2 of the ratio, plus 5, clipped to 0-9. Counted over the words of
# the identifiers in Python's standard library (camelCase and snake_case split), each
# distinct word weighted by the log of its count.
_PAIRS = (
    "36773462614877161878554452"
    "63436321641622530553511040"
    "72547327506643831657521040"
    "64458432721533631554522130"
    "75786653513768465988355742"
    "52335621700523630544501030"
    "52327135500435420653411010"
    "61237201602322610435300030"
    "65766561213769762677250405"
    "30003000201000300020300000"
    "41226231400322220242202010"
    "73458331812733740365531160"
    "75247211602453660253510020"
    "73777583614435741378552130"
    "55663552525768560866756421"
    "72447325503623650756512050"
    "00000000000200001221500000"
    "74659452704565740677543050"
    "53648436714544663478634150"
    "74548437802544750776534262"
    "55545440501667360666010100"
    "62317211500121320232002020"
    "51225204501214420441001000"
    "21424301400231250125110320"
    "32324220300344350244012011"
    "30005000300000200001000000"
)
#: A run of 8 to 11 letters must score at least -0.6 (random letters score below nine
#: times in ten), one of 12 or more at least 0 (random letters: 97 in 100); names (the
#: standard library's identifiers, common API paths) score above 98 times in 100. The
#: letters of a whole segment (pairs within its runs) must score at least -0.2 once they
#: make 12 pairs or more: a token cut into word-sized pieces by '-' and '_' is still random.
_RUN_SCORES = ((12, 0.0), (8, -0.6))
_SEGMENT_PAIRS = 12
_SEGMENT_SCORE = -0.2
_LETTER_RUNS = re.compile(r"[A-Za-z]+")
_SWITCHES = re.compile(r"(?<=[A-Za-z])[0-9]|(?<=[0-9])[A-Za-z]")


def _pairTotal(lower: str) -> int:
    """The sum of the log-likelihood ratios (name against random letters) of C{lower}'s pairs."""
    total = 0
    for i in range(len(lower) - 1):
        total += ord(_PAIRS[(ord(lower[i]) - 97) * 26 + ord(lower[i + 1]) - 97]) - 53
    return total


def _runReadable(letters: str) -> bool:
    for length, score in _RUN_SCORES:
        if len(letters) >= length:
            return _pairTotal(letters.lower()) >= score * (len(letters) - 1)
    return True


def _wordlike(piece: str) -> bool:
    """One piece of a name (between separators): see the module docstring."""
    if len(piece) <= 4 or _NUMBER.fullmatch(piece):
        return True  # v2, k8s, i18n, 4o, 2024: too short to carry a secret
    match = _TRAILING_DIGITS.fullmatch(piece)
    if match is None:
        return False
    letters = match.group(1)
    words = _CAMEL.findall(letters)
    # Random mixed case falls apart into many one- and two-letter parts (kJGKFJyNcGs:
    # k, J, G, K, F, Jy, Nc, Gs); real camelCase has at most one (iPhone, eBay, getUserID).
    if sum(len(w) == 1 or (len(w) == 2 and not w.isupper()) for w in words) > 1:
        return False
    # A longer run of letters reads like words: its letter pairs are those of names.
    if not _runReadable(letters):
        return False
    return all(len(w) < 5 or any(c in "aeiouyAEIOUY" for c in w) for w in words)


def _wordy(segment: str) -> bool:
    if len(_SWITCHES.findall(segment)) >= 4:
        return False  # a1b2-c3d4-e5f6: letters and digits interleaved, in short pieces
    if not all(_wordlike(piece) for piece in _PIECES.split(segment)):
        return False
    runs = [run.lower() for run in _LETTER_RUNS.findall(segment) if len(run) > 1]
    pairs = sum(len(run) - 1 for run in runs)
    return pairs < _SEGMENT_PAIRS or sum(map(_pairTotal, runs)) >= _SEGMENT_SCORE * pairs


def foldSegment(segment: str) -> str:
    """One decoded path segment as it appears in the label (see the module's table)."""
    if "@" in segment:
        return ":email"
    if _DIGEST.fullmatch(segment):
        return ":digest"
    if _JWT.match(segment) or _KEY.match(segment):
        return ":token"
    if not _SAFE.fullmatch(segment) or len(segment) > MAX_NAME:
        return ":token"
    if _DIGITS.fullmatch(segment) or _UUID.fullmatch(segment) or _HEX.fullmatch(segment):
        return ":id"
    extension = _EXTENSION.fullmatch(segment)
    if extension is not None:
        stem, ext = extension.groups()
        folded = foldSegment(stem)
        if folded != stem:
            return f"{folded}.{ext}"
    if len(segment) < MIN_TOKEN or _wordy(segment):
        return segment
    return ":id" if any(c.isdigit() for c in segment) else ":token"


#: A gRPC method path (the gRPC over HTTP/2 protocol: "/" Service-Name "/" method name),
#: as protobuf spells them: dotted identifiers, then an identifier.
_GRPC_PATH = re.compile(
    rb"/[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*/[A-Za-z_][A-Za-z0-9_]*"
)
#: Longer gRPC paths are folded like any other (real ones are well under this).
MAX_GRPC_PATH = 200


def grpcMethod(path: bytes) -> str | None:
    """
    The C{api} label of a gRPC call (its content-type says application/grpc): the full
    method path, C{/pkg.Service/Method}, never folded, since it names code, not data; None
    when the path does not have that shape (then it is folded as any path is). The
    series cap of L{gateway.metrics.Metrics.api} bounds what a client can make of it.
    """
    path = path.split(b"?", 1)[0]
    if len(path) <= MAX_GRPC_PATH and _GRPC_PATH.fullmatch(path):
        return path.decode("ascii")
    return None


_apis: dict[bytes, str] = {}


def normaliseAPI(path: bytes) -> str:
    """
    The API a request calls, for metric labels: C{/v1/users/:id/repos}. See the module.

    Results are remembered per path (clients repeat them), in a memo emptied when full.
    """
    path = path.split(b"?", 1)[0]
    api = _apis.get(path)
    if api is None:
        folded = []
        for raw in path.split(b"/"):
            raw = raw.split(b";", 1)[0]
            if not raw:
                continue
            text = unquote_to_bytes(raw).decode("utf-8", "replace")
            folded.append(foldSegment(text) if text else ":token")
            if len(folded) == MAX_SEGMENTS:
                break
        api = "/" + "/".join(folded)
        if len(_apis) >= 4096:
            _apis.clear()
        _apis[path] = api
    return api
