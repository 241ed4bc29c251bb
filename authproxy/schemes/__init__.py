"""Scheme registry: the ``auth.scheme`` name → the class that implements it.

Adding a scheme is one module under ``authproxy/schemes/`` and one line in
:data:`REGISTRY`. A scheme's module is imported the first time a configuration
names it (or something lists every scheme), so a config of static tokens never
loads the OAuth 2.0 or GitHub code.
"""

from __future__ import annotations

import importlib
from typing import Iterator, Mapping

from authproxy.schemes.base import Scheme

#: scheme name → "module:Class" under authproxy.schemes
REGISTRY: dict[str, str] = {
    "bearer": "static:BearerScheme",
    "header": "static:HeaderScheme",
    "query": "static:QueryScheme",
    "fogbugz": "fogbugz:FogBugzScheme",
    "oauth2": "oauth2:OAuth2Scheme",
    "app_token": "app_token:AppTokenScheme",
    "github_app": "github_app:GitHubAppScheme",
}


class _Schemes(Mapping[str, type[Scheme]]):
    """:data:`REGISTRY` as a mapping of classes, each imported on first use."""

    def __init__(self, registry: Mapping[str, str]) -> None:
        self._registry = registry
        self._loaded: dict[str, type[Scheme]] = {}

    def __getitem__(self, name: str) -> type[Scheme]:
        cls = self._loaded.get(name)
        if cls is None:
            module, _, attr = self._registry[name].partition(":")
            cls = getattr(importlib.import_module(f"authproxy.schemes.{module}"), attr)
            self._loaded[name] = cls
        return cls

    def __iter__(self) -> Iterator[str]:
        return iter(self._registry)

    def __len__(self) -> int:
        return len(self._registry)

    def __contains__(self, name: object) -> bool:
        return name in self._registry


SCHEMES: Mapping[str, type[Scheme]] = _Schemes(REGISTRY)

__all__ = ["REGISTRY", "SCHEMES", "Scheme"]
