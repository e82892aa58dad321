"""DSP: the deformable sampling plugin.

A tiny offset network predicts one 2-D offset per location of the decoder's image-side feature
grid; the projected features, and optionally their positional encoding, are re-sampled there.
Everything runs on SAM's token layout (B x H*W x C) with channels-last views for the spatial
ops, so the plugin adds no layout copies to the decoder's hot path.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn


class DeformableSamplingPlugin(nn.Module):
    """Offset network: Conv1x1 (C->C) giving x*, depthwise Conv5x5 + LayerNorm + GELU, Conv1x1 (C->2).

    The 1x1 convolutions are ``nn.Linear`` on tokens (the same operator and parameter count). The
    C->C projection starts as the identity and the last layer at zero, so at initialisation the
    re-sampled features equal the input exactly (offsets 0, amplitude 1).
    """

    def __init__(self, dim: int = 256, offset_range: float = 2.0, resample_pe: bool = True,
                 amplitude: bool = False) -> None:
        super().__init__()
        self.offset_range = float(offset_range)
        self.resample_pe = resample_pe
        self.amplitude = amplitude
        self.proj = nn.Linear(dim, dim)
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=5, padding=2, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.act = nn.GELU()
        self.offset = nn.Linear(dim, 3 if amplitude else 2)
        with torch.no_grad():
            self.proj.weight.copy_(torch.eye(dim))
            self.proj.bias.zero_()
            self.offset.weight.zero_()
            self.offset.bias.zero_()
        self._cells: Dict[Tuple, torch.Tensor] = {}

    def _cell_grid(self, h: int, w: int, like: torch.Tensor) -> torch.Tensor:
        """H x W x 2 (x, y) integer cell coordinates, built once per grid size and device."""
        key = (h, w, like.device, like.dtype)
        if key not in self._cells:  # a benign race: two threads may both build the same grid
            ys, xs = torch.meshgrid(torch.arange(h, device=like.device, dtype=like.dtype),
                                    torch.arange(w, device=like.device, dtype=like.dtype), indexing="ij")
            self._cells[key] = torch.stack([xs, ys], dim=-1)
        return self._cells[key]

    def forward(self, x: torch.Tensor, pe: Optional[torch.Tensor], grid_hw: Tuple[int, int]
                ) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
        """x, pe: B x (H*W) x C tokens. Returns deformed x (B x H*W x C), pe re-sampled at the
        same locations (``pe`` itself when ``resample_pe`` is off) and offsets B x H x W x 2 in
        grid cells (x, y)."""
        b, n, c = x.shape
        h, w = grid_hw
        x_star = self.proj(x)
        spatial = x_star.view(b, h, w, c).permute(0, 3, 1, 2)  # channels-last view, no copy
        feat = self.dwconv(spatial).permute(0, 2, 3, 1)  # B x H x W x C
        raw = self.offset(self.act(self.norm(feat)))  # B x H x W x (2 or 3)
        offsets = torch.tanh(raw[..., :2]) * self.offset_range
        positions = self._cell_grid(h, w, x) + offsets
        corners = bilinear_corners(positions, n)  # one set of corners and weights for x* and pe
        x_def = gather_corners(x_star, *corners)
        if self.amplitude:
            x_def = x_def * (2.0 * torch.sigmoid(raw[..., 2:3])).reshape(b, n, 1)
        pe_def = gather_corners(pe, *corners) if self.resample_pe and pe is not None else pe
        return x_def, pe_def, offsets


def bilinear_sample(tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Bilinear re-sampling of a token grid, with border padding.

    tokens: B x (H*W) x C, row-major grid; positions: B x H x W x 2, (x, y) in cell units (cell
    i at coordinate i). Returns B x (H*W) x C. The same values as ``F.grid_sample`` with
    ``align_corners=True, padding_mode="border"``, but as one weighted gather
    (``embedding_bag``) on the token layout: no NCHW copies, several times faster on CPU.
    Differentiable in ``tokens`` and ``positions``.
    """
    return gather_corners(tokens, *bilinear_corners(positions, tokens.shape[1]))


def bilinear_corners(positions: torch.Tensor, n: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """positions B x H x W x 2 (x, y in cells) on a grid of n = H*W tokens -> the four corner rows
    (B*H*W) x 4 into a (B*n)-row table and their bilinear weights (B*H*W) x 4, border-clamped."""
    b, h, w, _ = positions.shape
    if h < 2 or w < 2:
        raise ValueError(f"bilinear_sample needs a grid of at least 2 x 2 cells, got {h} x {w}")
    # x and y handled together as one trailing pair: few, larger ops (this runs on every click).
    hi = positions.new_tensor([w - 1, h - 1])
    pos = positions.clamp(min=0).minimum(hi)
    p0 = pos.detach().floor().minimum(hi - 1)  # the top-left corner; its neighbours stay in range
    frac = pos - p0
    corner = (p0 * positions.new_tensor([1, w])).sum(-1).long()  # y0 * w + x0
    base = torch.arange(b, device=positions.device).view(b, 1, 1) * n
    idx = (corner + base)[..., None] + torch.tensor([0, 1, w, w + 1], device=positions.device)
    pair = torch.stack([1 - frac, frac], dim=-1)  # B x H x W x (x, y) x (near, far)
    weights = (pair[..., 1, :, None] * pair[..., 0, None, :]).flatten(-2)  # (y0x0, y0x1, y1x0, y1x1)
    return idx.view(-1, 4), weights.view(-1, 4)


def gather_corners(tokens: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """tokens B x n x C -> B x n x C: each output row the weighted sum of its four corner rows."""
    b, n, c = tokens.shape
    out = F.embedding_bag(idx, tokens.reshape(b * n, c), per_sample_weights=weights.to(tokens.dtype), mode="sum")
    return out.view(b, n, c)
