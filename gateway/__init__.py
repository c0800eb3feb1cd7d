"""
proxygate: a Twisted forward proxy gateway.

The public API is small: L{loadConfig} reads an INI file into a frozen configuration, and
L{makeService} turns one into an C{IService} to run under twistd or inside any Twisted
application. The twistd plugin (``twistd proxygate``) is a thin wrapper over both.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import Config, ConfigError, loadConfig
    from .service import GatewayService, makeService

__all__ = ["Config", "ConfigError", "GatewayService", "loadConfig", "makeService"]
__version__ = "0.1.0"

_LAZY = {
    "Config": "config",
    "ConfigError": "config",
    "loadConfig": "config",
    "GatewayService": "service",
    "makeService": "service",
}


def __getattr__(name: str):
    """
    The public names, imported on first use: importing a submodule that needs no Twisted
    (the proxygate-doctor console script, gateway.doctor) must not load the proxy.
    """
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'gateway' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
