"""
The C{api} label of decrypted requests (issue 19, item 11): secrets in URL paths never reach
Prometheus, readable names do, and the method is a label.

- In process, L{normaliseAPI} over thousands of real-looking secrets (JWTs, Stripe, GitHub,
  Slack, AWS, Google, OpenAI keys, e-mail addresses plain and percent-encoded, digests,
  UUIDs, hex, base64, base64url and base62 tokens, numeric ids): none survives, not even an
  eight-character piece of it. Short random strings without structure are folded at the
  documented rates. A list of real API path names survives unchanged.
- End to end through an intercepting proxy: GET, PUT and DELETE on one path are three
  series of ``proxygate_api_requests_total{host,api,method,code}``, and a scrape holds no
  e-mail address or token that the requests carried in their paths.
"""

from __future__ import annotations

import base64
import random
import re
import string
import urllib.parse
import uuid

import pytest

from gateway.apinames import foldSegment, normaliseAPI
from gateway.metrics import Metrics
from tests.test_mitm import (  # noqa: F401 (fixtures)
    _closeSessions,
    fetchCA,
    httpsOrigin,
    mitmIni,
    pki,
    pkiDir,
    session,
)

SAMPLES = 400
_rnd = random.Random(19)
ALNUM = string.ascii_letters + string.digits


def _pick(alphabet: str, n: int) -> str:
    return "".join(_rnd.choice(alphabet) for _ in range(n))


def _b64(n: int) -> str:
    return base64.b64encode(_rnd.randbytes(n)).decode()


def _b64url(n: int) -> str:
    return base64.urlsafe_b64encode(_rnd.randbytes(n)).decode().rstrip("=")


def _jwt() -> str:
    header = base64.urlsafe_b64encode(b'{"alg":"HS256","typ":"JWT"}').decode().rstrip("=")
    claims = f'{{"sub":"{_rnd.randrange(10**9)}","email":"a@b.c","iat":{_rnd.randrange(10**10)}}}'
    body = base64.urlsafe_b64encode(claims.encode()).decode().rstrip("=")
    return f"{header}.{body}.{_b64url(32)}"


def _email() -> str:
    user = _pick(string.ascii_lowercase, _rnd.randint(3, 10))
    if _rnd.random() < 0.5:
        user += "." + _pick(string.ascii_lowercase, _rnd.randint(2, 8))
    return f"{user}@{_rnd.choice(['example.com', 'corp.example.org', 'mail.co.uk'])}"


#: Secret shapes that must never survive, not once.
SECRETS = {
    "jwt": _jwt,
    "stripe secret": lambda: "sk_live_" + _pick(ALNUM, 24),
    "stripe test": lambda: "sk_test_" + _pick(ALNUM, 99),
    "stripe publishable": lambda: "pk_live_" + _pick(ALNUM, 24),
    "stripe restricted": lambda: "rk_live_" + _pick(ALNUM, 24),
    "stripe webhook": lambda: "whsec_" + _pick(ALNUM, 32),
    "github classic": lambda: "ghp_" + _pick(ALNUM, 36),
    "github oauth": lambda: "gho_" + _pick(ALNUM, 36),
    "github fine-grained": lambda: "github_pat_" + _pick(ALNUM + "_", 82),
    "gitlab": lambda: "glpat-" + _pick(ALNUM + "-_", 20),
    "slack bot": lambda: (
        f"xoxb-{_rnd.randrange(10**12)}-{_rnd.randrange(10**12)}-" + _pick(ALNUM, 24)
    ),
    "aws access key": lambda: "AKIA" + _pick(string.ascii_uppercase + "234567", 16),
    "aws secret": lambda: _pick(ALNUM + "/+", 40).replace("/", "+"),
    "google api key": lambda: "AIza" + _pick(ALNUM + "-_", 35),
    "openai": lambda: "sk-proj-" + _pick(ALNUM + "-_", 48),
    "anthropic": lambda: "sk-ant-api03-" + _pick(ALNUM + "-_", 93),
    "npm": lambda: "npm_" + _pick(ALNUM, 36),
    "huggingface": lambda: "hf_" + _pick(ALNUM, 34),
    "email": _email,
    "email encoded": lambda: urllib.parse.quote(_email(), safe=""),
    "sha256 digest": lambda: "sha256:" + _rnd.randbytes(32).hex(),
    "sha512 sri": lambda: urllib.parse.quote("sha512-" + _b64(64), safe=""),
    "md5 param": lambda: "md5=" + _rnd.randbytes(16).hex(),
    "uuid": lambda: str(uuid.UUID(bytes=_rnd.randbytes(16))),
    "uuid hex": lambda: uuid.UUID(bytes=_rnd.randbytes(16)).hex,
    "hex 8": lambda: _rnd.randbytes(4).hex(),
    "hex 20": lambda: _rnd.randbytes(20).hex(),
    # In a path segment, base64's '/' must be percent-encoded (else it is two segments).
    "base64 18": lambda: urllib.parse.quote(_b64(18), safe=""),
    "base64url 16": lambda: _b64url(16),
    "base64url 32": lambda: _b64url(32),
    "base62 16": lambda: _pick(ALNUM, 16),
    "base62 22": lambda: _pick(ALNUM, 22),
    "base62 32": lambda: _pick(ALNUM, 32),
    "upper+digits 20": lambda: _pick(string.ascii_uppercase + string.digits, 20),
    "numeric id": lambda: str(_rnd.randrange(10**12)),
    "interleaved": lambda: "-".join(
        _pick(string.ascii_lowercase, 1) + str(_rnd.randrange(10)) for _ in range(4)
    ),
}


def _leaks(secret: str, label: str) -> bool:
    """The secret, or any eight-character piece of it, is in the label."""
    if len(secret) <= 8:
        return secret in label
    return any(secret[i : i + 8] in label for i in range(len(secret) - 7))


@pytest.mark.parametrize("shape", sorted(SECRETS))
def test_secretShapesNeverSurvive(shape):
    make = SECRETS[shape]
    for _ in range(SAMPLES):
        secret = make()
        for path in (f"/v1/{secret}/items", f"/{secret}", f"/api/users/{secret}.json"):
            label = normaliseAPI(path.encode())
            assert not _leaks(secret, label), (shape, secret, label)


#: Shapes the rule folds most of the time only (the module docstring gives the rates).
SHORT = {
    "base62 10": (lambda: _pick(ALNUM, 10), 0.03),
    "base64url 11": (lambda: _b64url(8), 0.04),
    "random lower 12": (lambda: _pick(string.ascii_lowercase, 12), 0.06),
    "random lower 16": (lambda: _pick(string.ascii_lowercase, 16), 0.03),
    "random upper 20": (lambda: _pick(string.ascii_uppercase, 20), 0.02),
    "random lower 24": (lambda: _pick(string.ascii_lowercase, 24), 0.01),
    "youtube-like": (lambda: _pick(ALNUM, 10) + str(_rnd.randrange(10)), 0.02),
}


@pytest.mark.parametrize("shape", sorted(SHORT))
def test_shortRandomShapesMostlyFolded(shape):
    make, rate = SHORT[shape]
    kept = sum(foldSegment(s) == s for s in (make() for _ in range(2000)))
    assert kept <= rate * 2000, (shape, kept)


NAMES = re.findall(
    r"\S+",
    """
users repos v1 v2 v2beta1 v1alpha3 oauth2-token pkg.Service Method getUserRepositories
README CHANGELOG LICENSE iPhone x:batchGet documents:batchGet api healthz metrics simple
requests packages manifests blobs uploads library ubuntu python3 sha256 x509 graphql
organization-settings search index.html favicon.ico robots.txt api-docs swagger.json
openapi.yaml .well-known acme-challenge kubernetes namespaces deployments statefulsets
configmaps serviceaccounts customresourcedefinitions apiextensions.k8s.io WeatherForecast
GetUser ListObjectsV2 us-east-1 eu-west-2 amazonaws storage googleapis compute instances
europe-west1-b pypi files json login logout callback authorize token userinfo jwks.json
openid-configuration wp-admin admin-ajax.php chat completions embeddings messages models
gpt-4o claude-3-5-sonnet llama3 datasets resolve main HEAD refs git-upload-pack lfs
objects batch releases latest download assets npm lodash react-dom typescript jquery.min.js
Roboto-Regular.ttf conda-forge noarch repodata.json linux-64 cran contrib PACKAGES.gz
bioconductor rstudio shiny jupyter kernelspecs notebooks nbextensions healthcheck status
ping version subscriptions webhooks events invoices customers charges payment_intents
checkout sessions billing_portal getUserID XMLHttpRequest userProfile accountSettings
orders products categories inventory shipments notifications preferences permissions
roles groups members teams projects issues pulls comments reviews commits branches tags
contents archive tarball workflows runs jobs logs artifacts secrets variables environments
requests-2.31.0-py3-none-any.whl numpy-1.26.4.tar.gz
""",
)


@pytest.mark.parametrize("name", NAMES)
def test_readableNamesSurvive(name):
    assert foldSegment(name) == name


@pytest.mark.parametrize(
    ("path", "api"),
    [
        (b"/v1/users/12345/repos", "/v1/users/:id/repos"),
        (b"/v1/users/alice%40example.com/keys", "/v1/users/:email/keys"),
        (b"/v2/library/ubuntu/blobs/sha256:" + b"ab" * 32, "/v2/library/ubuntu/blobs"),
        (b"/v2/ubuntu/blobs/sha256:" + b"ab" * 32, "/v2/ubuntu/blobs/:digest"),
        (b"/files/123.json?token=abc", "/files/:id.json"),
        (b"/index;jsessionid=0123456789ABCDEF/x", "/index/x"),
        (b"/pkg.Service/Method", "/pkg.Service/Method"),
        (b"//a///b/", "/a/b"),
        (b"/", "/"),
        (b"/caf%C3%A9/x", "/:token/x"),
        (b"/%00%0d%0a/x", "/:token/x"),
        (b"/" + b"a" * 41, "/:token"),
        (b"/a/b/c/d/e/f", "/a/b/c/d"),
    ],
)
def test_normalisedPaths(path, api):
    assert normaliseAPI(path) == api


def test_methodIsALabelAndSeriesStayCapped():
    metrics = Metrics()
    metrics.maxAPISeries = 3
    for method in (b"GET", b"PUT", b"DELETE", b"BREW"):
        metrics.api("h", "/v1/x", method, 200, 0.01, 10)
    for i in range(10):
        metrics.api("h", f"/v1/x{i}", b"GET", 200, 0.01, 10)
    text = b"".join(
        f"{s.name}{s.labels}\n".encode()
        for family in metrics.registry.collect()
        for s in family.samples
        if s.name == "proxygate_api_requests_total"
    )
    for method in ("GET", "PUT", "DELETE", "OTHER"):
        assert f"'method': '{method}'".encode() in text
    assert b"BREW" not in text
    assert len(metrics.live.apis) == 4  # three named pairs, then "other"
    assert ("other", "other") in metrics.live.apis


# -- end to end ----------------------------------------------------------------------------


def test_apiLabelsThroughAnInterceptingProxy(startProxy, tmp_path, pki, httpsOrigin):  # noqa: F811
    proxy = startProxy(mitmIni(bundle=pki.caCert))
    ca = fetchCA(proxy, tmp_path)
    s = session(proxy)
    base = f"https://localhost:{httpsOrigin.port}"
    jwt, key, email = _jwt(), "sk_live_" + _pick(ALNUM, 24), "bob.smith@example.com"
    for method in ("GET", "PUT", "DELETE"):
        r = s.request(method, f"{base}/v1/items/42", verify=str(ca), timeout=10)
        assert r.status_code < 500
    for path in (f"/v1/tokens/{jwt}", f"/v1/keys/{key}", f"/v1/users/{email}/profile"):
        assert s.get(base + path, verify=str(ca), timeout=10).status_code < 500
    text = proxy.metrics()
    for method in ("GET", "PUT", "DELETE"):
        assert proxy.metric(
            "proxygate_api_requests_total", host="localhost", api="/v1/items/:id", method=method
        ), (method, text)
    assert proxy.metric("proxygate_api_requests_total", api="/v1/tokens/:token", method="GET")
    assert proxy.metric("proxygate_api_requests_total", api="/v1/keys/:token", method="GET")
    assert proxy.metric(
        "proxygate_api_requests_total", api="/v1/users/:email/profile", method="GET"
    )
    for secret in (jwt, key, email, "eyJ", "sk_live", "@example.com", "bob.smith"):
        assert secret not in text
