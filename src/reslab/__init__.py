"""reslab: small transformer language models whose residual connection is a swappable, measured part."""

from reslab.errors import ReslabError
from reslab.registry import lazy_names

__version__ = "0.1.0"
__all__ = ["ReslabError", "__version__", "build_model", "get_scheme", "lens", "list_models", "list_schemes",
           "load_ablation", "load_run", "make_config"]

# name -> module: loaded on first use (PEP 562), so `import reslab` and the command line start without torch
_LAZY = {"build_model": "reslab.models", "list_models": "reslab.models", "make_config": "reslab.models",
         "get_scheme": "reslab.residual", "list_schemes": "reslab.residual",
         "lens": "reslab.lens",  # the function reslab.lens(model, tokens); its package is callable the same way
         "load_run": "reslab.runs", "load_ablation": "reslab.ablation_summary"}  # a run, an ablation's summary


__getattr__, __dir__ = lazy_names(__name__, _LAZY)
