"""reslab: small transformer language models whose residual connection is a swappable, measured part."""

from reslab.errors import ReslabError
from reslab.lens import lens  # reslab.lens(model, tokens); the package's other names: `from reslab.lens import ...`
from reslab.models import build_model, list_models, make_config
from reslab.residual import get_scheme, list_schemes

__version__ = "0.1.0"
__all__ = ["ReslabError", "__version__", "build_model", "get_scheme", "lens", "list_models", "list_schemes", "make_config"]
