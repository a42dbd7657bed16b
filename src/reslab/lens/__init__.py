"""What the residual stream carries, layer by layer: the logit lens and the decomposition of the final stream.

    result = reslab.lens(model, tokens)        # LensResult: loss, entropy, top-1 agreement, KL by layer
    result.decomposition                        # Decomposition (additive schemes) or None, with result.refused

The lens attaches at the residual sites (hooks on the site modules and the site's probe slot) for one forward pass;
models are never edited. See docs/lens.md.
"""

from reslab.lens.decompose import Decomposition, decompose, refusal
from reslab.lens.logit_lens import METRICS, LensResult, lens

__all__ = ["METRICS", "Decomposition", "LensResult", "decompose", "lens", "refusal"]
