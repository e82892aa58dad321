"""DRP: the dynamic routing plugin, a prompt-quality gate between deformed and regular features."""

from __future__ import annotations

import torch
from torch import nn


class DynamicRoutingPlugin(nn.Module):
    """Token (B x C) -> alpha (B x 2): weights of the deformed and of the regular features.

    MLP with LayerNorm and GELU, then a linear layer. The last layer's weights start at zero and
    its bias at (-gap/2, +gap/2), so every prompt starts with the same alpha, and alpha_1 +
    alpha_2 = 1 both for ``softmax`` and for two ``sigmoid`` gates.
    """

    def __init__(self, dim: int = 256, hidden: int = 32, activation: str = "softmax",
                 init_gap: float = 2.0) -> None:
        super().__init__()
        if activation not in ("softmax", "sigmoid"):
            raise ValueError(f"router activation must be 'softmax' or 'sigmoid', got {activation!r}")
        self.activation = activation
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.LayerNorm(hidden), nn.GELU())
        self.out = nn.Linear(hidden, 2)
        with torch.no_grad():
            self.out.weight.zero_()
            self.out.bias.copy_(torch.tensor([-init_gap / 2, init_gap / 2]))

    def forward(self, token: torch.Tensor) -> torch.Tensor:
        """B x C prompt token -> alpha B x 2: the weights of the deformed and the regular features."""
        logits = self.out(self.mlp(token))
        if self.activation == "softmax":
            return torch.softmax(logits, dim=-1)
        return torch.sigmoid(logits)
