"""
C{proxygate-doctor [URL]}: gathers what the user's tools would use, runs the fetch step by
step, and prints the findings (or C{--json}). Exit status: 0 when the fetch works and
nothing is wrong, 1 when something is, 2 for a bad command line.

Standard library only, and no Twisted: it must start fast on a user's machine. Every line
it writes goes through L{_redact} as a last guard, so no spelling of a password found in
the settings can reach the screen even through a message nobody foresaw.
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import json
import os
import shutil
import ssl
import subprocess
import sys
import textwrap
from urllib.parse import urlsplit

from . import probe
from .diagnose import CAOffer, Facts, Finding, diagnose
from .settings import (
    ProxyURL,
    Trust,
    caseProblems,
    condaSettings,
    curlRoute,
    parseProxyURL,
    pipConfigFiles,
    pipSettings,
    primaryTrust,
    pythonRoute,
    splitTarget,
    toolTrusts,
)
from .x509 import certificateNames, fingerprint, pemCertificates

__all__ = ["main"]

DEFAULT_URL = "https://pypi.org/simple/"
METRICS_PORT = 9530

_STEP_NAMES = {
    "proxy-tcp": "TCP to the proxy",
    "proxy-tls": "TLS with the proxy",
    "connect": "CONNECT",
    "tcp": "TCP to the server",
    "tls": "TLS handshake",
    "http": "HTTP answer",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="proxygate-doctor",
        description=(
            "Find out why a fetch fails behind a proxy: reads the proxy and CA settings your "
            "tools use (http_proxy, https_proxy, no_proxy, REQUESTS_CA_BUNDLE, SSL_CERT_FILE, "
            "CURL_CA_BUNDLE, PIP_CERT, git's http.proxy, pip.conf), fetches URL through them "
            "step by step, and says what is wrong and the command that fixes it."
        ),
        epilog="Exit status: 0 the fetch works, 1 something is wrong, 2 bad arguments.",
    )
    parser.add_argument("url", nargs="?", default=DEFAULT_URL, help=f"default: {DEFAULT_URL}")
    parser.add_argument("--json", action="store_true", help="print the findings as JSON")
    parser.add_argument(
        "--timeout", type=float, default=10.0, help="seconds for each step (default 10)"
    )
    parser.add_argument(
        "--proxy",
        metavar="URL",
        help="check this proxy, as if http_proxy, https_proxy and their upper-case forms were "
        "set to it (to try a setting before exporting it)",
    )
    parser.add_argument(
        "--metrics-url",
        help="proxygate's metrics listener, where its CA is served at /ca.pem "
        f"(default: http://PROXY-HOST:{METRICS_PORT})",
    )
    parser.add_argument(
        "--save-ca",
        metavar="FILE",
        help="when the proxy is proxygate and its CA is not trusted yet, save the CA here",
    )
    parser.add_argument(
        "--ca-bundle",
        metavar="FILE",
        help="verify with this CA bundle instead of the one your tools would use (to try a CA "
        "before trusting it)",
    )
    return parser


# -- gathering ------------------------------------------------------------------------------


def _systemTrust() -> Trust:
    paths = ssl.get_default_verify_paths()
    cafile = paths.openssl_cafile if os.path.isfile(paths.openssl_cafile) else None
    capath = paths.openssl_capath if os.path.isdir(paths.openssl_capath) else None
    return Trust("the system store", cafile, capath)


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read(1 << 20)
    except OSError:
        return None


def _git(args: list[str], environ: dict[str, str]) -> str | None:
    git = shutil.which("git", path=environ.get("PATH"))
    if git is None:
        return None
    try:
        done = subprocess.run(
            [git, "config", *args],
            capture_output=True,
            text=True,
            timeout=3,
            env=environ,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


def _installed(environ: dict[str, str]) -> tuple[str, ...]:
    path = environ.get("PATH")
    found = []
    checks = [
        ("pip", ("pip", "pip3")),
        ("requests", ("python3",)),
        ("python", ("python3",)),
        ("curl", ("curl",)),
        ("git", ("git",)),
        ("conda", ("conda",)),
        ("node", ("node",)),
        ("system-debian", ("update-ca-certificates",)),
        ("system-rhel", ("update-ca-trust",)),
    ]
    for tool, programs in checks:
        # The trust-store tools live in sbin, which a user's PATH often lacks.
        where = f"{path}:/usr/sbin:/sbin" if tool.startswith("system-") else path
        if any(shutil.which(p, path=where) for p in programs) or (
            tool == "conda" and environ.get("CONDA_EXE")
        ):
            found.append(tool)
    return tuple(found)


def _certifi() -> str | None:
    try:
        spec = importlib.util.find_spec("certifi")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(next(iter(spec.submodule_search_locations)), "cacert.pem")
    return path if os.path.isfile(path) else None


def gather(args, environ: dict[str, str]) -> Facts:
    """Everything the diagnosis reads: settings from the environment and files, the fetch."""
    scheme, host, port, path = splitTarget(args.url)
    target = probe.Target(scheme, host, port, path)
    explicitPort = urlsplit(args.url).port
    home = environ.get("HOME") or os.path.expanduser("~")
    pipTexts = []
    for file in pipConfigFiles(environ, home):
        text = _read(file)
        if text is not None:
            pipTexts.append((file, text))
    pip = pipSettings(environ, pipTexts)
    gitProxyText = _git(["--get-urlmatch", "http.proxy", target.url], environ)
    gitCAInfo = _git(["--get-urlmatch", "http.sslCAInfo", target.url], environ)
    conda: dict[str, str] = {}
    for file in (os.path.join(home, ".condarc"), environ.get("CONDARC")):
        text = _read(file) if file else None
        if text:
            conda.update(condaSettings(text))
    condaProxy = conda.get(f"proxy_servers.{scheme}")
    system = _systemTrust()
    facts = Facts(
        target=target,
        python=pythonRoute(environ, scheme, host, explicitPort),
        curl=curlRoute(environ, scheme, host),
        cases=caseProblems(environ),
        pip=pip,
        gitProxy=parseProxyURL(gitProxyText, "git http.proxy") if gitProxyText else None,
        condaProxy=parseProxyURL(condaProxy, ".condarc proxy_servers") if condaProxy else None,
        trust=(
            Trust("--ca-bundle", args.ca_bundle)
            if args.ca_bundle
            else primaryTrust(environ, system)
        ),
        environ=environ,
        installed=_installed(environ),
    )
    if system.cafile:
        facts.systemBundle = os.path.realpath(system.cafile)
    proxy = facts.python.proxy
    if proxy is not None and proxy.problem:
        return facts
    facts.fetch = probe.fetch(target, proxy, facts.trust, args.timeout)
    failed = facts.fetch.failed
    if failed is not None and failed.name == "tls" and failed.error == "verify":
        facts.leaf = probe.leafOf(target, proxy, args.timeout)
        if proxy is not None or args.metrics_url:
            facts.ca = _offerCA(args, target, proxy)
    tlsReached = facts.fetch.tls is not None or (failed is not None and failed.name == "tls")
    if scheme == "https" and tlsReached and not args.ca_bundle:
        trusts = toolTrusts(
            environ,
            pip,
            system,
            gitCAInfo=gitCAInfo,
            condaVerify=conda.get("ssl_verify"),
            certifi=_certifi(),
        )
        facts.toolChecks = _toolChecks(facts, trusts, args.timeout)
    return facts


def _offerCA(args, target: probe.Target, proxy: ProxyURL | None) -> CAOffer:
    """Fetch proxygate's CA from its metrics listener and check that it is the right one."""
    base = args.metrics_url or f"http://{proxy.hostPort.rsplit(':', 1)[0]}:{METRICS_PORT}"
    url = base.rstrip("/") + "/ca.pem"
    pem, error = probe.fetchCA(base.rstrip("/"), min(args.timeout, 5.0))
    if pem is None:
        return CAOffer(url, error=error)
    ders = pemCertificates(pem)
    if not ders:
        return CAOffer(url, error="it did not serve a certificate")
    names = certificateNames(ders[0])
    ok, _ = probe.verifies(target, proxy, None, args.timeout, cadata=pem)
    saved = saveError = None
    if ok and args.save_ca:
        try:
            with open(args.save_ca, "w", encoding="ascii") as f:
                f.write(pem)
            saved = args.save_ca
        except OSError as e:
            saveError = f"{args.save_ca}: {e.strerror or e}"
    return CAOffer(url, names.subject, fingerprint(ders[0]), bool(ok), None, saved, saveError)


def _toolChecks(facts: Facts, trusts: dict[str, Trust], timeout: float) -> dict:
    """Does each installed tool's CA bundle verify the server? One handshake per bundle."""
    primaryOK = facts.fetch.tls is not None and facts.fetch.tls.verified
    results: dict[tuple, bool | None] = {facts.trust.key: primaryOK}
    checks = {}
    for tool, trust in trusts.items():
        if tool not in facts.installed:
            continue
        if trust.key not in results:
            ok, _ = probe.verifies(facts.target, facts.python.proxy, trust, timeout)
            results[trust.key] = ok
        checks[tool] = (results[trust.key], trust)
    return checks


# -- output ---------------------------------------------------------------------------------


def _secrets(environ: dict[str, str], facts: Facts | None) -> list[str]:
    """Every password spelling found in any setting, and the Basic tokens made from them."""
    urls: list[ProxyURL] = []
    for name, value in environ.items():
        if name.lower().endswith("_proxy") and value:
            urls.append(parseProxyURL(value, name))
    if facts is not None:
        urls += [u for u in (facts.gitProxy, facts.condaProxy) if u]
        if facts.pip.proxy is not None:
            urls.append(parseProxyURL(*facts.pip.proxy))
    secrets = set()
    for url in urls:
        for secret in url.secrets():
            if len(secret) >= 3:
                secrets.add(secret)
        if url.password:
            raw = f"{url.user}:{url.password}".encode()
            secrets.add(base64.b64encode(raw).decode())
    return sorted(secrets, key=len, reverse=True)


def _redact(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, "****")
    return text


def _expectedSteps(facts: Facts) -> list[str]:
    proxy, target = facts.python.proxy, facts.target
    names = ["tcp"] if proxy is None else ["proxy-tcp"]
    if proxy is not None and proxy.scheme == "https":
        names.append("proxy-tls")
    if proxy is not None and target.scheme == "https":
        names.append("connect")
    if target.scheme == "https":
        names.append("tls")
    return [*names, "http"]


def _routeText(route) -> str:
    if route.proxy is not None:
        return f"{route.proxy.display()} (from {route.variable})"
    if route.bypass is not None:
        return f"direct: {route.noProxyVariable} entry {route.bypass!r} matches the host"
    return "direct (no proxy variable set)"


def render(facts: Facts, findings: list[Finding]) -> str:
    lines = [f"proxygate-doctor: {facts.target.url}", "", "What your tools would use"]
    lines.append(f"  pip, requests, conda: {_routeText(facts.python)}")
    lines.append(f"  curl, git:            {_routeText(facts.curl)}")
    env = facts.environ
    noProxy = env.get("no_proxy") or env.get("NO_PROXY")
    if noProxy:
        lines.append(f"  no_proxy:             {noProxy}")
    trust = facts.trust
    where = trust.cafile or trust.capath or "OpenSSL's default"
    lines.append(f"  CA bundle:            {trust.label} ({where})")
    if facts.pip.files:
        lines.append(f"  pip config:           {', '.join(facts.pip.files)}")
    if facts.gitProxy is not None:
        lines.append(f"  git http.proxy:       {facts.gitProxy.display()}")
    fetch = facts.fetch
    if fetch is not None:
        how = "through the proxy" if facts.python.proxy else "direct"
        lines += ["", f"The fetch, step by step ({how}, as pip and requests would)"]
        done = {s.name: s for s in fetch.steps}
        for name in _expectedSteps(facts):
            step = done.get(name)
            label = _STEP_NAMES[name]
            if step is None:
                lines.append(f"  [--]   {label}: not reached")
            else:
                mark = "[ok]  " if step.ok else "[FAIL]"
                lines.append(f"  {mark} {label}: {step.detail} ({step.ms:.0f} ms)")
    lines.append("")
    order = {"error": 0, "warning": 1, "info": 2}
    wrap = textwrap.TextWrapper(
        width=100, subsequent_indent="         ", break_long_words=False, break_on_hyphens=False
    )
    for finding in sorted(findings, key=lambda f: order[f.severity]):
        tag = {"error": "ERROR", "warning": "WARNING", "info": "OK"}[finding.severity]
        wrap.initial_indent = f"{tag:<8} "
        lines += wrap.wrap(finding.title)
        if finding.detail:
            wrap.initial_indent = " " * 9
            lines += wrap.wrap(finding.detail)
        if finding.fix:
            lines.append(f"         Fix: {finding.fix}")
        if finding.recipes:
            lines.append("         To trust the CA: the system store, then each tool found here:")
            grouped: dict[str, list[str]] = {}
            for tool, command in finding.recipes:
                grouped.setdefault(command, []).append(tool)
            tools = {command: ", ".join(names) for command, names in grouped.items()}
            width = max(len(t) for t in tools.values())
            lines += [f"           {t:<{width}}  {c}" for c, t in tools.items()]
    errors = sum(f.severity == "error" for f in findings)
    lines += [
        "",
        "Result: "
        + (
            "the fetch works."
            if not errors
            else f"{errors} problem{'s' if errors > 1 else ''} to fix (exit status 1)."
        ),
    ]
    return "\n".join(lines) + "\n"


def _routeJSON(route) -> dict:
    return {
        "proxy": route.proxy.display() if route.proxy else None,
        "variable": route.variable,
        "noProxyEntry": route.bypass,
        "noProxyVariable": route.noProxyVariable,
    }


def toJSON(facts: Facts, findings: list[Finding]) -> dict:
    fetch = facts.fetch
    errors = sum(f.severity == "error" for f in findings)
    return {
        "url": facts.target.url,
        "ok": not errors,
        "exitStatus": 1 if errors else 0,
        "route": {"python": _routeJSON(facts.python), "curl": _routeJSON(facts.curl)},
        "caBundle": {
            "source": facts.trust.label,
            "file": facts.trust.cafile,
            "dir": facts.trust.capath,
        },
        "steps": [
            {
                "step": s.name,
                "ok": s.ok,
                "detail": s.detail,
                "ms": round(s.ms, 1),
                "error": s.error,
            }
            for s in (fetch.steps if fetch else [])
        ],
        "findings": [
            {
                "id": f.id,
                "severity": f.severity,
                "title": f.title,
                "detail": f.detail,
                "fix": f.fix,
                "recipes": [{"tool": t, "command": c} for t, c in f.recipes],
            }
            for f in findings
        ],
    }


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    environ = dict(os.environ)
    if args.proxy:
        for name in ("http_proxy", "https_proxy"):
            environ[name] = environ[name.upper()] = args.proxy
    facts = None
    try:
        try:
            splitTarget(args.url)
        except ValueError as e:
            print(f"proxygate-doctor: {e}", file=sys.stderr)
            return 2
        facts = gather(args, environ)
        findings = diagnose(facts)
        if args.json:
            out = json.dumps(toJSON(facts, findings), indent=2) + "\n"
        else:
            out = render(facts, findings)
        status = 1 if any(f.severity == "error" for f in findings) else 0
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # the last guard: never a traceback that could show settings
        message = f"proxygate-doctor: internal error: {type(e).__name__}: {e}"
        print(_redact(message, _secrets(environ, facts)), file=sys.stderr)
        return 1
    sys.stdout.write(_redact(out, _secrets(environ, facts)))
    return status
