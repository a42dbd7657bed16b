"""The deep network of LLMs-from-scratch (Raschka 2024) ch. 4, section 4.4: a stack of Linear + GELU layers with a
shortcut wherever a layer's input and output shapes match. The book prints the mean absolute gradient of every
weight with and without shortcuts to show the vanishing gradient; `reslab reproduce deep-mlp-gradients` does too.
"""

import torch
import torch.nn as nn

from reslab.models.configs import MLPConfig
from reslab.nn.norms import make_norm
from reslab.residual import SiteSpec, get_scheme


class DeepMLP(nn.Module):
    config_class = MLPConfig

    def __init__(self, config: MLPConfig):
        super().__init__()
        self.config = config
        sizes = config.layer_sizes
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Linear(n_in, n_out), nn.GELU(approximate="tanh")) for n_in, n_out in zip(sizes, sizes[1:])
        )
        # The book's shortcut is the bare `x + layer(x)`: scheme `add`, only where shapes match.
        add = get_scheme("add")
        norm = make_norm("layernorm")
        self.shortcuts = nn.ModuleList(
            add(SiteSpec(i, 0, len(self.layers), n_in, norm, sublayers_per_block=1))
            if config.shortcut and n_in == n_out else nn.Identity()
            for i, (n_in, n_out) in enumerate(zip(sizes, sizes[1:]))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer, shortcut in zip(self.layers, self.shortcuts):
            x = layer(x) if isinstance(shortcut, nn.Identity) else shortcut(x, layer)
        return x
