"""Residual schemes, chosen by name: the built-in ones (one file each in this folder, one line in
`reslab.registry.SCHEMES`) and those installed plug-ins register (entry-point group `reslab.schemes`).

Connections across depth (`residual/depth/`) are registered the same way and compose with a scheme by name:
`pre+x0+long-skip` is pre-LN with x0 injection and a long skip; a connection's name alone (`x0`) or a recipe's
(`speedrun`) means it on `pre`.
"""

from functools import cache

from reslab.errors import ReslabError
from reslab.registry import SCHEMES, load, names
from reslab.residual.base import ResidualSite, SiteSpec, StreamAdapter
from reslab.residual.depth.base import Connection, Recipe, compose

COMPOSE = "+"  # joins a scheme and connections in one name


def get_scheme(name: str) -> type[ResidualSite]:
    """The site class registered under `name`, or the composition it spells; a ReslabError listing the choices
    otherwise."""
    found = load("residual scheme", name) if COMPOSE not in name else None
    if found is not None and isinstance(found, type) and issubclass(found, ResidualSite):
        return found
    return _composed(name)


@cache
def _composed(name: str) -> type[ResidualSite]:
    base: type[ResidualSite] | None = None
    parts: list[type[Connection]] = []
    words = name.split(COMPOSE)
    if not all(words) or name != "".join(name.split()):
        raise ReslabError(f"residual {name!r}: join a scheme and connections with + and nothing else, no empty part "
                          "and no spaces (e.g. pre+x0+long-skip)")
    for word in words:
        found = load("residual scheme", word)
        if isinstance(found, type) and issubclass(found, Recipe):
            base = _one_base(name, base, get_scheme(found.base))
            parts += [load("residual scheme", part) for part in found.parts]
        elif isinstance(found, type) and issubclass(found, Connection):
            parts.append(found)
        elif isinstance(found, type) and issubclass(found, ResidualSite):
            base = _one_base(name, base, found)
        else:
            raise ReslabError(f"residual {word!r} is neither a scheme nor a connection across depth")
    repeated = [part.name for part in parts if parts.count(part) > 1]
    if repeated:
        raise ReslabError(f"residual {name!r} names connection {repeated[0]!r} twice; name it once")
    composed = compose(name, base or get_scheme("pre"), tuple(parts))
    if len(words) == 1:  # a connection or recipe by its own name states its own formula and paper (`reslab list`)
        composed.formula, composed.paper = found.formula, found.paper
    return composed


def _one_base(name: str, chosen: type[ResidualSite] | None, found: type[ResidualSite]) -> type[ResidualSite]:
    if chosen is not None and chosen is not found:
        raise ReslabError(f"residual {name!r} names two schemes, {chosen.name!r} and {found.name!r}; a composition "
                          "has one scheme and any connections across depth (e.g. pre+x0+long-skip)")
    return found


def list_schemes() -> list[str]:
    """Every scheme's name, the plug-ins' included."""
    return names("residual scheme")


__all__ = ["SCHEMES", "ResidualSite", "SiteSpec", "StreamAdapter", "get_scheme", "list_schemes"]
