"""
proxygate-doctor's pure parts, in process: which proxy each tool family would use (curl's
and Python's rules), no_proxy matching, credential checks, pip's and conda's settings,
certificate names, and the wording of every finding (never a password in it).
The live cases against a real proxygate are in test_doctor_live.py.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime

import pytest
from cryptography.hazmat.primitives import serialization

from gateway.doctor import cli
from gateway.doctor.diagnose import CAOffer, Facts, diagnose, encodeCommand
from gateway.doctor.probe import Answer, Fetch, Step, Target, TLSInfo
from gateway.doctor.probe import fetch as probeFetch
from gateway.doctor.settings import (
    PipSettings,
    Trust,
    caseProblems,
    condaSettings,
    curlBypass,
    curlRoute,
    parseProxyURL,
    pipConfigFiles,
    pipSettings,
    primaryTrust,
    pythonBypass,
    pythonProxies,
    pythonRoute,
    toolTrusts,
)
from gateway.doctor.x509 import certificateNames, fingerprint, pemCertificates
from gateway.tls.ca import createCA
from gateway.tls.mint import mintLeaf, newLeafKey
from tests.support import REPO

PASSWORD = "s3cr@t:p/w"

# -- proxy URLs -------------------------------------------------------------------------------


def test_proxyURLEncodedCredentials():
    url = parseProxyURL("http://alice:s3cr%40t%3Ap%2Fw@proxy.example:3128/", "https_proxy")
    assert (url.scheme, url.host, url.port) == ("http", "proxy.example", 3128)
    assert (url.user, url.password) == ("alice", PASSWORD)
    assert url.unencoded == () and url.problem is None and not url.portMissing
    assert url.display() == "http://alice:****@proxy.example:3128"
    assert PASSWORD not in repr(url.display())


def test_proxyURLUnencodedCharactersListedNotShown():
    """The host is still found (the last @), and what must be encoded is named, by part."""
    url = parseProxyURL(f"http://alice:{PASSWORD}@10.0.0.1:3128", "https_proxy")
    assert (url.host, url.port, url.password) == ("10.0.0.1", 3128, PASSWORD)
    assert ("@", "%40", "password") in url.unencoded
    assert ("/", "%2F", "password") in url.unencoded
    # A colon inside the password is read right by every parser: not flagged.
    assert all(ch != ":" for ch, _, _ in url.unencoded)
    email = parseProxyURL("http://alice@corp.example:pw@proxy:8080", "http_proxy")
    assert email.user == "alice@corp.example" and email.host == "proxy"
    assert email.unencoded == (("@", "%40", "user name"),)
    assert email.display() == "http://alice%40corp.example:****@proxy:8080"


def test_proxyURLStrayPercent():
    url = parseProxyURL("http://bob:100%sure@proxy:3128", "http_proxy")
    assert url.unencoded == (("%", "%25", "password"),)
    assert parseProxyURL("http://bob:a%41b@proxy:3128", "x").unencoded == ()


@pytest.mark.parametrize(
    ("text", "host", "port", "missing", "problem"),
    [
        ("proxy.example:3128", "proxy.example", 3128, False, None),  # no scheme: http
        ("http://proxy.example", "proxy.example", 80, True, None),
        ("https://proxy.example", "proxy.example", 443, True, None),
        ("http://[::1]:3128", "::1", 3128, False, None),
        ("http://proxy:99999", "proxy", 80, True, "is not a number"),
        ("http://:3128", "", 80, True, "no host"),
        ("socks5://proxy:1080", "proxy", 1080, False, "not socks5://"),
    ],
)
def test_proxyURLShapes(text, host, port, missing, problem):
    url = parseProxyURL(text, "v")
    assert (url.host, url.port, url.portMissing) == (host, port, missing)
    if problem is None:
        assert url.problem is None
    else:
        assert problem in url.problem


def test_secretsCoverEverySpelling():
    url = parseProxyURL("http://alice:s3cr%40t@proxy:3128", "x")
    assert "s3cr@t" in url.secrets() and "s3cr%40t" in url.secrets()
    assert parseProxyURL("http://proxy:3128", "x").secrets() == []


# -- whose rules ----------------------------------------------------------------------------


def test_pythonProxiesLowerCaseWins():
    env = {"HTTPS_PROXY": "http://upper:1", "https_proxy": "http://lower:2", "ALL_PROXY": "x:3"}
    assert pythonProxies(env)["https"] == ("https_proxy", "http://lower:2")
    assert pythonProxies(env)["all"] == ("ALL_PROXY", "x:3")
    # An empty lower-case variable removes the upper-case one (urllib's second pass).
    assert "https" not in pythonProxies({"HTTPS_PROXY": "http://u:1", "https_proxy": ""})


def test_upperCaseHTTPProxyOnlyPythonReadsIt():
    env = {"HTTP_PROXY": "http://proxy:3128"}
    assert pythonRoute(env, "http", "example.org", None).proxy.host == "proxy"
    assert curlRoute(env, "http", "example.org").proxy is None
    # For https, curl reads the upper case; an empty lower case is as good as unset for curl.
    env = {"HTTPS_PROXY": "http://proxy:3128", "https_proxy": ""}
    assert curlRoute(env, "https", "example.org").proxy.host == "proxy"
    assert pythonRoute(env, "https", "example.org", None).proxy is None


def test_allProxyFallbackAndCurlDefaultPort():
    env = {"all_proxy": "http://proxy"}
    assert pythonRoute(env, "https", "example.org", None).proxy.port == 80
    route = curlRoute(env, "https", "example.org")
    assert (route.variable, route.proxy.port) == ("all_proxy", 1080)


@pytest.mark.parametrize(
    ("host", "noProxy", "python", "curl"),
    [
        ("pypi.org", "pypi.org", "pypi.org", "pypi.org"),
        ("files.pypi.org", ".pypi.org", ".pypi.org", ".pypi.org"),
        ("files.pypi.org", "pypi.org", "pypi.org", "pypi.org"),
        # requests matches any ending of the name; curl whole labels only.
        ("example.com", "ample.com", "ample.com", None),
        ("example.com", "*", "*", "*"),
        ("10.1.2.3", "10.0.0.0/8", "10.0.0.0/8", "10.0.0.0/8"),
        ("10.1.2.3", "10.1.2.3", "10.1.2.3", "10.1.2.3"),
        ("192.168.1.1", "10.0.0.0/8", None, None),
        ("::1", "::1", "::1", "::1"),
        ("pypi.org", "localhost, 127.0.0.1", None, None),
        ("pypi.org", "", None, None),
    ],
)
def test_noProxyMatching(host, noProxy, python, curl):
    assert pythonBypass(host, None, noProxy, noProxy) == python
    assert curlBypass(host, noProxy) == curl


def test_noProxyPortEntryPythonOnly():
    assert (
        pythonBypass("registry.local", 5000, "registry.local:5000", None) == "registry.local:5000"
    )
    assert pythonBypass("registry.local", None, "registry.local:5000", None) is None


def test_routeBypassNamesEntryAndVariable():
    env = {"https_proxy": "http://proxy:3128", "NO_PROXY": "localhost,.corp.example"}
    route = pythonRoute(env, "https", "git.corp.example", None)
    assert route.proxy is None and route.bypass == ".corp.example"
    assert route.noProxyVariable == "NO_PROXY" and route.variable == "https_proxy"
    assert curlRoute(env, "https", "git.corp.example").bypass == ".corp.example"


def test_caseProblems():
    env = {
        "https_proxy": "http://p:1",
        "HTTP_PROXY": "http://p:1",
        "no_proxy": "a",
        "NO_PROXY": "b",
    }
    kinds = {(c.lower, c.kind) for c in caseProblems(env)}
    assert kinds == {
        ("https_proxy", "lower-only"),
        ("http_proxy", "upper-only"),
        ("no_proxy", "differ"),
    }
    assert caseProblems({"https_proxy": "x", "HTTPS_PROXY": "x"}) == []


# -- pip, conda, CA bundles -------------------------------------------------------------------


def test_pipConfigFilesOrder():
    env = {"XDG_CONFIG_HOME": "/h/.cfg", "VIRTUAL_ENV": "/venv", "PIP_CONFIG_FILE": "/x.conf"}
    assert pipConfigFiles(env, "/h") == [
        "/etc/xdg/pip/pip.conf",
        "/etc/pip.conf",
        "/h/.pip/pip.conf",
        "/h/.cfg/pip/pip.conf",
        "/venv/pip.conf",
        "/x.conf",
    ]
    assert pipConfigFiles({"PIP_CONFIG_FILE": os.devnull}, "/h") == []


def test_pipSettingsLaterFilesAndEnvironmentWin():
    texts = [
        ("/etc/pip.conf", "[global]\ncert = /etc/a.pem\nproxy = http://old:1\n"),
        ("/h/pip.conf", "[global]\nproxy = http://user:1\n[install]\ntrusted-host = pypi.org\n"),
    ]
    pip = pipSettings({}, texts)
    assert pip.cert == ("/etc/a.pem", "/etc/pip.conf [global] cert")
    assert pip.proxy == ("http://user:1", "/h/pip.conf [global] proxy")
    assert pip.trustedHosts == ("pypi.org",)
    pip = pipSettings({"PIP_CERT": "/env.pem", "PIP_PROXY": "http://env:2"}, texts)
    assert pip.cert == ("/env.pem", "PIP_CERT") and pip.proxy == ("http://env:2", "PIP_PROXY")
    assert pipSettings({}, [("/bad", "[global\nnot ini")]).cert is None


def test_condaSettings():
    text = "channels:\n  - defaults\nssl_verify: /etc/corp.pem  # ours\nproxy_servers:\n"
    text += "  http: http://proxy:3128\n  https: 'http://proxy:3128'\n"
    assert condaSettings(text) == {
        "ssl_verify": "/etc/corp.pem",
        "proxy_servers.http": "http://proxy:3128",
        "proxy_servers.https": "http://proxy:3128",
    }


def test_trustOrder():
    system = Trust("the system store", "/etc/ssl/certs/ca-certificates.crt")
    assert primaryTrust({}, system) is system
    assert primaryTrust({"SSL_CERT_FILE": "/s.pem"}, system).cafile == "/s.pem"
    env = {"SSL_CERT_FILE": "/s.pem", "CURL_CA_BUNDLE": "/c.pem"}
    assert primaryTrust(env, system).label == "CURL_CA_BUNDLE"
    env["REQUESTS_CA_BUNDLE"] = "/r.pem"
    assert primaryTrust(env, system).cafile == "/r.pem"
    pip = PipSettings(cert=("/pip.pem", "PIP_CERT"))
    tools = toolTrusts({"SSL_CERT_FILE": "/s.pem"}, pip, system, gitCAInfo="/g.pem")
    assert tools["pip"].cafile == "/pip.pem"
    assert tools["curl"].cafile == "/s.pem" and tools["python"].cafile == "/s.pem"
    assert (
        tools["git"].cafile == "/g.pem"
        and tools["conda"].cafile == "/etc/ssl/certs/ca-certificates.crt"
    )
    # requests' variables override pip's own cert (the trap the doctor warns about).
    tools = toolTrusts({"REQUESTS_CA_BUNDLE": "/r.pem"}, pip, system)
    assert tools["pip"].cafile == "/r.pem" and tools["requests"].cafile == "/r.pem"


# -- certificates ---------------------------------------------------------------------------


def test_certificateNamesFromDER():
    ca = createCA("Zürich proxy CA")
    der = ca.der()
    names = certificateNames(der)
    assert names.subject == names.issuer == "O=proxygate, CN=Zürich proxy CA"
    leaf = mintLeaf(ca, newLeafKey(), "pypi.org", datetime.now(UTC))
    leafDER = leaf.public_bytes(serialization.Encoding.DER)
    assert certificateNames(leafDER) == certificateNames(leafDER).__class__(
        "O=proxygate, CN=Zürich proxy CA", "CN=pypi.org"
    )
    assert pemCertificates(ca.pem().decode() + "junk\n" + ca.pem().decode()) == [der, der]
    assert fingerprint(der).count(":") == 31
    with pytest.raises(ValueError):
        certificateNames(b"\x30\x03\x02\x01")


# -- findings -------------------------------------------------------------------------------

_TLS_TARGET = Target("https", "pypi.org", 443, "/simple/")


def _facts(env: dict[str, str], target: Target = _TLS_TARGET, **kw) -> Facts:
    return Facts(
        target=target,
        python=pythonRoute(env, target.scheme, target.host, None),
        curl=curlRoute(env, target.scheme, target.host),
        cases=caseProblems(env),
        environ=env,
        **kw,
    )


def _fetch(facts: Facts, steps, **kw) -> Facts:
    facts.fetch = Fetch(facts.target, facts.python.proxy, [Step(*s) for s in steps], **kw)
    return facts


def _ids(findings) -> dict[str, object]:
    return {f.id: f for f in findings}


def _text(findings) -> str:
    return json.dumps([f.__dict__ for f in findings])


_PROXY_ENV = {"https_proxy": f"http://alice:{PASSWORD}@proxy:3128", "HTTPS_PROXY": "x"}
_CONNECTED = ("proxy-tcp", True, "connected", 1.0)


def test_findingNoCredentials():
    env = {"https_proxy": "http://proxy:3128", "HTTPS_PROXY": "http://proxy:3128"}
    answer = Answer(
        407, "Proxy Authentication Required", (("Proxy-Authenticate", 'Basic realm="corp"'),)
    )
    facts = _fetch(
        _facts(env), [_CONNECTED, ("connect", False, "407", 1.0, "status")], connectAnswer=answer
    )
    finding = _ids(diagnose(facts))["proxy-auth-missing"]
    assert (
        finding.severity == "error" and "407" in finding.title and 'realm "corp"' in finding.title
    )
    assert "getpass" in finding.fix and "USER" in finding.fix and "proxy:3128" in finding.fix


def test_findingsNeverShowThePassword():
    """Every finding a password-carrying URL can produce: the password in no spelling."""
    answer = Answer(407, "Proxy Authentication Required", ())
    facts = _fetch(
        _facts(_PROXY_ENV), [_CONNECTED, ("connect", False, "407", 1.0, "status")],
        connectAnswer=answer,
    )  # fmt: skip
    findings = _ids(diagnose(facts))
    assert {"credentials-unencoded", "proxy-auth-rejected", "variable-cases-differ"} <= set(
        findings
    )
    unencoded = findings["credentials-unencoded"]
    assert "%40" in unencoded.title and "%2F" in unencoded.title
    assert "percent-encoded" in unencoded.detail
    assert "alice:<your password with @ written %40, / written %2F>@proxy:3128" in unencoded.detail
    text = _text(findings.values())
    for secret in (PASSWORD, "s3cr%40t", "s3cr", "p/w", "p%2Fw"):
        assert secret not in text


def test_findingForbiddenNamesReason():
    env = {"https_proxy": "http://proxy:3128", "HTTPS_PROXY": "http://proxy:3128"}
    answer = Answer(
        403, "Forbidden",
        (("Proxy-Status", "proxygate; error=http_request_denied"),),
        "Destination denied: pypi.org is not in allow_destinations\n",
    )  # fmt: skip
    facts = _fetch(
        _facts(env), [_CONNECTED, ("connect", False, "403", 1.0, "status")], connectAnswer=answer
    )
    finding = _ids(diagnose(facts))["proxy-denied"]
    assert "403 Forbidden" in finding.title
    assert "Destination denied: pypi.org is not in allow_destinations" in finding.title
    assert "http_request_denied" in finding.title
    assert "allow_destinations" in finding.detail and finding.fix is None


def test_findingUnreachable():
    env = {"https_proxy": "http://127.0.0.1:1", "HTTPS_PROXY": "http://127.0.0.1:1"}
    facts = _fetch(_facts(env), [("proxy-tcp", False, "refused", 1.0, "refused")])
    findings = diagnose(facts)
    assert [f.id for f in findings if f.severity == "error"] == ["proxy-unreachable"]
    assert "unreachable" in findings[0].title and "nothing listens" in findings[0].title


def test_findingUntrustedCAOfProxygate():
    env = {"https_proxy": "http://proxy:3128", "HTTPS_PROXY": "http://proxy:3128"}
    facts = _facts(env, installed=("pip", "git", "curl", "system-debian"))
    facts.trust = Trust("the system store", "/etc/ssl/certs/ca-certificates.crt")
    facts = _fetch(
        facts,
        [_CONNECTED, ("connect", True, "200", 1.0), ("tls", False, "verify", 1.0, "verify")],
        tls=TLSInfo(False, 19, "self-signed certificate in certificate chain"),
    )
    facts.leaf = TLSInfo(False, issuer="O=proxygate, CN=proxygate CA", subject="CN=pypi.org")
    facts.ca = CAOffer("http://proxy:9530/ca.pem", error="connection refused")
    finding = _ids(diagnose(facts))["tls-untrusted-ca"]
    assert '"O=proxygate, CN=proxygate CA"' in finding.title
    assert "/ca.pem" in finding.detail and "connection refused" in finding.detail
    assert finding.fix == "curl -fsS http://proxy:9530/ca.pem -o ~/proxygate-ca.pem"
    tools = [t for t, _ in finding.recipes]
    assert tools == ["system-debian", "pip", "curl", "git"]
    # Fetched, and it verifies: the fingerprint is named.
    facts.ca = CAOffer("http://proxy:9530/ca.pem", "O=proxygate, CN=proxygate CA", "AB:CD", True)
    facts.toolChecks = {"git": (False, Trust("x")), "curl": (True, Trust("y"))}
    finding = _ids(diagnose(facts))["tls-untrusted-ca"]
    assert "served at http://proxy:9530/ca.pem (SHA-256 AB:CD)" in finding.detail
    assert "Already trusting it here: curl." in finding.detail
    assert [t for t, _ in finding.recipes] == ["system-debian", "git"]


def test_findingNoProxyBypass():
    env = {"https_proxy": "http://proxy:3128", "no_proxy": "localhost,pypi.org"}
    works = _fetch(_facts(env), [("tcp", True, "ok", 1.0), ("tls", True, "ok", 1.0)])
    works.fetch.answer = Answer(200, "OK", ())
    works.fetch.steps.append(Step("http", True, "200", 1.0))
    finding = _ids(diagnose(works))["no-proxy-bypass"]
    assert finding.severity == "warning" and "'pypi.org' in no_proxy" in finding.title
    fails = _fetch(_facts(env), [("tcp", False, "timeout", 1.0, "timeout")])
    finding = _ids(diagnose(fails))["no-proxy-bypass"]
    assert finding.severity == "error"
    assert finding.fix == "export no_proxy=localhost NO_PROXY=localhost"


def test_findingNoProxySetAndDirectFails():
    facts = _fetch(_facts({}), [("tcp", False, "timeout", 1.0, "timeout")])
    finding = _ids(diagnose(facts))["no-proxy-set"]
    assert finding.severity == "error" and "https_proxy" in finding.fix


def test_findingRouteDiffersForUpperCaseHTTPProxy():
    target = Target("http", "example.org", 80, "/")
    findings = _ids(diagnose(_facts({"HTTP_PROXY": "http://proxy:3128"}, target)))
    assert "curl never reads HTTP_PROXY" in findings["route-differs"].detail
    assert findings["variable-one-case"].fix == 'export http_proxy="$HTTP_PROXY"'


def test_findingPipCertOverridden():
    env = {"REQUESTS_CA_BUNDLE": "/etc/ssl/certs/ca-certificates.crt"}
    facts = _facts(env, pip=PipSettings(cert=("/corp.pem", "PIP_CERT")))
    finding = _ids(diagnose(facts))["pip-cert-overridden"]
    assert "REQUESTS_CA_BUNDLE wins" in finding.title and finding.fix == "unset REQUESTS_CA_BUNDLE"


def test_findingServerAnswerAndSuccess():
    env = {"https_proxy": "http://proxy:3128", "HTTPS_PROXY": "http://proxy:3128"}
    steps = [_CONNECTED, ("connect", True, "200", 1.0), ("tls", True, "ok", 1.0)]
    facts = _fetch(_facts(env), [*steps, ("http", False, "404", 1.0, "status")])
    facts.fetch.answer = Answer(404, "Not Found", ())
    assert _ids(diagnose(facts))["server-error"].severity == "error"
    facts = _fetch(_facts(env), [*steps, ("http", True, "200", 1.0)])
    facts.fetch.answer = Answer(200, "OK", ())
    facts.fetch.tls = TLSInfo(True, issuer="O=proxygate, CN=proxygate CA")
    findings = diagnose(facts)
    assert {f.severity for f in findings} == {"info"}
    assert {"fetch-ok", "intercepted-trusted"} == {f.id for f in findings}


def test_encodeCommandEncodesWhateverThePassword(tmp_path):
    """The fix command, run by bash: the password typed (no tty: stdin) ends up encoded."""
    proxy = parseProxyURL("http://proxy.example:3128", "https_proxy")
    command = encodeCommand("https_proxy", proxy, "alice")
    done = subprocess.run(
        ["bash", "-c", f'{command} && printf "%s|%s" "$https_proxy" "$HTTPS_PROXY"'],
        input=PASSWORD + "\n",
        capture_output=True,
        text=True,
        timeout=20,
        start_new_session=True,  # no controlling tty: getpass reads stdin
    )
    assert done.returncode == 0, done.stderr
    expected = "http://alice:s3cr%40t%3Ap%2Fw@proxy.example:3128"
    assert done.stdout == f"{expected}|{expected}"


# -- the command line -----------------------------------------------------------------------


def test_redactionIsTheLastGuard():
    env = {"https_proxy": f"http://alice:{PASSWORD}@proxy:3128", "X": "y"}
    secrets = cli._secrets(env, None)
    text = cli._redact(f"a {PASSWORD} b s3cr%40t%3Ap%2Fw c", secrets)
    assert PASSWORD not in text and "s3cr%40t" not in text and text.count("****") == 2


def test_internalErrorsAreRedacted(monkeypatch, capsys):
    """The last guard: an unforeseen exception whose message holds a password."""
    monkeypatch.setenv("https_proxy", f"http://alice:{PASSWORD}@proxy:3128")

    def broken(args, environ):
        raise RuntimeError(f"boom near {PASSWORD} and s3cr%40t%3Ap%2Fw")

    monkeypatch.setattr(cli, "gather", broken)
    assert cli.main(["https://pypi.org/"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and "internal error: RuntimeError: boom near ****" in err
    assert PASSWORD not in err and "s3cr%40t" not in err


def _doctor(*args: str, env: dict[str, str] | None = None, timeout: float = 30):
    base = {"PATH": os.environ["PATH"], "HOME": "/nonexistent", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "gateway.doctor", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**base, **(env or {})},
        cwd=REPO,
    )


def test_proxyOptionStandsForTheVariables(closedPort):
    """--proxy URL: as if all four variables were set to it (here a port nothing listens on)."""
    port = closedPort
    done = _doctor(
        "--json", "--proxy", f"http://alice:{PASSWORD.replace('@', '%40')}@127.0.0.1:{port}"
    )
    report = json.loads(done.stdout)
    assert done.returncode == 1 and report["route"]["python"]["variable"] == "https_proxy"
    ids = [f["id"] for f in report["findings"]]
    assert ids == ["credentials-unencoded", "proxy-unreachable"]  # the raw "/" in it
    assert PASSWORD.replace("@", "%40") not in done.stdout and "s3cr" not in done.stdout


def test_badURLIsAUsageError():
    done = _doctor("ftp://example.org/")
    assert done.returncode == 2 and "only http:// and https://" in done.stderr


def test_startsFastWithoutTwisted():
    """The console script must not load Twisted (gateway's package import is lazy)."""
    code = (
        "import sys, time; t = time.perf_counter(); import gateway.doctor.cli; "
        "print(round(time.perf_counter() - t, 3), "
        "sorted(m for m in sys.modules if m.split('.')[0] in ('twisted', 'attr', 'cryptography')))"
    )
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    seconds, modules = done.stdout.split(" ", 1)
    assert modules.strip() == "[]"
    assert float(seconds) < 0.5 and time.monotonic() - start < 5


def test_everyProxySettingIsCheckedForEncoding():
    """A raw @ in any proxy setting is found, also one this URL does not use; each value once."""
    raw = f"http://alice:{PASSWORD}@proxy:3128"
    env = {"http_proxy": raw, "HTTP_PROXY": raw, "https_proxy": "http://proxy:3128"}
    texts = [("/etc/pip.conf", f"[install]\nproxy = {raw}x\n")]
    facts = _facts(env, pip=pipSettings({}, texts))
    found = [f for f in diagnose(facts) if f.id == "credentials-unencoded"]
    assert [f.title.split(" are ")[0] for f in found] == [
        "The credentials in http_proxy",
        "The credentials in /etc/pip.conf [install] proxy",
    ]
    assert found[0].fix.startswith('export http_proxy="http://alice:$(python3')
    assert found[0].fix.endswith('&& export HTTP_PROXY="$http_proxy"')
    differs = _ids(diagnose(facts))["pip-proxy-differs"]
    assert differs.fix == "pip config --global unset install.proxy"
    assert PASSWORD not in _text(diagnose(facts))


# -- the probe over real loopback sockets (scripted proxies, no proxygate) ----------------------

_ANY = Trust("test")


def _scripted(reply: bytes):
    """A fake proxy's handler: reads a request head (recorded), then answers C{reply}."""

    def handle(server, conn):
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(4096)
            if not chunk:
                return
            data += chunk
        server.seen.append(data)
        conn.sendall(reply)

    return handle


def _proxyAt(port: int, user: str | None = None) -> object:
    auth = f"{user}:{PASSWORD.replace('@', '%40').replace('/', '%2F')}@" if user else ""
    return parseProxyURL(f"http://{auth}127.0.0.1:{port}", "https_proxy")


def test_probeTimesOutOnASilentProxy(server):
    proxy = server(None)  # accepts, never reads nor answers
    start = time.monotonic()
    result = probeFetch(_TLS_TARGET, _proxyAt(proxy.port), _ANY, timeout=0.3)
    assert time.monotonic() - start < 2
    assert [(s.name, s.ok, s.error) for s in result.steps] == [
        ("proxy-tcp", True, None),
        ("connect", False, "timeout"),
    ]
    assert "no answer within 0.3 s" in result.steps[-1].detail


def test_probeReadsTheProxysRefusal(server):
    body = b"Proxy authentication required: send valid credentials.\n"
    reply = (
        b'HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm="x"\r\n'
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    proxy = server(_scripted(reply))
    result = probeFetch(_TLS_TARGET, _proxyAt(proxy.port, "alice"), _ANY, timeout=5)
    assert result.failed.name == "connect" and result.failed.error == "status"
    assert result.connectAnswer.status == 407 and result.connectAnswer.body == body.decode()
    sent = proxy.seen[0].decode()
    assert sent.startswith("CONNECT pypi.org:443 HTTP/1.1\r\nHost: pypi.org:443\r\n")
    token = base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
    assert f"Proxy-Authorization: Basic {token}\r\n" in sent  # the decoded password, sent


def test_probeSaysWhenTheAnswerIsNotHTTP(server):
    proxy = server(_scripted(b"SSH-2.0-OpenSSH_9.2\r\n\r\n"))
    result = probeFetch(_TLS_TARGET, _proxyAt(proxy.port), _ANY, timeout=5)
    assert result.failed.error == "protocol" and "not an HTTP answer" in result.failed.detail
