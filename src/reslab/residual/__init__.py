"""Residual schemes, chosen by name. A new scheme is one file in this folder plus its lines in `reslab.registry`."""

from importlib import import_module

from reslab.errors import unknown
from reslab.registry import SCHEMES
from reslab.residual.base import ResidualSite, SiteSpec, StreamAdapter


def get_scheme(name: str) -> type[ResidualSite]:
    """The site class registered under `name`; a ReslabError listing the choices otherwise."""
    if name not in SCHEMES:
        raise unknown("residual scheme", name, SCHEMES)
    module, _, attr = SCHEMES[name].partition(":")
    return getattr(import_module(module), attr)


def list_schemes() -> list[str]:
    return list(SCHEMES)


__all__ = ["SCHEMES", "ResidualSite", "SiteSpec", "StreamAdapter", "get_scheme", "list_schemes"]
