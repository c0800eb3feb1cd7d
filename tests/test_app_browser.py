"""
The test infrastructure for the inbound gateway's end-to-end tests, exercised directly (no
proxygate yet): the Shiny app harness, and the headless browser driving the app's
WebSocket-driven UI and a file upload the way a user does.
"""

from __future__ import annotations

import hashlib
import urllib.parse
import urllib.request

import pytest
import websocket

from tests.support import payload
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


@needsChromium
def test_browserDrivesTheShinyApp(app: ShinyApp, browser: Chromium, tmp_path) -> None:
    page = browser.page()
    page.navigate(app.url + "/")
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
