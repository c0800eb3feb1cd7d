"""
From what was read and what the fetch saw to findings in plain words, each with the one
command that fixes it. Pure: L{Facts} holds everything gathered, L{diagnose} only reads it,
so every wording is tested in process.

Nothing here ever formats a password: proxy URLs are shown through L{ProxyURL.display},
and fix commands that need the password ask for it (getpass) and percent-encode it
themselves, so it never reaches the screen or the shell history.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from urllib.parse import quote

from .probe import Answer, Fetch, Target, TLSInfo
from .settings import CaseProblem, PipSettings, ProxyURL, Route, Trust, parseProxyURL

__all__ = ["Facts", "Finding", "diagnose", "encodeCommand"]

#: OpenSSL verify codes that mean "signed by a CA I do not have": what interception looks like.
_UNKNOWN_ISSUER = {
    2,  # unable to get issuer certificate
    19,  # self-signed certificate in certificate chain
    20,  # unable to get local issuer certificate
    21,  # unable to verify the first certificate
}
_SYSTEM_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


@dataclass(frozen=True)
class Finding:
    id: str
    #: error (the exit status is 1) | warning | info
    severity: str
    title: str
    detail: str = ""
    #: The one command that fixes it (None when only someone else can: the proxy's admin).
    fix: str | None = None
    #: (tool, command): how each tool found here would trust a CA.
    recipes: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class CAOffer:
    """proxygate's CA, as fetched from its metrics listener (or why it could not be)."""

    url: str
    subject: str | None = None
    fingerprint: str | None = None
    #: The fetched CA verifies the server certificate (so it is the one to trust).
    verifies: bool = False
    error: str | None = None
    savedTo: str | None = None
    #: --save-ca could not write the file.
    saveError: str | None = None


@dataclass
class Facts:
    target: Target
    python: Route
    curl: Route
    cases: list[CaseProblem] = field(default_factory=list)
    pip: PipSettings = field(default_factory=PipSettings)
    gitProxy: ProxyURL | None = None
    condaProxy: ProxyURL | None = None
    trust: Trust = field(default_factory=lambda: Trust("the system store"))
    systemBundle: str = _SYSTEM_BUNDLE
    environ: dict[str, str] = field(default_factory=dict)
    #: Tools found on this machine: pip requests curl git conda node python system-debian
    #: system-rhel.
    installed: tuple[str, ...] = ()
    fetch: Fetch | None = None
    #: The server certificate read without verification, after a failed check.
    leaf: TLSInfo | None = None
    ca: CAOffer | None = None
    #: tool -> (trusts it?, the trust it uses): the per-tool TLS check.
    toolChecks: dict[str, tuple[bool | None, Trust]] = field(default_factory=dict)


def _variable(target: Target) -> str:
    return "https_proxy" if target.scheme == "https" else "http_proxy"


def encodeCommand(variable: str, proxy: ProxyURL | None, user: str | None) -> str:
    """
    One command that sets C{variable} (and its upper-case twin) with the password asked
    for without echo and percent-encoded, so it is right whatever characters it has.
    """
    host = proxy.hostPort if proxy is not None else "PROXY-HOST:PORT"
    scheme = proxy.scheme if proxy is not None else "http"
    name = user if user else "USER"
    ask = (
        "$(python3 -c 'import getpass,urllib.parse as u;"
        'print(u.quote(getpass.getpass("Proxy password: "),safe=""))'
        "')"
    )
    url = f"{scheme}://{quote(name, safe='')}:{ask}@{host}"
    lower, upper = variable.lower(), variable.upper()
    return f'export {lower}="{url}" && export {upper}="${lower}"'


def _exportCommand(variable: str, value: str) -> str:
    return f"export {variable}={shlex.quote(value)} {variable.upper()}={shlex.quote(value)}"


def diagnose(facts: Facts) -> list[Finding]:
    out: list[Finding] = []
    out += _settingFindings(facts)
    fetch = facts.fetch
    if fetch is not None:
        out += _fetchFindings(facts, fetch)
    return out


# -- settings, before any packet --------------------------------------------------------------


_PROXY_VARIABLES = ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY")
_PROXY_VARIABLES += ("all_proxy", "ALL_PROXY")


def _proxyURLs(facts: Facts) -> list[ProxyURL]:
    """Every proxy URL in the settings, each value once (the first place it was found)."""
    found = [(facts.environ[n], n) for n in _PROXY_VARIABLES if facts.environ.get(n)]
    if facts.pip.proxy is not None:
        found.append(facts.pip.proxy)
    urls, seen = [], set()
    for value, source in found:
        if value.strip() not in seen:
            seen.add(value.strip())
            urls.append(parseProxyURL(value, source))
    return urls + [p for p in (facts.gitProxy, facts.condaProxy) if p is not None]


def _settingFindings(facts: Facts) -> list[Finding]:
    out = []
    for proxy in _proxyURLs(facts):
        out += _urlFindings(facts, proxy)
    out += [_caseFinding(case) for case in facts.cases]
    out += _routeDifference(facts)
    out += _pipFindings(facts)
    git, mine = facts.gitProxy, facts.python.proxy
    if git is not None and (mine is None or git.hostPort != mine.hostPort):
        others = f"not {mine.display()} ({facts.python.variable})" if mine else "not direct"
        out.append(
            Finding(
                "git-proxy-differs",
                "warning",
                f"git uses its own http.proxy setting, {git.display()}, {others} as your "
                "other tools do for this URL.",
                "git's http.proxy wins over the environment for git commands.",
                "git config --global --unset http.proxy",
            )
        )
    return out


def _urlFindings(facts: Facts, proxy: ProxyURL) -> list[Finding]:
    out = []
    if proxy.problem:
        out.append(
            Finding(
                "proxy-url-invalid",
                "error",
                f"{proxy.source} is not a usable proxy URL: {proxy.problem}.",
                "Write it as http://[user:password@]host:port.",
                f"export {_variable(facts.target)}=http://PROXY-HOST:PORT",
            )
        )
    if proxy.unencoded:
        parts = []
        for what in ("user name", "password"):
            chars = [(c, enc) for c, enc, w in proxy.unencoded if w == what]
            if chars:
                listed = ", ".join(f"'{c}' must be written {enc}" for c, enc in chars)
                parts.append(f"the {what} has characters that end or split a URL ({listed})")
        shown = proxy.display("<password>")
        passwordChars = [(c, enc) for c, enc, w in proxy.unencoded if w == "password"]
        if passwordChars:
            shown = proxy.display(
                "<your password with "
                + ", ".join(f"{c} written {enc}" for c, enc in passwordChars)
                + ">"
            )
        variable = proxy.source if proxy.source.lower().endswith("_proxy") else None
        out.append(
            Finding(
                "credentials-unencoded",
                "error",
                f"The credentials in {proxy.source} are not percent-encoded: "
                + "; ".join(parts)
                + ".",
                "In a proxy URL the user name and password must be percent-encoded "
                "(@ %40, : %3A, % %25, / %2F, # %23, ? %3F, space %20). curl refuses this URL "
                "('Unsupported proxy syntax'), and other tools send a wrong password or go "
                f"to a wrong host. Write it as {shown}; the command below asks for the "
                "password and encodes it for you.",
                encodeCommand(variable or _variable(facts.target), proxy, proxy.user),
            )
        )
    if proxy.portMissing and not proxy.problem:
        out.append(
            Finding(
                "proxy-port-missing",
                "warning",
                f"{proxy.source} has no port: curl then uses 1080, Python tools "
                f"{proxy.port}, so they may reach different places.",
                "Write the port explicitly.",
                f"export {_variable(facts.target)}={proxy.scheme}://{proxy.host}:PORT",
            )
        )
    return out


def _caseFinding(case: CaseProblem) -> Finding:
    if case.kind == "lower-only":
        who = {
            "http_proxy": "Docker, many Go and Java programs",
            "no_proxy": "Docker and many Go programs",
        }.get(case.lower, "programs that read only upper-case variables (Docker, many Go programs)")
        return Finding(
            "variable-one-case",
            "warning",
            f"{case.lower} is set but {case.upper} is not: {who} will not see it.",
            "Set both cases to the same value.",
            f'export {case.upper}="${case.lower}"',
        )
    if case.kind == "upper-only":
        who = (
            "curl never reads HTTP_PROXY (only http_proxy), nor do wget and others"
            if case.upper == "HTTP_PROXY"
            else "wget and other programs that read only lower-case variables will not see it"
        )
        return Finding(
            "variable-one-case",
            "warning",
            f"{case.upper} is set but {case.lower} is not: {who}.",
            "Set both cases to the same value.",
            f'export {case.lower}="${case.upper}"',
        )
    return Finding(
        "variable-cases-differ",
        "warning",
        f"{case.lower} and {case.upper} have different values: curl and Python use "
        f"{case.lower}, programs that read only {case.upper} use the other one.",
        "Give both the same value.",
        f'export {case.upper}="${case.lower}"',
    )


def _routeDifference(facts: Facts) -> list[Finding]:
    python, curl = facts.python, facts.curl
    p = python.proxy.hostPort if python.proxy else None
    c = curl.proxy.hostPort if curl.proxy else None
    if p == c:
        return []

    def where(route: Route) -> str:
        return f"through {route.proxy.display()} ({route.variable})" if route.proxy else "direct"

    why, fix = "", None
    if curl.proxy is None and curl.bypass is None and python.variable == "HTTP_PROXY":
        why, fix = (
            "curl never reads HTTP_PROXY: set http_proxy too.",
            'export http_proxy="$HTTP_PROXY"',
        )
    elif (python.bypass is None) != (curl.bypass is None):
        entry = python.bypass or curl.bypass
        why = (
            f"The no_proxy entry {entry!r} matches for one and not the other: requests "
            "matches any ending of the name (and IPv4 CIDRs), curl whole labels only."
        )
    return [
        Finding(
            "route-differs",
            "warning",
            f"curl and git would go {where(curl)}, while pip and requests go {where(python)}.",
            why,
            fix,
        )
    ]


def _pipFindings(facts: Facts) -> list[Finding]:
    out = []
    pip, env = facts.pip, facts.environ
    override = next((n for n in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE") if env.get(n)), None)
    if pip.cert is not None and override and env[override] != pip.cert[0]:
        out.append(
            Finding(
                "pip-cert-overridden",
                "warning",
                f"pip's cert setting ({pip.cert[1]}) is ignored: {override} wins over it.",
                f"requests (inside pip) reads {override} for every request, which overrides "
                "the bundle pip sets with --cert, PIP_CERT or pip.conf.",
                f"unset {override}",
            )
        )
    mine = facts.python.proxy
    if pip.proxy is not None:
        theirs = parseProxyURL(*pip.proxy)
        if mine is None or theirs.hostPort != mine.hostPort:
            out.append(
                Finding(
                    "pip-proxy-differs",
                    "warning",
                    f"pip uses its own proxy setting ({pip.proxy[1]}: {theirs.display()}), "
                    "not the one from the environment.",
                    "pip's --proxy, PIP_PROXY and pip.conf's proxy win over https_proxy.",
                    _pipUnset(pip.proxy[1], "proxy"),
                )
            )
    host = facts.target.host
    if host in pip.trustedHosts:
        out.append(
            Finding(
                "pip-trusted-host",
                "warning",
                f"pip is told not to check certificates for {host} (trusted-host).",
                "That hides an untrusted intercepting CA instead of trusting it; trust the "
                "proxy's CA and remove the trusted-host entry.",
            )
        )
    return out


def _pipUnset(source: str, key: str) -> str | None:
    """The pip config command that removes a setting found in a config file."""
    if source.startswith("PIP_"):
        return f"unset {source}"
    section = "install" if "[install]" in source else "global"
    where = "--global " if source.startswith("/etc/") else ""
    return f"pip config {where}unset {section}.{key}"


# -- what the fetch saw -----------------------------------------------------------------------


def _fetchFindings(facts: Facts, fetch: Fetch) -> list[Finding]:
    target, route = facts.target, facts.python
    failed = fetch.failed
    out = []
    if route.proxy is None:
        out += _directFindings(facts, fetch)
        if failed is not None:
            return out + _tlsOrHTTPFailure(facts, fetch)
    elif failed is not None and failed.name == "proxy-tcp":
        proxy = route.proxy
        why = {
            "refused": "nothing listens there: is the proxy running, and is the port right?",
            "dns": f"the proxy's name {proxy.host} does not resolve.",
            "timeout": "it does not answer: a firewall, or the wrong address.",
        }.get(failed.error or "", failed.detail)
        return [
            *out,
            Finding(
                "proxy-unreachable",
                "error",
                f"The proxy {proxy.display()} (from {route.variable}) is unreachable: {why}",
                failed.detail,
                _exportCommand(_variable(target), "http://PROXY-HOST:PORT"),
            ),
        ]
    elif failed is not None and failed.name == "proxy-tls":
        return [
            *out,
            Finding(
                "proxy-tls-failed",
                "error",
                f"TLS with the https:// proxy {route.proxy.hostPort} failed: {failed.detail}.",
                "The proxy's own certificate is checked with the same CA bundle as servers.",
            ),
        ]
    answer = fetch.connectAnswer if target.scheme == "https" else fetch.answer
    if route.proxy is not None and answer is not None and _proxyMade(answer, target):
        refusal = _proxyRefusal(facts, answer)
        if refusal is not None:
            return [*out, refusal]
    if failed is not None:
        return out + _tlsOrHTTPFailure(facts, fetch)
    return out + _success(facts, fetch)


def _directFindings(facts: Facts, fetch: Fetch) -> list[Finding]:
    target, route = facts.target, facts.python
    works = fetch.failed is None
    why = "" if works else f" ({fetch.failed.detail})"
    if route.bypass is not None:
        return [
            Finding(
                "no-proxy-bypass",
                "warning" if works else "error",
                f"no_proxy sends {target.host} direct: the entry {route.bypass!r} in "
                f"{route.noProxyVariable} matches it, so {route.variable} is not used for "
                "this URL.",
                "Going direct works from here."
                if works
                else f"Going direct fails from here{why}: take the entry out of no_proxy.",
                None if works else _noProxyFix(facts, route),
            )
        ]
    if works:
        return [
            Finding(
                "no-proxy-set",
                "info",
                f"No proxy is set for {target.scheme}:// URLs: your tools go direct, and that "
                "works from here.",
            )
        ]
    return [
        Finding(
            "no-proxy-set",
            "error",
            f"No proxy is set for {target.scheme}:// URLs ({_variable(target)}), and "
            f"{target.host} cannot be reached directly.",
            f"Going direct fails{why}. Behind a proxy, tell your tools where it is.",
            _exportCommand(_variable(target), "http://PROXY-HOST:PORT"),
        )
    ]


def _noProxyFix(facts: Facts, route: Route) -> str:
    name = route.noProxyVariable or "no_proxy"
    value = facts.environ.get(name, "")
    kept = [e for e in value.replace(" ", ",").split(",") if e and e != route.bypass]
    return _exportCommand("no_proxy", ",".join(kept))


def _proxyMade(answer: Answer, target: Target) -> bool:
    """A proxy's own answer: to CONNECT always; for http:// only what a proxy says."""
    if answer.status // 100 == 2:
        return False
    if target.scheme == "https" or answer.status == 407:
        return True
    if answer.header("proxy-status"):
        return True
    return answer.status in (403, 502, 503, 504) and answer.header("via") is None


def _isProxygate(facts: Facts, answer: Answer | None = None) -> bool:
    status = (answer.header("proxy-status") if answer else None) or ""
    issuer = (facts.leaf.issuer if facts.leaf else None) or ""
    return (
        status.lower().startswith("proxygate")
        or "O=proxygate" in issuer
        or bool(facts.ca and facts.ca.verifies)
    )


def _firstLine(body: str) -> str:
    line = next((ln.strip() for ln in body.splitlines() if ln.strip()), "")
    return "".join(ch if ch.isprintable() else " " for ch in line)[:200]


def _proxyRefusal(facts: Facts, answer: Answer) -> Finding | None:
    target, route = facts.target, facts.python
    proxy = route.proxy
    reason = _firstLine(answer.body)
    status = answer.header("proxy-status")
    said = f': "{reason}"' if reason else ""
    said += f" (Proxy-Status: {status})" if status else ""
    code = f"{answer.status} {answer.reason}".strip()
    if answer.status == 407:
        challenge = answer.header("proxy-authenticate") or ""
        realm = challenge.partition("realm=")[2].split(",")[0].strip('"') if challenge else ""
        inRealm = f', realm "{realm}"' if realm else ""
        if proxy.user is None:
            return Finding(
                "proxy-auth-missing",
                "error",
                f"The proxy needs a user name and password ({code}{inRealm}), and "
                f"{route.variable} has none.",
                "Put them in the proxy URL, percent-encoded; the command asks for the "
                "password without showing it.",
                encodeCommand(route.variable or _variable(target), proxy, None),
            )
        detail = "Check the user name and password."
        if proxy.unencoded:
            detail += " The password also has characters that must be percent-encoded (above)."
        else:
            detail += (
                " If the password has special characters they must be percent-encoded "
                "(@ %40, : %3A, % %25, / %2F, # %23); the command below does it for you."
            )
        return Finding(
            "proxy-auth-rejected",
            "error",
            f"The proxy refused the credentials of user {proxy.user!r} from {route.variable} "
            f"({code}{inRealm}).",
            detail,
            encodeCommand(route.variable or _variable(target), proxy, proxy.user),
        )
    if answer.status == 403:
        detail = "This is the proxy's policy: only its administrator can change it."
        if _isProxygate(facts, answer) or "denied" in reason.lower():
            detail += _proxygatePolicyHint(reason)
        return Finding(
            "proxy-denied",
            "error",
            f"The proxy refused {target.authority} with {code}{said}.",
            detail,
        )
    if answer.status in (502, 503, 504):
        return Finding(
            "proxy-upstream-failed",
            "error",
            f"The proxy could not get {target.authority} for you: {code}{said}.",
            "The proxy is reachable and accepted the request; the failure is between the "
            "proxy and the server (a name that does not resolve, a refused connection, or a "
            "certificate the proxy does not trust).",
        )
    if target.scheme == "https":
        return Finding(
            "proxy-refused",
            "error",
            f"The proxy answered CONNECT {target.authority} with {code}{said}.",
        )
    return None


def _proxygatePolicyHint(reason: str) -> str:
    lowered = reason.lower()
    if "port" in lowered:
        return " In proxygate that is [proxy] connect_ports."
    if "address" in lowered or "client" in lowered:
        return " In proxygate that is [proxy] allowed_client_cidrs."
    return " In proxygate that is [proxy] allow_destinations / deny_destinations."


def _tlsOrHTTPFailure(facts: Facts, fetch: Fetch) -> list[Finding]:
    target = facts.target
    failed = fetch.failed
    if failed.name == "tls" and failed.error == "bundle":
        trust = facts.trust
        return [
            Finding(
                "ca-bundle-unusable",
                "error",
                f"The CA bundle your tools use cannot be read: {failed.detail}.",
                "requests and pip then fail before sending anything.",
                f"unset {trust.label}" if trust.label.isupper() else None,
            )
        ]
    if failed.name == "tls" and failed.error == "verify":
        code = fetch.tls.verifyCode if fetch.tls else None
        if code in _UNKNOWN_ISSUER:
            return [_untrustedCA(facts, fetch)]
        return [
            Finding(
                "tls-verify-failed",
                "error",
                f"The certificate of {target.host} does not verify: "
                f"{fetch.tls.verifyMessage if fetch.tls else failed.detail}.",
                _leafText(facts.leaf),
            )
        ]
    if failed.name == "tls":
        return [Finding("tls-failed", "error", f"{failed.detail}.")]
    if failed.name == "tcp":
        return []  # said by the direct-route finding
    if failed.name == "http" and failed.error == "status" and fetch.answer is not None:
        via = f"through {facts.python.proxy.display()}" if facts.python.proxy else "direct"
        answer = fetch.answer
        return [
            Finding(
                "server-error",
                "error",
                f"The server answered {answer.status} {answer.reason} for {target.url}.".replace(
                    " .", "."
                ),
                f"The way there ({via}) works: the URL itself fails.",
            )
        ]
    return [
        Finding(
            "fetch-failed",
            "error",
            f"The {failed.name} step failed: {failed.detail}.",
        )
    ]


def _leafText(leaf: TLSInfo | None) -> str:
    if leaf is None or leaf.issuer is None:
        return ""
    return f"It was issued to {leaf.subject or '?'} by {leaf.issuer}."


def _untrustedCA(facts: Facts, fetch: Fetch) -> Finding:
    target, leaf, ca = facts.target, facts.leaf, facts.ca
    issuer = leaf.issuer if leaf and leaf.issuer else None
    proxied = facts.python.proxy is not None
    caName = f'"{issuer}"' if issuer else "a CA"
    title = f"The certificate for {target.host} was issued by {caName}, which your tools " + (
        f"do not trust ({facts.trust.label})."
    )
    lines = []
    if proxied:
        lines.append(
            "The proxy decrypts HTTPS (TLS interception) and signs every site with its own CA; "
            "your tools must trust that CA."
        )
    proxygate = _isProxygate(facts)
    caFile = ca.savedTo if ca and ca.savedTo else "~/proxygate-ca.pem"
    fix = None
    if ca is not None and ca.verifies:
        lines.append(
            f"It is proxygate's CA ({ca.subject}), served at {ca.url} "
            f"(SHA-256 {ca.fingerprint}): trusting it fixes this."
        )
        fix = f"curl -fsS {ca.url} -o ~/proxygate-ca.pem"
        if ca.savedTo:
            lines.append(f"Saved to {ca.savedTo}.")
            fix = None
        elif ca.saveError:
            lines.append(f"It could not be saved ({ca.saveError}).")
    elif proxygate:
        where = ca.url if ca else "http://PROXY-HOST:9530/ca.pem"
        lines.append(
            "It is proxygate's CA: proxygate serves it at /ca.pem on its metrics listener "
            f"(by default port 9530 on the proxy host, {where})"
            + (f", which did not work from here: {ca.error}" if ca and ca.error else "")
            + (
                "; the CA found there does not verify this certificate"
                if ca and not ca.error and not ca.verifies
                else ""
            )
            + ". Ask the proxy's administrator for it if it is not reachable from here, and "
            "check its fingerprint with: openssl x509 -in ~/proxygate-ca.pem -noout "
            "-fingerprint -sha256"
        )
        fix = f"curl -fsS {where} -o ~/proxygate-ca.pem"
    else:
        lines.append(
            "Get that CA's certificate from the proxy's administrator (or export it from a "
            "browser that works) and trust it as below."
        )
    checks = facts.toolChecks
    if checks:
        trusting = sorted(t for t, (ok, _) in checks.items() if ok)
        failing = sorted(t for t, (ok, _) in checks.items() if ok is False)
        if trusting:
            lines.append(f"Already trusting it here: {', '.join(trusting)}.")
        if failing:
            lines.append(f"Not trusting it: {', '.join(failing)}.")
    recipes = trustRecipes(facts, caFile, only=_needRecipes(facts))
    return Finding("tls-untrusted-ca", "error", title, " ".join(lines), fix, recipes)


def _needRecipes(facts: Facts) -> set[str] | None:
    if not facts.toolChecks:
        return None
    return {t for t, (ok, _) in facts.toolChecks.items() if not ok}


def trustRecipes(facts: Facts, caFile: str, only: set[str] | None = None) -> tuple:
    """How each installed tool trusts C{caFile} (docs/trust-ca.md, condensed)."""
    bundle = facts.systemBundle
    env = facts.environ
    recipes: list[tuple[str, str]] = []

    def add(tool: str, command: str) -> None:
        wanted = only is None or tool in only or tool.startswith("system-")
        if tool in facts.installed and wanted:
            recipes.append((tool, command))

    add(
        "system-debian",
        f"sudo cp {caFile} /usr/local/share/ca-certificates/proxygate.crt "
        "&& sudo update-ca-certificates",
    )
    add(
        "system-rhel",
        f"sudo cp {caFile} /etc/pki/ca-trust/source/anchors/proxygate.pem && sudo update-ca-trust",
    )
    if env.get("REQUESTS_CA_BUNDLE") or env.get("CURL_CA_BUNDLE"):
        add("pip", f"export REQUESTS_CA_BUNDLE={bundle}")
    else:
        add("pip", f"pip config set global.cert {bundle}")
    add("requests", f"export REQUESTS_CA_BUNDLE={bundle}")
    if env.get("CURL_CA_BUNDLE") or env.get("SSL_CERT_FILE"):
        add("curl", f"export CURL_CA_BUNDLE={bundle}")
    else:
        add("curl", "# the system store step is enough for curl")
    add("git", f"git config --global http.sslCAInfo {bundle}")
    add("conda", f"conda config --set ssl_verify {bundle}")
    add("node", f"export NODE_EXTRA_CA_CERTS={caFile}")
    if env.get("SSL_CERT_FILE"):
        add("python", f"export SSL_CERT_FILE={bundle}")
    return tuple(recipes)


def _success(facts: Facts, fetch: Fetch) -> list[Finding]:
    target, route = facts.target, facts.python
    answer = fetch.answer
    via = f"through {route.proxy.display()}" if route.proxy else "direct"
    status = f"{answer.status} {answer.reason}".strip() if answer else "answered"
    out = [Finding("fetch-ok", "info", f"GET {target.url} works {via}: {status}.")]
    tls = fetch.tls
    if tls is not None and tls.verified and tls.issuer and route.proxy is not None:
        decrypted = "O=proxygate" in tls.issuer or facts.ca is not None
        if decrypted:
            out.append(
                Finding(
                    "intercepted-trusted",
                    "info",
                    f"The proxy decrypts HTTPS (certificate issued by {tls.issuer}), and "
                    f"{facts.trust.label} trusts it.",
                )
            )
    failing = sorted(t for t, (ok, _) in facts.toolChecks.items() if ok is False)
    if failing:
        names = ", ".join(f"{t} ({facts.toolChecks[t][1].label})" for t in failing)
        issuer = tls.issuer if tls and tls.issuer else "its CA"
        out.append(
            Finding(
                "tool-untrusted",
                "warning",
                f"Other tools here would not trust the certificate of {target.host} "
                f"(issued by {issuer}): {names}.",
                "",
                None,
                trustRecipes(facts, "~/proxygate-ca.pem", only=set(failing)),
            )
        )
    return out
