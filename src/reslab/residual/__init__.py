"""Residual schemes, chosen by name. A new scheme is one file in this folder plus one line in `SCHEMES`."""

from importlib import import_module

from reslab.errors import unknown
from reslab.residual.base import ResidualSite, SiteSpec, StreamAdapter

SCHEMES: dict[str, str] = {
    "none": "reslab.residual.none:NoResidual",
    "post": "reslab.residual.post:PostLN",
    "post-none": "reslab.residual.post_none:PostNoResidual",
    "pre": "reslab.residual.pre:PreLN",
    "sandwich": "reslab.residual.sandwich:SandwichLN",
    "rezero": "reslab.residual.rezero:ReZero",
    "layerscale": "reslab.residual.layerscale:LayerScale",
    "deepnorm": "reslab.residual.deepnorm:DeepNorm",
    "add": "reslab.residual.add:PlainAdd",
    "article-edit": "reslab.residual.article_edit:ArticleEdit",
    "hc": "reslab.residual.hc:HyperConnections",
    "mhc": "reslab.residual.mhc:ManifoldHyperConnections",
    "attnres": "reslab.residual.attnres:AttentionResiduals",
    "value-residual": "reslab.residual.value_residual:ValueResidual",
}


def get_scheme(name: str) -> type[ResidualSite]:
    """The site class registered under `name`; a ReslabError listing the choices otherwise."""
    if name not in SCHEMES:
        raise unknown("residual scheme", name, SCHEMES)
    module, _, attr = SCHEMES[name].partition(":")
    return getattr(import_module(module), attr)


def list_schemes() -> list[str]:
    return list(SCHEMES)


__all__ = ["SCHEMES", "ResidualSite", "SiteSpec", "StreamAdapter", "get_scheme", "list_schemes"]
