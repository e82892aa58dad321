"""SAM's mask decoder over prompts of several images in one call."""

from __future__ import annotations

from typing import Tuple

import torch
from segment_anything.modeling import MaskDecoder


def decode_on_own_images(decoder: MaskDecoder, embeddings: torch.Tensor, image_pe: torch.Tensor,
                         sparse: torch.Tensor, dense: torch.Tensor, multimask: bool
                         ) -> Tuple[torch.Tensor, torch.Tensor]:
    """B prompts, each on its own image: embeddings B x C x h x w (row i is prompt i's image),
    image_pe 1 x C x h x w, sparse B x T x C, dense B x C x h x w. Returns SAM's low-res logits
    B x M x 4h x 4w and predicted IoU B x M (M = 3 with ``multimask``, else 1).

    SAM's decoder repeats its one image embedding per prompt and only ever uses that sum with the
    dense prompt embedding; a zero image embedding plus (dense + own embedding) is the same sum,
    so one call serves many images (and gradients reach every embedding)."""
    return decoder(image_embeddings=embeddings.new_zeros((1,) + tuple(embeddings.shape[1:])),
                   image_pe=image_pe, sparse_prompt_embeddings=sparse,
                   dense_prompt_embeddings=dense + embeddings, multimask_output=multimask)


def decode_all_on_own_images(decoder: MaskDecoder, embeddings: torch.Tensor, image_pe: torch.Tensor,
                             sparse: torch.Tensor, dense: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """As ``decode_on_own_images``, but all four of SAM's outputs: logits B x 4 x 4h x 4w and IoU
    B x 4, the single-mask output first, then the three multimask ones (what SAM computes either
    way before it slices)."""
    return decoder.predict_masks(image_embeddings=embeddings.new_zeros((1,) + tuple(embeddings.shape[1:])),
                                 image_pe=image_pe, sparse_prompt_embeddings=sparse,
                                 dense_prompt_embeddings=dense + embeddings)
