"""Scheme registry: the ``auth.scheme`` name → the class that implements it.

Adding a scheme is one module under ``authproxy/schemes/`` and one line here.
"""

from __future__ import annotations

from authproxy.schemes.base import Scheme
from authproxy.schemes.static import BearerScheme, HeaderScheme, QueryScheme
from authproxy.schemes.app_token import AppTokenScheme
from authproxy.schemes.fogbugz import FogBugzScheme
from authproxy.schemes.oauth2 import OAuth2Scheme
from authproxy.schemes.github_app import GitHubAppScheme

SCHEMES: dict[str, type[Scheme]] = {
    "bearer": BearerScheme,
    "header": HeaderScheme,
    "query": QueryScheme,
    "app_token": AppTokenScheme,
    "fogbugz": FogBugzScheme,
    "oauth2": OAuth2Scheme,
    "github_app": GitHubAppScheme,
}

__all__ = ["SCHEMES", "Scheme"]
