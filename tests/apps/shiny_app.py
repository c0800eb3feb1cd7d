"""
A small Shiny for Python app, the kind of app the inbound gateway puts behind a prefix.

Its UI lives on a WebSocket session: the browser sends input changes over it and the
server answers with rendered outputs, so "doubled: 42" on the page proves the session
works. A file input uploads over HTTP (POST to the session's upload URL) and the output
reports the file's size and SHA-256, computed on the server.
"""

import hashlib
import os

from shiny import App, render, ui

app_ui = ui.page_fluid(
    ui.h2("proxygate test app"),
    ui.input_numeric("n", "n", 21),
    ui.output_text("doubled"),
    ui.input_file("upload", "Upload a file"),
    ui.output_text("uploaded"),
)


def server(input, output, session):
    @render.text
    def doubled():
        return f"doubled: {input.n() * 2}"

    @render.text
    def uploaded():
        files = input.upload()
        if not files:
            return "no upload"
        path = files[0]["datapath"]
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return f"uploaded {files[0]['name']}: {os.path.getsize(path)} bytes sha256 {h.hexdigest()}"


app = App(app_ui, server)
