"""
The import graph of the gateway package: the pure layers load no Twisted, no module imports
a module that imports it back (lazy imports inside functions included), and the lower
layers never reach up into the Twisted protocols of gateway/proxy/.

Read from the source (every `import` and `from ... import`, wherever it stands), so a lazy
import that only runs on some path is checked too.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "gateway"

#: Modules that must import without Twisted: the sans-IO layers.
PURE = [
    "gateway.http1.parse",
    "gateway.http1.framing",
    "gateway.http1.headers",
    "gateway.http1.rewrite",
    "gateway.message",
    "gateway.policy",
    "gateway.upstream",
    "gateway.exchange.exchange",
    "gateway.exchange.problems",
    "gateway.exchange.targets",
    "gateway.exchange.answers",
    "gateway.exchange.side",
    "gateway.inbound.routes",
    "gateway.inbound.balance",
    "gateway.inbound.rewrite",
    "gateway.h2.frames",
    "gateway.h2.huffman",
    "gateway.h2.hpack",
    "gateway.h2.fields",
    "gateway.h2.events",
    "gateway.h2.machine",
]

#: Layers below gateway/proxy/: they must not import it (prefix match on module names).
BELOW_PROXY = [
    "gateway.http1",
    "gateway.exchange",
    "gateway.message",
    "gateway.tls",
    "gateway.metricsserver",
    "gateway.metrics",
    "gateway.policy",
    "gateway.upstream",
    "gateway.auth",
    "gateway.accesslog",
    "gateway.config",
    "gateway.seam",
    "gateway.inbound",
]


def moduleName(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def importsOf(path: Path) -> set[str]:
    """Every gateway module C{path} imports, anywhere in it (resolved to module names)."""
    name = moduleName(path)
    isPackage = path.name == "__init__.py"
    package = name if isPackage else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            # `from . import x` / `from .pkg import mod`: x may be a module itself
            for alias in node.names:
                found.add(f"{module}.{alias.name}")
    return {m for m in found if m.startswith("gateway")}


def graph() -> dict[str, set[str]]:
    modules = {moduleName(p): p for p in PACKAGE.rglob("*.py")}
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges[name] = {m for m in importsOf(path) if m in modules and m != name}
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    onStack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        onStack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in onStack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                onStack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_noImportCycles() -> None:
    """No gateway module imports one that imports it back, lazily or not."""
    edges = graph()
    # A package's __init__ importing its own modules is how packages are built, and
    # importing the package from a module of it only runs the __init__: not a cycle of use.
    for name in list(edges):
        edges[name] = {m for m in edges[name] if not name.startswith(m + ".")}
    assert cycles(edges) == []


def test_cycleFinderFindsCycles() -> None:
    """The checker itself: a lazy two-module cycle is found."""
    edges = {"a": {"b"}, "b": {"a"}, "c": {"a"}}
    assert cycles(edges) == [["a", "b"]]


@pytest.mark.parametrize("layer", BELOW_PROXY)
def test_lowerLayersDoNotImportProxy(layer: str) -> None:
    edges = graph()
    offenders = {
        name: sorted(m for m in targets if m == "gateway.proxy" or m.startswith("gateway.proxy."))
        for name, targets in edges.items()
        if (name == layer or name.startswith(layer + "."))
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_pureLayersLoadNoTwisted() -> None:
    """`import gateway.http1.parse` (and the other sans-IO modules) loads no Twisted."""
    script = (
        "import importlib, sys\n"
        f"for name in {PURE!r}:\n"
        "    importlib.import_module(name)\n"
        "    loaded = sorted(m for m in sys.modules if m.split('.')[0] == 'twisted')\n"
        "    assert not loaded, (name, loaded[:5])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=PACKAGE.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_gatewayStillOffersItsAPI() -> None:
    """The lazy package still gives loadConfig and makeService, and refuses the unknown."""
    import gateway

    assert callable(gateway.loadConfig) and callable(gateway.makeService)
    with pytest.raises(AttributeError):
        gateway.noSuchThing  # noqa: B018


#: Packages the tests use as reference peers but proxygate must run without (setup.cfg's `test`
#: extra, not install_requires): python-hyper's HTTP/2 stack.
TEST_ONLY = ("h2", "hpack", "hyperframe")


def test_noRuntimeImportOfTestOnlyPackages() -> None:
    """
    The test venv has h2 installed, so a stray `import h2` in gateway/ would pass every test and
    fail only in a user's `pip install .`: checked here, on the source.
    """
    offenders = {}
    for path in PACKAGE.rglob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                found.add(node.module.split(".")[0])
        if found & set(TEST_ONLY):
            offenders[moduleName(path)] = sorted(found & set(TEST_ONLY))
    assert offenders == {}
