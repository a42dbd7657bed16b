"""Named reproductions of the claims behind reslab. Each is one module with `add_arguments` and `run`."""

from importlib import import_module

from reslab.errors import unknown

REPRODUCTIONS: dict[str, str] = {
    "deep-mlp-gradients": "reslab.reproduce.deep_mlp",
    "tiny-residual": "reslab.reproduce.tiny_residual",
    "depth": "reslab.reproduce.depth",
    "post-vs-pre": "reslab.reproduce.post_vs_pre",
    "mhc-gain": "reslab.reproduce.mhc_gain",
    "minimind-diagram": "reslab.reproduce.minimind_diagram",
    "book-figure": "reslab.reproduce.book_figure",
    "deepseek-residuals": "reslab.reproduce.deepseek_residuals",
}


def get_reproduction(name: str):
    if name not in REPRODUCTIONS:
        raise unknown("reproduction", name, REPRODUCTIONS)
    return import_module(REPRODUCTIONS[name])
