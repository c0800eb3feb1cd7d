"""
proxygate-doctor end to end: the installed console script, run as a user would, against a
live proxygate (twistd) and loopback origins, in an environment that holds only what each
case sets (no proxy, CA or pip variables of this machine's).

The cases: an intercepting proxy whose CA is not trusted (non-zero, names the CA and how
to trust it; fetches it from /ca.pem when told where), then trusted (exit 0); auth with no
credentials, wrong ones, and a raw "@" in the password; a dead proxy port; no_proxy
covering the host; an allow-list refusing the host (403 with its reason). In every case
with credentials the password appears nowhere in the output, text or --json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import bcrypt
import pytest

from tests.support import LOOPBACK_INI, REPO, ProxyProcess
from tests.support.mitmorigin import HTTPSOrigin, OriginPKI
from tests.support.tlsorigin import makeCA

DOCTOR = Path(sys.executable).parent / "proxygate-doctor"
PASSWORD = "p@ss:w/rd#1"
ENCODED = "p%40ss%3Aw%2Frd%231"


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> OriginPKI:
    return OriginPKI(tmp_path_factory.mktemp("doctor-pki"))


@pytest.fixture(scope="module")
def httpsOrigin(pki):
    o = HTTPSOrigin(pki)
    yield o
    o.close()


def _proxy(folder: Path, extra: str) -> ProxyProcess:
    return ProxyProcess(folder, LOOPBACK_INI + extra).start()


@pytest.fixture(scope="module")
def mitmProxy(tmp_path_factory, pki):
    """An intercepting proxy that creates its CA on first start."""
    p = _proxy(
        tmp_path_factory.mktemp("doctor-mitm"),
        f"[mitm]\nenabled = on\nupstream_ca_bundle = {pki.caCert}\n",
    )
    with urllib.request.urlopen(f"http://127.0.0.1:{p.metricsPort}/ca.pem", timeout=5) as r:
        p.caPEM = r.read()
    p.ca = p.workdir / "served-ca.pem"
    p.ca.write_bytes(p.caPEM)
    yield p
    p.stop()


@pytest.fixture(scope="module")
def authProxy(tmp_path_factory):
    folder = tmp_path_factory.mktemp("doctor-auth")
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
    (folder / "users").write_text(f"alice:{hashed}\n")
    p = _proxy(folder, f"[auth]\nhtpasswd = {folder / 'users'}\nrealm = doctor-test\n")
    yield p
    p.stop()


def doctor(*args: str, env: dict[str, str] | None = None, home: Path | None = None):
    """The console script, in an environment of only PATH, HOME and what the case sets."""
    base = {
        "PATH": os.environ["PATH"],
        "HOME": str(home or REPO / "nonexistent-home"),
        "PYTHONPATH": str(REPO),  # this worktree's code over the installed copy
        "LANG": "C.UTF-8",
    }
    done = subprocess.run(
        [str(DOCTOR), "--timeout", "10", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**base, **(env or {})},
        cwd=home or REPO,
    )
    # Findings are wrapped at 100 columns: the checks read the text with single spaces.
    done.flat = " ".join(done.stdout.split())
    return done


def both(proxyURL: str, **more: str) -> dict[str, str]:
    return {"https_proxy": proxyURL, "HTTPS_PROXY": proxyURL, **more}


def assertNoPassword(*texts: str) -> None:
    for text in texts:
        for secret in (PASSWORD, ENCODED, "p@ss", "w/rd#1", "p%40ss", "w%2Frd"):
            assert secret not in text, f"{secret!r} printed"


# -- TLS interception --------------------------------------------------------------------------


def test_untrustedCANamedWithTheWayToTrustIt(mitmProxy, httpsOrigin):
    url = f"https://localhost:{httpsOrigin.port}/"
    done = doctor(url, env=both(mitmProxy.url))
    assert done.returncode == 1, done.stdout + done.stderr
    out = done.flat
    assert "[FAIL] TLS handshake" in out
    assert 'issued by "O=proxygate, CN=proxygate CA"' in out
    assert "/ca.pem" in out and "proxygate's CA" in out
    assert "update-ca-certificates" in out  # the system store recipe (Debian)
    assert "git config --global http.sslCAInfo" in out

    # Told where the metrics listener is, it fetches the CA, checks that it is the one that
    # signed, names its fingerprint, and saves it when asked.
    saved = mitmProxy.workdir / "doctor-saved.pem"
    metrics = f"http://127.0.0.1:{mitmProxy.metricsPort}"
    done = doctor(url, "--metrics-url", metrics, "--save-ca", str(saved), env=both(mitmProxy.url))
    assert done.returncode == 1
    assert f"served at {metrics}/ca.pem (SHA-256 " in done.flat
    assert saved.read_bytes() == mitmProxy.caPEM


@pytest.mark.parametrize("variable", ["SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"])
def test_trustedCAWorks(mitmProxy, httpsOrigin, variable):
    url = f"https://localhost:{httpsOrigin.port}/echo"
    done = doctor(url, env=both(mitmProxy.url, **{variable: str(mitmProxy.ca)}))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "[ok]   HTTP answer: GET /echo: 200 OK" in done.stdout
    assert "decrypts HTTPS" in done.flat and "Result: the fetch works." in done.stdout


def test_jsonFindings(mitmProxy, httpsOrigin):
    url = f"https://127.0.0.1:{httpsOrigin.port}/"
    done = doctor("--json", url, env=both(mitmProxy.url))
    report = json.loads(done.stdout)
    assert done.returncode == 1 and report["ok"] is False and report["exitStatus"] == 1
    assert [s["step"] for s in report["steps"]] == ["proxy-tcp", "connect", "tls"]
    assert report["steps"][-1]["error"] == "verify"
    finding = next(f for f in report["findings"] if f["id"] == "tls-untrusted-ca")
    assert finding["severity"] == "error" and "proxygate CA" in finding["title"]
    assert finding["recipes"] and all({"tool", "command"} == set(r) for r in finding["recipes"])
    done = doctor("--json", url, env=both(mitmProxy.url, SSL_CERT_FILE=str(mitmProxy.ca)))
    assert done.returncode == 0 and json.loads(done.stdout)["ok"] is True


# -- authentication ------------------------------------------------------------------------------


def test_noCredentialsExplains407(authProxy, httpsOrigin, pki):
    done = doctor(
        f"https://localhost:{httpsOrigin.port}/",
        env=both(authProxy.url, SSL_CERT_FILE=str(pki.caCert)),
    )
    assert done.returncode == 1
    assert "needs a user name and password (407 Proxy Authentication Required" in done.flat
    assert 'realm "doctor-test"' in done.flat and "getpass" in done.stdout


def test_wrongCredentials(authProxy, httpsOrigin, pki):
    url = authProxy.url.replace("http://", "http://alice:wrong-one@")
    done = doctor(
        "--json",
        f"https://localhost:{httpsOrigin.port}/",
        env=both(url, SSL_CERT_FILE=str(pki.caCert)),
    )
    report = json.loads(done.stdout)
    finding = next(f for f in report["findings"] if f["id"] == "proxy-auth-rejected")
    assert "'alice'" in finding["title"] and "407" in finding["title"]
    assert "wrong-one" not in done.stdout + done.stderr


def test_rawAtSignExplainsPercentEncoding(authProxy, httpsOrigin, pki):
    """The right password with its special characters as they are: said, and never shown."""
    raw = authProxy.url.replace("http://", f"http://alice:{PASSWORD}@")
    env = both(raw, SSL_CERT_FILE=str(pki.caCert))
    url = f"https://localhost:{httpsOrigin.port}/"
    done = doctor(url, env=env)
    assert done.returncode == 1
    assert "not percent-encoded" in done.flat and "'@' must be written %40" in done.stdout
    assert "'#' must be written %23" in done.flat
    assert "<your password with" in done.flat
    jsonDone = doctor("--json", url, env=env)
    assertNoPassword(done.stdout, done.stderr, jsonDone.stdout, jsonDone.stderr)
    # Encoded, the same password works.
    good = authProxy.url.replace("http://", f"http://alice:{ENCODED}@")
    done = doctor(url, env=both(good, SSL_CERT_FILE=str(pki.caCert)))
    assert done.returncode == 0, done.stdout
    assertNoPassword(done.stdout, done.stderr)


def test_plainHTTPThroughAuthProxy(authProxy, origin):
    """http:// URLs go as absolute-form GETs: the 407 is the proxy's answer to the GET."""
    done = doctor(
        origin.url("/echo"), env={"http_proxy": authProxy.url, "HTTP_PROXY": authProxy.url}
    )
    assert done.returncode == 1 and "needs a user name and password" in done.flat
    good = authProxy.url.replace("http://", f"http://alice:{ENCODED}@")
    done = doctor(origin.url("/echo"), env={"http_proxy": good, "HTTP_PROXY": good})
    assert done.returncode == 0, done.stdout
    assertNoPassword(done.stdout)


def test_passwordNeverInErrorPaths(mitmProxy, httpsOrigin, closedPort):
    """A dead proxy, an unwritable --save-ca: the credentials stay out of what is said."""
    raw = f"http://alice:{ENCODED}@127.0.0.1:{closedPort}"
    done = doctor("--json", "https://localhost:1/", env=both(raw))
    assert done.returncode == 1 and json.loads(done.stdout)["ok"] is False
    assertNoPassword(done.stdout, done.stderr)
    done = doctor(
        "--metrics-url", f"http://127.0.0.1:{mitmProxy.metricsPort}",
        "--save-ca", "/nonexistent/dir/ca.pem",
        f"https://localhost:{httpsOrigin.port}/",
        env=both(mitmProxy.url, ALL_PROXY=raw),
    )  # fmt: skip
    assert done.returncode == 1 and "could not be saved (/nonexistent/dir/ca.pem" in done.flat
    assertNoPassword(done.stdout, done.stderr)


# -- reachability and policy ---------------------------------------------------------------------


def test_deadProxyPortIsUnreachable(closedPort):
    port = closedPort
    done = doctor("https://localhost:1/", env=both(f"http://127.0.0.1:{port}"))
    assert done.returncode == 1
    assert f"The proxy http://127.0.0.1:{port} (from https_proxy) is unreachable" in done.flat
    assert "[FAIL] TCP to the proxy" in done.flat


def test_noProxySendsTheHostDirect(mitmProxy, httpsOrigin, pki):
    env = both(mitmProxy.url, no_proxy="localhost,.internal.example", NO_PROXY="localhost")
    done = doctor(
        f"https://localhost:{httpsOrigin.port}/", env={**env, "SSL_CERT_FILE": str(pki.caCert)}
    )
    assert "no_proxy sends localhost direct" in done.flat
    assert "'localhost' in no_proxy" in done.flat
    assert "[ok]   TCP to the server" in done.stdout  # it really went direct
    assert done.returncode == 0, done.stdout


def test_allowListRefusalNamesThe403(tmp_path, httpsOrigin, origin):
    proxy = _proxy(tmp_path, "allow_destinations = pypi.org .pythonhosted.org\n")
    try:
        done = doctor(f"https://127.0.0.1:{httpsOrigin.port}/", env=both(proxy.url))
        assert done.returncode == 1
        assert f"The proxy refused 127.0.0.1:{httpsOrigin.port} with 403 Forbidden" in done.flat
        assert "Destination denied" in done.flat
        assert "Proxy-Status: proxygate; error=http_request_denied" in done.flat
        assert "allow_destinations" in done.flat
        env = {"http_proxy": proxy.url, "HTTP_PROXY": proxy.url}
        done = doctor(origin.url("/echo"), env=env)
        assert done.returncode == 1 and "403 Forbidden" in done.flat
        assert "Destination denied" in done.flat
    finally:
        proxy.stop()


def test_httpsProxyTLSInsideTLS(tmp_path, httpsOrigin, pki):
    """An https:// proxy (an ssl: listener): TLS to the proxy, CONNECT, TLS inside it."""
    files = makeCA(tmp_path / "listener")
    proxy = ProxyProcess(tmp_path, LOOPBACK_INI, sslFiles=files).start()
    try:
        url = f"https://localhost:{proxy.port}"
        bundle = tmp_path / "both.pem"
        bundle.write_bytes(files.caCert.read_bytes() + pki.caCert.read_bytes())
        target = f"https://localhost:{httpsOrigin.port}/echo"
        done = doctor(target, env=both(url, SSL_CERT_FILE=str(bundle)))
        assert done.returncode == 0, done.stdout
        assert "[ok]   TLS with the proxy: TLS with the proxy localhost" in done.stdout
        assert "[ok]   HTTP answer: GET /echo: 200 OK" in done.stdout
        # The proxy's own certificate from a CA nobody here trusts.
        done = doctor(target, env=both(url, SSL_CERT_FILE=str(pki.caCert)))
        assert done.returncode == 1
        assert f"TLS with the https:// proxy localhost:{proxy.port} failed" in done.flat
    finally:
        proxy.stop()
