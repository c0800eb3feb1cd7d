"""
A real data-science app for the inbound gateway's tests: the Shiny for Python app of
C{tests/apps/shiny_app.py}, run the way its users deploy it (C{shiny run}, uvicorn) on a free
loopback port, stopped by PID.

Shiny was picked over Jupyter Server because it installs with a handful of wheels and
starts in about half a second here, and its page is a WebSocket-driven UI a browser can be
checked against (an output rendered by the server over the session's WebSocket), with a
file upload. Its pages use relative URLs (C{lib/...}, C{websocket/}), so it runs behind a
stripped prefix as it is.
"""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.support import freePort, stopProcess

__all__ = ["APP", "ShinyApp"]

APP = Path(__file__).resolve().parent.parent / "apps" / "shiny_app.py"


class ShinyApp:
    """C{python -m shiny run APP} on 127.0.0.1:C{port}; its output goes to a log file."""

    def __init__(self, workdir: Path, port: int | None = None, app: Path = APP) -> None:
        self.workdir = workdir
        self.port = port or freePort()
        self.app = app
        self.logPath = workdir / f"shiny-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> ShinyApp:
        """Start it, and return once its page answers 200 (or raise with its log)."""
        self._log = open(self.logPath, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "shiny", "run", "--host", "127.0.0.1", "--port",
             str(self.port), str(self.app)],
            cwd=self.workdir,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                with urllib.request.urlopen(self.url + "/", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the Shiny app did not start:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.logPath.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        stopProcess(self.proc, timeout=10)
        self._log.close()
        return self.proc.returncode
