"""Connections across depth (x0 injection, skips, DenseFormer, MUDD, value embeddings, ...): one file each, composed
with a residual scheme by name (see `base.py`)."""
