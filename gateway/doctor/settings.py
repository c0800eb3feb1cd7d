"""
What the user's tools would read, and how each of them reads it: pure functions over an
environment mapping and file texts, so every rule is tested in process.

Two families of tools read the proxy variables, with different rules, and the doctor
models both rather than one blend of them:

- B{Python} (C{requests}, and so pip and conda; C{urllib}): every variable whose name ends
  in C{_proxy}, in any case; the lower-case one wins, and a lower-case one set to the empty
  string removes the upper-case one (C{urllib.request.getproxies_environment}). The
  scheme's own variable, else C{all_proxy}. C{no_proxy} (else C{NO_PROXY}) entries are
  matched as requests does: a plain string suffix of the host (so C{ample.com} matches
  C{example.com}), CIDRs for IPv4 hosts, plus urllib's dot-boundary suffix match and C{*}.
  A proxy URL without a port gets the scheme's port (80 for http://, 443 for https://).
- B{curl} (and git and other libcurl programs): the lower-case variable if it is set and
  not empty, else the upper-case one, except C{HTTP_PROXY}, which curl never reads (the
  "httpoxy" rule: a CGI request header can set it); then C{all_proxy}, C{ALL_PROXY}.
  C{no_proxy} (else C{NO_PROXY}): C{*} alone matches everything; other entries are names
  matched on a dot boundary (a leading dot is optional) or IPs and CIDRs for IP hosts. A
  proxy URL without a port gets 1080.

The fetch itself follows the Python rules (the default URL is PyPI's, and the people the
doctor is for run pip, requests and conda); where curl would do something else for the
same URL, the doctor says so.
"""

from __future__ import annotations

import configparser
import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import quote, unquote, urlsplit

from ..message import bracketed

__all__ = [
    "CaseProblem",
    "PipSettings",
    "ProxyURL",
    "Route",
    "Trust",
    "caseProblems",
    "condaSettings",
    "curlBypass",
    "curlRoute",
    "opensslTrust",
    "parseProxyURL",
    "pipConfigFiles",
    "pipSettings",
    "pipTrust",
    "primaryTrust",
    "pythonBypass",
    "pythonProxies",
    "pythonRoute",
    "splitTarget",
    "toolTrusts",
]

#: Characters that end or split the user-info part of a URL when written as they are.
_DELIMITERS = {
    "@": "%40",
    "/": "%2F",
    "?": "%3F",
    "#": "%23",
    "[": "%5B",
    "]": "%5D",
    " ": "%20",
}
_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")


@dataclass(frozen=True)
class ProxyURL:
    """
    A proxy URL as the user wrote it, split the way they meant it: the credentials are
    everything before the last C{@}, so an unencoded C{@} in a password still gives the
    right host, and the characters that should have been percent-encoded are listed
    (never the password itself).
    """

    source: str
    scheme: str
    host: str
    port: int
    user: str | None
    password: str | None
    #: Characters written raw in the user name or password that must be percent-encoded,
    #: as (character, its encoding, "user name" | "password").
    unencoded: tuple[tuple[str, str, str], ...] = ()
    #: The port was left out (curl then uses 1080, Python the scheme's port).
    portMissing: bool = False
    #: Why the URL cannot be used at all, in plain words (None: usable).
    problem: str | None = None

    @property
    def hostPort(self) -> str:
        return f"{bracketed(self.host)}:{self.port}"

    def display(self, password: str = "****") -> str:
        """The URL for people to read: the password is always replaced by C{password}."""
        userinfo = ""
        if self.user is not None:
            userinfo = quote(self.user, safe="")
            if self.password is not None:
                userinfo += ":" + password
            userinfo += "@"
        return f"{self.scheme}://{userinfo}{self.hostPort}"

    def secrets(self) -> list[str]:
        """Every spelling of the password that could reach output by accident."""
        if not self.password:
            return []
        forms = {self.password, quote(self.password, safe=""), quote(self.password)}
        return sorted(forms, key=len, reverse=True)


def parseProxyURL(text: str, source: str) -> ProxyURL:
    """Split a proxy URL from a variable or config file (no scheme means http://)."""
    raw = text.strip()
    scheme, sep, rest = raw.partition("://")
    if not sep:
        scheme, rest = "http", raw
    scheme = scheme.lower()
    userinfo, at, hostPart = rest.rpartition("@")
    if not at:
        userinfo, hostPart = "", rest
    hostPart = re.split(r"[/?#]", hostPart, maxsplit=1)[0]
    user = password = None
    unencoded: list[tuple[str, str, str]] = []
    if at:
        rawUser, colon, rawPassword = userinfo.partition(":")
        for part, what in ((rawUser, "user name"), (rawPassword if colon else "", "password")):
            seen = []
            for ch in part:
                if ch in _DELIMITERS and ch not in seen:
                    seen.append(ch)
            if _PERCENT.search(part):
                seen.append("%")
            unencoded += [(ch, _DELIMITERS.get(ch, "%25"), what) for ch in seen]
        user = unquote(rawUser)
        password = unquote(rawPassword) if colon else None
    host, port, problem = _hostPort(hostPart)
    portMissing = port is None
    if port is None:
        port = 443 if scheme == "https" else 80
    if problem is None and scheme not in ("http", "https"):
        problem = f"proxygate-doctor checks http:// and https:// proxies, not {scheme}://"
    return ProxyURL(
        source, scheme, host, port, user, password, tuple(unencoded), portMissing, problem
    )


def _hostPort(text: str) -> tuple[str, int | None, str | None]:
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket:
            return text, None, "the IPv6 address has no closing ]"
        portText = rest[1:] if rest.startswith(":") else ""
        if rest and not rest.startswith(":"):
            return host, None, f"unexpected text after the address: {rest[:20]!r}"
    else:
        host, _, portText = text.partition(":")
    if not host:
        return host, None, "there is no host name"
    if not portText:
        return host.lower(), None, None
    if not portText.isdigit() or not 0 < int(portText) < 65536:
        return host.lower(), None, f"the port {portText[:12]!r} is not a number from 1 to 65535"
    return host.lower(), int(portText), None


def splitTarget(url: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, path with query) of the URL to fetch; ValueError if unusable."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ValueError(f"only http:// and https:// URLs can be checked, not {url!r}")
    if not parts.hostname:
        raise ValueError(f"no host in {url!r}")
    port = parts.port or (443 if scheme == "https" else 80)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return scheme, parts.hostname, port, path


# -- which proxy, by whose rules -------------------------------------------------------------


def pythonProxies(environ: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    """
    C{urllib.request.getproxies_environment}: scheme -> (variable, value). Two passes: any
    case first, then lower case only, where an empty lower-case variable removes the entry.
    """
    proxies: dict[str, tuple[str, str]] = {}
    for name, value in environ.items():
        if value and name.lower().endswith("_proxy"):
            proxies[name.lower()[:-6]] = (name, value)
    for name, value in environ.items():
        if name.endswith("_proxy"):
            if value:
                proxies[name.lower()[:-6]] = (name, value)
            else:
                proxies.pop(name.lower()[:-6], None)
    return proxies


def _isIP(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _inNetwork(ip, entry: str) -> bool:
    try:
        return ip in ipaddress.ip_network(entry, strict=False)
    except ValueError:
        return False


def pythonBypass(
    host: str, port: int | None, noProxy: str | None, urllibNoProxy: str | None
) -> str | None:
    """
    The no_proxy entry that makes requests go direct to C{host}, or None.

    C{noProxy} is what requests reads (C{no_proxy} or else C{NO_PROXY}); C{urllibNoProxy}
    what urllib's C{proxy_bypass} reads (the C{no} entry of L{pythonProxies}). C{port} is
    the URL's port when the URL spells one out.
    """
    host = host.lower()
    if noProxy:
        entries = [e for e in noProxy.replace(" ", "").split(",") if e]
        ip = _isIP(host)
        if isinstance(ip, ipaddress.IPv4Address):
            for entry in entries:
                if "/" in entry:
                    if _inNetwork(ip, entry):
                        return entry
                elif host == entry:
                    return entry
        else:
            withPort = f"{host}:{port}" if port else host
            for entry in entries:
                if host.endswith(entry) or withPort.endswith(entry):
                    return entry
    if urllibNoProxy:
        if urllibNoProxy.strip() == "*":
            return "*"
        for raw in urllibNoProxy.split(","):
            entry = raw.strip()
            if not entry:
                continue
            name = entry.lstrip(".").lower()
            if host == name or host.endswith("." + name):
                return entry
    return None


def curlBypass(host: str, noProxy: str | None) -> str | None:
    """The no_proxy entry that makes curl go direct to C{host} (curl 7.86+ rules), or None."""
    if not noProxy:
        return None
    if noProxy.strip() == "*":
        return "*"
    host = host.lower().strip("[]")
    ip = _isIP(host)
    for entry in re.split(r"[,\s]+", noProxy):
        if not entry:
            continue
        token = entry[1:] if entry.startswith(".") else entry
        token = token.lower()
        if ip is not None:
            if "/" in token:
                if _inNetwork(ip, token):
                    return entry
            elif _isIP(token.strip("[]")) == ip:
                return entry
        elif (
            token
            and _isIP(token.split("/")[0]) is None
            and (host == token or host.endswith("." + token))
        ):
            return entry
    return None


@dataclass(frozen=True)
class Route:
    """How one family of tools would reach a URL: through which proxy, or direct and why."""

    rules: str  # "python" | "curl"
    proxy: ProxyURL | None
    #: The variable the proxy came from.
    variable: str | None
    #: The no_proxy entry that sends the host direct, and the variable it is in.
    bypass: str | None = None
    noProxyVariable: str | None = None


def _noProxy(environ: Mapping[str, str]) -> tuple[str | None, str | None]:
    """(value, variable): no_proxy if set and not empty, else NO_PROXY (requests and curl)."""
    for name in ("no_proxy", "NO_PROXY"):
        if environ.get(name):
            return environ[name], name
    return None, None


def pythonRoute(environ: Mapping[str, str], scheme: str, host: str, port: int | None) -> Route:
    """The route requests (pip, conda) would take to C{scheme}://C{host}[:C{port}]."""
    proxies = pythonProxies(environ)
    chosen = proxies.get(scheme) or proxies.get("all")
    if chosen is None:
        return Route("python", None, None)
    noProxy, noProxyName = _noProxy(environ)
    urllibNo = proxies.get("no", (None, None))[1]
    bypass = pythonBypass(host, port, noProxy, urllibNo)
    if bypass is not None:
        via = noProxyName if noProxy else proxies.get("no", ("no_proxy", ""))[0]
        return Route("python", None, chosen[0], bypass, via)
    return Route("python", parseProxyURL(chosen[1], chosen[0]), chosen[0])


def curlRoute(environ: Mapping[str, str], scheme: str, host: str) -> Route:
    """The route curl (and git, through libcurl) would take to C{scheme}://C{host}."""
    names = [f"{scheme}_proxy"] + ([] if scheme == "http" else [f"{scheme.upper()}_PROXY"])
    names += ["all_proxy", "ALL_PROXY"]
    chosen = next((n for n in names if environ.get(n)), None)
    if chosen is None:
        return Route("curl", None, None)
    noProxy, noProxyName = _noProxy(environ)
    bypass = curlBypass(host, noProxy)
    if bypass is not None:
        return Route("curl", None, chosen, bypass, noProxyName)
    proxy = parseProxyURL(environ[chosen], chosen)
    if proxy.portMissing:
        proxy = ProxyURL(
            proxy.source, proxy.scheme, proxy.host, 1080, proxy.user, proxy.password,
            proxy.unencoded, True, proxy.problem,
        )  # fmt: skip
    return Route("curl", proxy, chosen)


@dataclass(frozen=True)
class CaseProblem:
    """A proxy variable set in one case only, or in both with different values."""

    lower: str
    upper: str
    #: "lower-only" | "upper-only" | "differ"
    kind: str


def caseProblems(environ: Mapping[str, str]) -> list[CaseProblem]:
    """
    Tools disagree on the case they read (wget and curl's http: lower case only; many Go
    and Java programs and Docker: upper case), so each variable should be set in both.
    """
    out = []
    for base in ("http_proxy", "https_proxy", "no_proxy", "all_proxy"):
        lower, upper = environ.get(base), environ.get(base.upper())
        if lower and not upper:
            out.append(CaseProblem(base, base.upper(), "lower-only"))
        elif upper and not lower:
            out.append(CaseProblem(base, base.upper(), "upper-only"))
        elif lower and upper and lower.strip() != upper.strip():
            out.append(CaseProblem(base, base.upper(), "differ"))
    return out


# -- pip's own settings ---------------------------------------------------------------------


@dataclass(frozen=True)
class PipSettings:
    """pip's proxy and cert options, each with where it came from."""

    proxy: tuple[str, str] | None = None  # (value, source)
    cert: tuple[str, str] | None = None
    trustedHosts: tuple[str, ...] = ()
    files: tuple[str, ...] = ()


def pipConfigFiles(environ: Mapping[str, str], home: str) -> list[str]:
    """pip's configuration files in the order pip reads them (later ones win)."""
    configFile = environ.get("PIP_CONFIG_FILE")
    if configFile == os.devnull:
        return []
    xdgDirs = environ.get("XDG_CONFIG_DIRS") or "/etc/xdg"
    files = [os.path.join(d, "pip", "pip.conf") for d in reversed(xdgDirs.split(":")) if d]
    files.append("/etc/pip.conf")
    xdgHome = environ.get("XDG_CONFIG_HOME") or os.path.join(home, ".config")
    files += [os.path.join(home, ".pip", "pip.conf"), os.path.join(xdgHome, "pip", "pip.conf")]
    if environ.get("VIRTUAL_ENV"):
        files.append(os.path.join(environ["VIRTUAL_ENV"], "pip.conf"))
    if configFile:
        files.append(configFile)
    return files


def pipSettings(environ: Mapping[str, str], texts: list[tuple[str, str]]) -> PipSettings:
    """
    pip's effective C{proxy}, C{cert} and C{trusted-host} from its config files (C{texts}:
    (path, content) in L{pipConfigFiles} order; [install] over [global]) and the
    C{PIP_PROXY}, C{PIP_CERT} and C{PIP_TRUSTED_HOST} variables, which win over files.
    """
    values: dict[str, tuple[str, str]] = {}
    for path, text in texts:
        parser = configparser.RawConfigParser()
        try:
            parser.read_string(text, source=path)
        except configparser.Error:
            continue
        for section in ("global", "install"):
            if not parser.has_section(section):
                continue
            for key in ("proxy", "cert", "trusted-host"):
                value = parser.get(section, key, fallback=None)
                if value is not None:
                    values[key] = (value.strip(), f"{path} [{section}] {key}")
    for key, name in (("proxy", "PIP_PROXY"), ("cert", "PIP_CERT")):
        if environ.get(name):
            values[key] = (environ[name], name)
    if environ.get("PIP_TRUSTED_HOST"):
        values["trusted-host"] = (environ["PIP_TRUSTED_HOST"], "PIP_TRUSTED_HOST")
    trusted = tuple(values["trusted-host"][0].split()) if "trusted-host" in values else ()
    return PipSettings(
        values.get("proxy"), values.get("cert"), trusted, tuple(path for path, _ in texts)
    )


# -- which CA bundle each tool verifies against ----------------------------------------------


@dataclass(frozen=True)
class Trust:
    """A set of trusted CAs: a bundle file and/or a folder, and where that choice came from."""

    label: str
    cafile: str | None = None
    capath: str | None = None

    @property
    def key(self) -> tuple[str | None, str | None]:
        return self.cafile, self.capath


def opensslTrust(environ: Mapping[str, str], system: Trust) -> Trust:
    """OpenSSL's default verify paths: SSL_CERT_FILE / SSL_CERT_DIR, else the system store."""
    if environ.get("SSL_CERT_FILE") or environ.get("SSL_CERT_DIR"):
        names = [n for n in ("SSL_CERT_FILE", "SSL_CERT_DIR") if environ.get(n)]
        return Trust(
            " and ".join(names),
            environ.get("SSL_CERT_FILE") or None,
            environ.get("SSL_CERT_DIR") or None,
        )
    return system


def primaryTrust(environ: Mapping[str, str], system: Trust) -> Trust:
    """
    The trust the fetch is judged by: what requests verifies against (REQUESTS_CA_BUNDLE,
    else CURL_CA_BUNDLE), else OpenSSL's defaults (SSL_CERT_FILE / SSL_CERT_DIR, else the
    system store), which Python's ssl, curl and pip 24.2+ (through truststore) use. pip's
    own cert and git's are tool-specific: L{toolTrusts} checks them per tool.
    """
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        if environ.get(name):
            return Trust(name, environ[name])
    return opensslTrust(environ, system)


def pipTrust(environ: Mapping[str, str], pip: PipSettings, system: Trust) -> Trust:
    """
    pip's: REQUESTS_CA_BUNDLE and CURL_CA_BUNDLE first (requests, inside pip, reads them for
    every request, over the bundle pip sets), then pip's cert (PIP_CERT, pip.conf), then
    OpenSSL's defaults.
    """
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        if environ.get(name):
            return Trust(name, environ[name])
    if pip.cert is not None:
        return Trust(f"pip's cert ({pip.cert[1]})", pip.cert[0])
    return opensslTrust(environ, system)


def toolTrusts(
    environ: Mapping[str, str],
    pip: PipSettings,
    system: Trust,
    *,
    gitCAInfo: str | None = None,
    condaVerify: str | None = None,
    certifi: str | None = None,
) -> dict[str, Trust]:
    """The trust each tool family would verify a server with (for the per-tool check)."""
    requestsEnv = next(
        (Trust(n, environ[n]) for n in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE") if environ.get(n)),
        None,
    )
    trusts = {"pip": pipTrust(environ, pip, system)}
    if requestsEnv is not None:
        trusts["requests"] = requestsEnv
    elif certifi:
        trusts["requests"] = Trust("certifi's bundle (requests' default)", certifi)
    if environ.get("CURL_CA_BUNDLE"):
        trusts["curl"] = Trust("CURL_CA_BUNDLE", environ["CURL_CA_BUNDLE"])
    else:
        trusts["curl"] = opensslTrust(environ, system)
    if environ.get("GIT_SSL_CAINFO"):
        trusts["git"] = Trust("GIT_SSL_CAINFO", environ["GIT_SSL_CAINFO"])
    elif gitCAInfo:
        trusts["git"] = Trust("git config http.sslCAInfo", gitCAInfo)
    else:
        trusts["git"] = system
    if condaVerify and condaVerify.lower() not in ("true", "false", "yes", "no"):
        trusts["conda"] = Trust("conda ssl_verify", condaVerify)
    else:
        trusts["conda"] = requestsEnv or trusts.get("requests", system)
    trusts["python"] = opensslTrust(environ, system)
    return trusts


def condaSettings(text: str) -> dict[str, str]:
    """C{ssl_verify} and C{proxy_servers} (http, https) from a .condarc, without a YAML parser."""
    out: dict[str, str] = {}
    inProxies = False
    for line in text.splitlines():
        stripped = line.split("#", 1)[0].rstrip()
        if not stripped:
            continue
        indented = line[:1] in (" ", "\t")
        key, _, value = stripped.strip().partition(":")
        value = value.strip().strip("'\"")
        if not indented:
            inProxies = key == "proxy_servers"
            if key == "ssl_verify" and value:
                out["ssl_verify"] = value
        elif inProxies and key in ("http", "https") and value:
            out[f"proxy_servers.{key}"] = value
    return out
