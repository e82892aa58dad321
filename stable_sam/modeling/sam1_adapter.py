"""``Sam1Adapter``: ``segment_anything``'s SAM (the small SAM, ViT-B/L/H) behind ``SamAdapter``."""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide

from .adapter import ImageFeatures, Points, SamAdapter
from .batched_decode import decode_on_own_images


class ResizeAtLeastOnePixel(ResizeLongestSide):
    """SAM's resize (longest side to the encoder's input) with every side at least one pixel: SAM's
    own rounds the short side of a 20000 x 1 image to 0 and the resize fails. Otherwise the same."""

    @staticmethod
    def get_preprocess_shape(oldh: int, oldw: int, long_side_length: int) -> Tuple[int, int]:
        """SAM's resized (h, w) for an ``oldh`` x ``oldw`` image, each side at least 1."""
        newh, neww = ResizeLongestSide.get_preprocess_shape(oldh, oldw, long_side_length)
        return max(newh, 1), max(neww, 1)


class Sam1Adapter(SamAdapter):
    """SAM 1: longest side resized to S and zero-padded to S x S; one image embedding."""

    family = "sam"

    def __init__(self, sam: Sam) -> None:
        super().__init__(sam, sam.image_encoder, sam.prompt_encoder, sam.mask_decoder, sam.image_encoder.img_size)
        self.mask_threshold = float(sam.mask_threshold)
        self.transform = ResizeAtLeastOnePixel(self.image_size)

    def input_size(self, h: int, w: int) -> Tuple[int, int]:
        """``SamAdapter.input_size``: the image resized to longest side S (the rest of S x S is padding)."""
        return tuple(self.transform.get_preprocess_shape(h, w, self.image_size))

    def preprocess(self, image: np.ndarray, device: torch.device) -> torch.Tensor:
        """``SamAdapter.preprocess``: longest side to S, SAM's normalisation, zero padding to S x S."""
        resized = self.transform.apply_image(image)
        x = torch.as_tensor(resized, device=device).permute(2, 0, 1).contiguous()[None]
        return self.base.preprocess(x.float())

    def encode(self, x: torch.Tensor) -> ImageFeatures:
        """``SamAdapter.encode``: one image embedding, 1 x C x h x w."""
        return (self.image_encoder(x),)

    def points_to_input(self, coords: np.ndarray, original_size: Tuple[int, int],
                        device: torch.device) -> torch.Tensor:
        """``SamAdapter.points_to_input``: scaled as the image was resized."""
        return torch.as_tensor(self.transform.apply_coords(np.asarray(coords, dtype=np.float64), original_size),
                               dtype=torch.float32, device=device)

    def embed_prompts(self, points: Optional[Points], boxes: Optional[torch.Tensor],
                      masks: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """``SamAdapter.embed_prompts``: SAM's prompt encoder."""
        return self.prompt_encoder(points=points, boxes=boxes, masks=masks)

    def decode(self, features: ImageFeatures, sparse: torch.Tensor, dense: torch.Tensor,
               multimask: bool, own_images: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """``SamAdapter.decode``: SAM's mask decoder (the plugin, when attached, runs inside it)."""
        pe = self.prompt_encoder.get_dense_pe()
        if own_images:
            return decode_on_own_images(self.mask_decoder, features[0].float(), pe, sparse, dense, multimask)
        return self.mask_decoder(image_embeddings=features[0].float(), image_pe=pe, sparse_prompt_embeddings=sparse,
                                 dense_prompt_embeddings=dense, multimask_output=multimask)

    def postprocess(self, low: torch.Tensor, input_size: Tuple[int, int],
                    original_size: Tuple[int, int]) -> torch.Tensor:
        """``SamAdapter.postprocess``: padding cropped, then resized to the original image."""
        return self.base.postprocess_masks(low, input_size, original_size)
