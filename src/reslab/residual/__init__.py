"""Residual schemes, chosen by name: the built-in ones (one file each in this folder, one line in
`reslab.registry.SCHEMES`) and those installed plug-ins register (entry-point group `reslab.schemes`)."""

from reslab.registry import SCHEMES, load, names
from reslab.residual.base import ResidualSite, SiteSpec, StreamAdapter


def get_scheme(name: str) -> type[ResidualSite]:
    """The site class registered under `name`; a ReslabError listing the choices otherwise."""
    return load("residual scheme", name)


def list_schemes() -> list[str]:
    """Every scheme's name, the plug-ins' included."""
    return names("residual scheme")


__all__ = ["SCHEMES", "ResidualSite", "SiteSpec", "StreamAdapter", "get_scheme", "list_schemes"]
