"""Residual diagnostics: gradient norms per parameter, and stream RMS, update ratio and drift recorded at the
residual sites where each sublayer meets the stream. Computed on log steps only."""

from reslab.probe.grads import GradientNorms, gradient_norms
from reslab.probe.stream import StreamProbe

__all__ = ["GradientNorms", "StreamProbe", "gradient_norms"]
