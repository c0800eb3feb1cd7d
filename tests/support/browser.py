"""
A headless browser for end-to-end tests: Debian's chromium, driven over its DevTools
protocol (CDP) with websocket-client, so no chromedriver or selenium is needed.

    with Chromium(tmp_path) as browser:
        page = browser.page()
        page.navigate("http://127.0.0.1:8080/app/")
        page.waitFor("document.querySelector('#doubled').textContent === 'doubled: 42'")
        assert page.consoleErrors() == []

The browser runs with a fresh profile in the caller's folder, no proxy, no background
networking (it must not try to reach the internet from a test), and is stopped by PID.
Every wait has a deadline.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import websocket
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.support import stopProcess

__all__ = ["CHROMIUM", "Chromium", "Page", "PageError"]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-default-apps",
    "--no-proxy-server",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
]


def _spki(pem: bytes) -> str:
    """Chromium's form of a certificate's public key: base64 of the SHA-256 of its SPKI."""
    key = x509.load_pem_x509_certificate(pem).public_key()
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


class PageError(Exception):
    """The page threw, or a condition was not met in time (the message says which)."""


class Chromium:
    """One headless chromium process with its own profile under C{workdir}."""

    def __init__(
        self,
        workdir: Path,
        executable: str | None = None,
        proxy: str | None = None,
        trust: bytes = b"",
    ) -> None:
        """
        @param proxy: C{host:port} of an HTTP proxy for every URL, loopback ones included
            (chromium otherwise goes direct to loopback whatever the proxy setting).
        @param trust: a certificate (PEM) whose key chromium accepts in any chain it is
            shown (a test CA's: the certificates proxygate mints under it), by SPKI hash, as
            the profile has no trust store of its own to add it to.
        """
        self.executable = executable or CHROMIUM
        self.flags = list(_FLAGS)
        if proxy is not None:
            self.flags.remove("--no-proxy-server")
            self.flags += [f"--proxy-server=http://{proxy}", "--proxy-bypass-list=<-loopback>"]
        if trust:
            self.flags.append(f"--ignore-certificate-errors-spki-list={_spki(trust)}")
        if self.executable is None:
            raise RuntimeError("chromium is not installed (apt-get install chromium)")
        self.profile = workdir / "chromium-profile"
        self.logPath = workdir / "chromium.log"
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self._pages: list[Page] = []

    def __enter__(self) -> Chromium:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 30.0) -> Chromium:
        shutil.rmtree(self.profile, ignore_errors=True)
        self.profile.mkdir(parents=True)
        self._log = open(self.logPath, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [self.executable, *self.flags, f"--user-data-dir={self.profile}", "about:blank"],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        # chromium writes its DevTools port (and browser path) here once it listens
        active = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            lines = active.read_text().split() if active.exists() else []
            if lines:
                self.port = int(lines[0])
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"chromium did not start:\n{self.logPath.read_text(errors='replace')}")

    def _json(self, path: str, method: str = "GET"):
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", method=method)
        with urllib.request.urlopen(request, timeout=10) as r:
            return json.loads(r.read())

    def version(self) -> str:
        return self._json("/json/version")["Browser"]

    def page(self) -> Page:
        """A new tab, driven over its own DevTools WebSocket."""
        target = self._json("/json/new?about:blank", method="PUT")
        page = Page(target["webSocketDebuggerUrl"])
        self._pages.append(page)
        return page

    def stop(self) -> None:
        for page in self._pages:
            page.close()
        self._pages.clear()
        if self.proc is not None:
            stopProcess(self.proc, timeout=10)
            self._log.close()
            self.proc = None
        shutil.rmtree(self.profile, ignore_errors=True)


class Page:
    """One tab: commands go out with ids, events are kept for L{consoleErrors}."""

    def __init__(self, url: str) -> None:
        # No Origin header: chromium refuses DevTools WebSockets from unknown origins.
        self.ws = websocket.create_connection(url, timeout=10, suppress_origin=True)
        self._ids = itertools.count(1)
        self.events: list[dict] = []
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable")

    def send(self, method: str, timeout: float = 30.0, **params):
        """Run a DevTools command and return its result (raises L{PageError} on an error)."""
        id = next(self._ids)
        self.ws.send(json.dumps({"id": id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = self._receive(deadline)
            if message is None:
                continue
            if message.get("id") == id:
                if "error" in message:
                    raise PageError(f"{method}: {message['error'].get('message')}")
                return message.get("result", {})
        raise PageError(f"{method}: no answer within {timeout} s")

    def _receive(self, deadline: float) -> dict | None:
        self.ws.settimeout(max(0.05, min(1.0, deadline - time.monotonic())))
        try:
            message = json.loads(self.ws.recv())
        except websocket.WebSocketTimeoutException:
            return None
        if "method" in message:
            self.events.append(message)
        return message

    def navigate(self, url: str, timeout: float = 30.0) -> None:
        """Load C{url} and wait for its load event."""
        seen = len(self.events)
        result = self.send("Page.navigate", url=url)
        if result.get("errorText"):
            raise PageError(f"navigating to {url}: {result['errorText']}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(e["method"] == "Page.loadEventFired" for e in self.events[seen:]):
                return
            self._receive(deadline)
        raise PageError(f"{url} did not finish loading within {timeout} s")

    def evaluate(self, expression: str, timeout: float = 30.0):
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = self.send(
            "Runtime.evaluate",
            timeout=timeout,
            expression=expression,
            returnByValue=True,
            awaitPromise=True,
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise PageError(f"{expression}: {text}")
        return result["result"].get("value")

    def waitFor(self, expression: str, timeout: float = 20.0, interval: float = 0.1):
        """Evaluate C{expression} until it is truthy and return its value."""
        deadline = time.monotonic() + timeout
        value = None
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(interval)
        raise PageError(
            f"not true within {timeout} s: {expression} (last value {value!r}; "
            f"console errors {self.consoleErrors()})"
        )

    def setFiles(self, selector: str, paths: list[str]) -> None:
        """Choose files in an <input type=file>, as a user does in the file dialog."""
        root = self.send("DOM.getDocument")["root"]["nodeId"]
        node = self.send("DOM.querySelector", nodeId=root, selector=selector)["nodeId"]
        if not node:
            raise PageError(f"no element matches {selector!r}")
        self.send("DOM.setFileInputFiles", nodeId=node, files=[str(p) for p in paths])

    def screenshot(self, path: Path) -> None:
        import base64

        data = self.send("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))

    def consoleErrors(self) -> list[str]:
        """What the page reported as errors: console.error, uncaught exceptions, log errors."""
        errors = []
        for event in self.events:
            method, params = event["method"], event.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") == "error":
                errors.append(
                    " ".join(
                        str(a.get("value", a.get("description"))) for a in params.get("args", [])
                    )
                )
            elif method == "Runtime.exceptionThrown":
                details = params.get("exceptionDetails", {})
                errors.append(
                    details.get("exception", {}).get("description") or details.get("text", "")
                )
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                entry = params["entry"]
                errors.append(f"{entry.get('text')} ({entry.get('url', '')})")
        return errors

    def close(self) -> None:
        try:
            self.ws.close()
        except OSError:
            pass
