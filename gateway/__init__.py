"""
proxygate: a Twisted proxy gateway.

The public API is small: L{loadConfig} reads an INI file into a frozen configuration, and
L{makeService} turns one into an C{IService} to run under twistd or inside any Twisted
application. The twistd plugin (``twistd proxygate``) is a thin wrapper over both.

Both are imported on first use, so that the pure modules (C{gateway.http1}, C{gateway.policy},
C{gateway.upstream}...) can be imported without Twisted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import Config, ConfigError, loadConfig
    from .service import GatewayService, makeService

from ._version import __version__

__all__ = ["Config", "ConfigError", "GatewayService", "__version__", "loadConfig", "makeService"]

_HOMES = {
    "Config": "config",
    "ConfigError": "config",
    "loadConfig": "config",
    "GatewayService": "service",
    "makeService": "service",
}


def __getattr__(name: str):
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'gateway' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value
