"""``SamAdapter``: what differs between SAM families, in one place.

``StableSam``, the predictor, RTS and the benchmarks reach SAM only through an adapter, one per
family: ``Sam1Adapter`` (``segment_anything``: the small SAM, ViT-B/L/H) and ``Sam2Adapter``
(Meta's ``sam2``: SAM 2.1 Hiera). Each wraps the family's own modules and transforms; nothing of
SAM is copied. What an adapter answers:

- the input frame: how an H x W image is resized for the encoder, and points and boxes with it;
- the image features: SAM 1 has one embedding (1 x C x h x w); SAM 2 adds two high-resolution
  maps that enter only the decoder's upscaling (``ImageFeatures``, cached together);
- the prompt encoding and the decoder call (SAM 2 takes a box as two labelled corner points and
  its decoder the high-resolution maps), and the logits back at the original image size.

Both decoders keep SAM's two-way transformer, so the plugin hooks the same attention of either
(``mask_decoder.transformer.layers[i].cross_attn_token_to_image``, see ``plugin.attach``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

# An image's features as an adapter encodes them: (embedding 1 x C x h x w, *high-resolution maps).
ImageFeatures = Tuple[torch.Tensor, ...]
Points = Tuple[torch.Tensor, torch.Tensor]  # coordinates B x K x 2 (input frame), labels B x K


class SamAdapter(ABC):
    """One SAM family behind one interface. ``base`` is the frozen model (its parameters, state
    dict and device); the three sub-modules are the family's own."""

    family: str = ""  # "sam" or "sam2"
    mask_threshold: float = 0.0
    feedback_clamp: Optional[float] = None  # low-res logits handed back as mask_input are clamped to +-this

    def __init__(self, base: nn.Module, image_encoder: nn.Module, prompt_encoder: nn.Module,
                 mask_decoder: nn.Module, image_size: int) -> None:
        self.base = base
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.image_size = int(image_size)

    @property
    def grid_hw(self) -> Tuple[int, int]:
        """The image embedding's grid (h, w): 64 x 64 for every 1024-px SAM."""
        h, w = self.prompt_encoder.image_embedding_size
        return int(h), int(w)

    @property
    def low_res_side(self) -> int:
        """Side of the decoder's low-res logits and of a ``mask_input``: 4 x the grid."""
        return 4 * self.grid_hw[0]

    def feature_shapes(self) -> Sequence[Tuple[int, int, int]]:
        """C x h x w of each map ``encode`` returns (for random features in benchmarks)."""
        return [(self.prompt_encoder.embed_dim, *self.grid_hw)]

    @abstractmethod
    def input_size(self, h: int, w: int) -> Tuple[int, int]:
        """The (h', w') an H x W image has in the encoder's S x S input (the rest is padding)."""

    @abstractmethod
    def preprocess(self, image: np.ndarray, device: torch.device) -> torch.Tensor:
        """H x W x 3 uint8 RGB -> 1 x 3 x S x S float, resized and normalised as the family does."""

    @abstractmethod
    def encode(self, x: torch.Tensor) -> ImageFeatures:
        """1 x 3 x S x S -> the image's features (embedding first), each 1 x C_i x h_i x w_i."""

    @abstractmethod
    def points_to_input(self, coords: np.ndarray, original_size: Tuple[int, int],
                        device: torch.device) -> torch.Tensor:
        """... x 2 pixel (x, y) of an H x W image -> the same shape in the input frame, float32."""

    def boxes_to_input(self, boxes: np.ndarray, original_size: Tuple[int, int],
                       device: torch.device) -> torch.Tensor:
        """N x 4 XYXY pixels -> N x 4 in the input frame (both corners moved as points)."""
        return self.points_to_input(np.asarray(boxes).reshape(-1, 2, 2), original_size, device).reshape(-1, 4)

    @abstractmethod
    def embed_prompts(self, points: Optional[Points], boxes: Optional[torch.Tensor],
                      masks: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """B prompts (input frame; masks B x 1 x 4h x 4w logits) -> sparse B x T x C and dense
        B x C x h x w prompt embeddings."""

    @abstractmethod
    def decode(self, features: ImageFeatures, sparse: torch.Tensor, dense: torch.Tensor,
               multimask: bool, own_images: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """The mask decoder on B prompts. ``features`` of one image (batch 1 each) shared by all B,
        or with ``own_images`` B images, row i prompt i's. Returns low-res logits B x M x 4h x 4w
        and predicted IoU B x M (M = 3 with ``multimask``, else 1)."""

    @abstractmethod
    def postprocess(self, low: torch.Tensor, input_size: Tuple[int, int],
                    original_size: Tuple[int, int]) -> torch.Tensor:
        """Low-res logits B x M x 4h x 4w -> logits B x M x H x W at the original image size."""
