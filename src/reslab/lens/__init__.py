"""What the residual stream carries, layer by layer: the logit lens and the decomposition of the final stream.

    result = reslab.lens(model, tokens)        # LensResult: loss, entropy, top-1 agreement, KL by layer
    result.decomposition                        # Decomposition (additive schemes) or None, with result.refused

The lens attaches at the residual sites (hooks on the site modules and the site's probe slot) for one forward pass;
models are never edited. Any other module (a Hugging Face model, a callable's) is read where its traced graph puts
the stream between blocks, the final norm and the head (`lens/traced.py`). See docs/lens.md.
"""

import sys
import types

from reslab.lens.decompose import Decomposition, decompose, refusal
from reslab.lens.logit_lens import METRICS, LensResult, lens

__all__ = ["METRICS", "Decomposition", "LensResult", "decompose", "lens", "refusal"]


class _CallablePackage(types.ModuleType):
    """`reslab.lens` is the function `lens` when reached through `reslab`'s lazy names, and this package once
    `reslab.lens.<module>` has been imported (the import system sets the attribute); calling either runs the lens."""

    def __call__(self, *args, **kwargs) -> LensResult:
        return lens(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
