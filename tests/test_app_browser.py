"""
A real data-science app behind the inbound gateway: the Shiny app harness and the headless
browser exercised directly, then the app behind a route with its prefix, loaded in chromium
through proxygate: its WebSocket-driven UI and a file upload work as they do directly.
"""

from __future__ import annotations

import hashlib
import urllib.parse
import urllib.request

import pytest
import websocket

from tests.support import LOOPBACK_INI, payload, waitFor
from tests.support.appserver import ShinyApp
from tests.support.browser import CHROMIUM, Chromium, PageError

needsChromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")


@pytest.fixture
def app(tmp_path):
    a = ShinyApp(tmp_path).start()
    yield a
    a.stop()


@pytest.fixture
def browser(tmp_path):
    with Chromium(tmp_path) as b:
        yield b


def test_shinyAppServesItsPageAndWebSocket(app: ShinyApp) -> None:
    with urllib.request.urlopen(app.url + "/", timeout=10) as r:
        page = r.read().decode()
    assert "proxygate test app" in page
    assert 'src="lib/shiny-' in page  # relative: it works behind a stripped prefix
    ws = websocket.create_connection(app.url.replace("http", "ws") + "/websocket/", timeout=10)
    ws.close()
    assert app.stop() is not None  # stopped by PID
    with pytest.raises(OSError):
        urllib.request.urlopen(app.url + "/", timeout=2)


@needsChromium
def test_browserEvaluatesAndReportsConsoleErrors(browser: Chromium) -> None:
    assert "Chrome" in browser.version() or "Chromium" in browser.version()
    page = browser.page()
    html = "<title>t</title><p id=p>hi</p><script>console.error('boom ' + 6 * 7)</script>"
    page.navigate("data:text/html," + urllib.parse.quote(html))
    assert page.evaluate("document.getElementById('p').textContent") == "hi"
    assert page.evaluate("Promise.resolve(1 + 1)") == 2
    assert page.waitFor("document.title") == "t"
    assert any("boom 42" in e for e in page.consoleErrors())
    with pytest.raises(PageError, match="nope is not defined"):
        page.evaluate("nope()")
    with pytest.raises(PageError, match="not true within"):
        page.waitFor("false", timeout=0.3)


def driveTheApp(page, tmp_path) -> None:
    """What a user does with the app: change an input, see the output, upload a file."""
    # the output is rendered by the server and arrives over the session's WebSocket
    page.waitFor("document.querySelector('#doubled').textContent === 'doubled: 42'")
    page.evaluate("$('#n').val(5).trigger('change'); true")
    page.waitFor("document.querySelector('#doubled').textContent === 'doubled: 10'")
    data = payload(3 * 1024 * 1024 + 17)
    upload = tmp_path / "data.bin"
    upload.write_bytes(data)
    page.setFiles("#upload", [str(upload)])
    expected = f"uploaded data.bin: {len(data)} bytes sha256 {hashlib.sha256(data).hexdigest()}"
    page.waitFor(f"document.querySelector('#uploaded').textContent === {expected!r}")
    assert [e for e in page.consoleErrors() if "favicon" not in e] == []


@needsChromium
def test_browserDrivesTheShinyApp(app: ShinyApp, browser: Chromium, tmp_path) -> None:
    page = browser.page()
    page.navigate(app.url + "/")
    driveTheApp(page, tmp_path)


@needsChromium
def test_browserDrivesTheShinyAppThroughTheGateway(
    app: ShinyApp, browser: Chromium, startProxy, tmp_path
) -> None:
    gateway = startProxy(
        LOOPBACK_INI
        + f"""
[reverse]
listen = tcp:0:interface=127.0.0.1

[route shiny]
match = /apps/shiny/
backends = {app.url}
balance = sticky
max_body_size = 200M
timeout = 3600
"""
    )
    port = gateway.gatewayPorts[0]
    page = browser.page()
    page.navigate(f"http://127.0.0.1:{port}/apps/shiny/")
    assert page.evaluate("location.pathname") == "/apps/shiny/"
    driveTheApp(page, tmp_path)
    # the sticky pin the gateway set is scoped to the app's prefix
    cookies = page.send("Network.getCookies", urls=[f"http://127.0.0.1:{port}/apps/shiny/"])
    assert [c["name"] for c in cookies["cookies"]] == ["proxygate_shiny"]
    browser.stop()  # the session's WebSocket closes: its line is written
    websocketLine = waitFor(
        lambda: [x for x in gateway.accessLines() if "/101 " in x and "/websocket/" in x]
    )
    assert (
        f"http://127.0.0.1:{port}/apps/shiny/websocket/ - shiny/127.0.0.1:{app.port}"
        in (websocketLine[0])
    )
    lines = gateway.accessLines()
    routed = [line for line in lines if f" shiny/127.0.0.1:{app.port} " in line]
    assert any(" POST " in line and "/upload/" in line for line in routed)
    # every request under the prefix went to the app (a browser's /favicon.ico is a 404)
    assert len(routed) == len([line for line in lines if f":{port}/apps/shiny/" in line])
