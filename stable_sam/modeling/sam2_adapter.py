"""``Sam2Adapter``: SAM 2.1 (Meta's ``sam2`` package) behind ``SamAdapter``, as an image model.

What ``sam2.SAM2ImagePredictor`` does, on a shared frozen model without per-image state: the
image is resized to S x S (no aspect kept) by SAM 2's own ``SAM2Transforms``; the encoder's
output is the image embedding (with SAM 2's no-memory embedding added) plus two high-resolution
maps that the decoder adds in its upscaling only; a box is two corner points labelled 2 and 3
ahead of the clicks; low-res logits handed back as ``mask_input`` are clamped to +-32. The model
is built from the package's own config (``build_sam2``, hydra) and its checkpoints load through
the package's own loader: the official layout ``{"model": state_dict}``, every key checked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from sam2.build_sam import build_sam2
from sam2.modeling.sam2_base import SAM2Base
from sam2.utils.transforms import SAM2Transforms

from .adapter import ImageFeatures, Points, SamAdapter

# SAM_MODEL_TYPE -> the sam2 package's config of that model
SAM2_CONFIGS: Dict[str, str] = {
    "sam2.1_hiera_tiny": "configs/sam2.1/sam2.1_hiera_t.yaml",
    "sam2.1_hiera_small": "configs/sam2.1/sam2.1_hiera_s.yaml",
    "sam2.1_hiera_base_plus": "configs/sam2.1/sam2.1_hiera_b+.yaml",
    "sam2.1_hiera_large": "configs/sam2.1/sam2.1_hiera_l.yaml",
}
BOX_CORNER_LABELS = (2, 3)  # SAM 2's labels of a box's top-left and bottom-right corner points
FEEDBACK_CLAMP = 32.0  # SAM2ImagePredictor clamps the low-res logits it returns to +-32


def build_sam2_model(model_type: str, checkpoint: Optional[Path]) -> SAM2Base:
    """SAM 2.1 of ``model_type`` from the package's config, on CPU in eval mode; random weights when
    ``checkpoint`` is None. Raises ValueError for an unknown type; the loader's own errors (a file
    that is no checkpoint, missing or unexpected keys, wrong shapes) pass through."""
    if model_type not in SAM2_CONFIGS:
        raise ValueError(f"unknown SAM 2 model type {model_type!r}; expected one of {tuple(SAM2_CONFIGS)}")
    return build_sam2(SAM2_CONFIGS[model_type], str(checkpoint) if checkpoint is not None else None,
                      device="cpu", mode="eval")


class Sam2Adapter(SamAdapter):
    """SAM 2.1: an S x S input, an image embedding and two high-resolution maps per image."""

    family = "sam2"
    feedback_clamp = FEEDBACK_CLAMP

    def __init__(self, model: SAM2Base) -> None:
        super().__init__(model, model.image_encoder, model.sam_prompt_encoder, model.sam_mask_decoder,
                         model.image_size)
        self.transforms = SAM2Transforms(resolution=self.image_size, mask_threshold=self.mask_threshold)

    def feature_shapes(self) -> Sequence[Tuple[int, int, int]]:
        """``SamAdapter.feature_shapes``: the embedding, then the high-resolution maps (4h, 2h)
        when the decoder uses them."""
        (c, h, w), = super().feature_shapes()
        if not self.base.use_high_res_features_in_sam:
            return [(c, h, w)]
        d = self.mask_decoder
        return [(c, h, w), (d.conv_s0.out_channels, 4 * h, 4 * w), (d.conv_s1.out_channels, 2 * h, 2 * w)]

    def input_size(self, h: int, w: int) -> Tuple[int, int]:
        """``SamAdapter.input_size``: SAM 2 resizes every image to S x S (no padding)."""
        return self.image_size, self.image_size

    def preprocess(self, image: np.ndarray, device: torch.device) -> torch.Tensor:
        """``SamAdapter.preprocess``: SAM 2's transforms (resize to S x S, normalise)."""
        return self.transforms(image)[None].to(device)

    def encode(self, x: torch.Tensor) -> ImageFeatures:
        """As ``SAM2ImagePredictor.set_image``: (embedding 1 x 256 x 64 x 64, high-res
        1 x 32 x 256 x 256, 1 x 64 x 128 x 128) at S = 1024."""
        model = self.base
        _, feats, _, sizes = model._prepare_backbone_features(model.forward_image(x))
        if model.directly_add_no_mem_embed:
            feats[-1] = feats[-1] + model.no_mem_embed
        maps = [f.permute(1, 2, 0).reshape(x.shape[0], -1, *hw).contiguous() for f, hw in zip(feats, sizes)]
        return (maps[-1],) + tuple(maps[:-1])

    def points_to_input(self, coords: np.ndarray, original_size: Tuple[int, int],
                        device: torch.device) -> torch.Tensor:
        """``SamAdapter.points_to_input``: normalised by the original size, then scaled to S."""
        t = torch.as_tensor(np.asarray(coords, dtype=np.float32), device=device)
        return self.transforms.transform_coords(t, normalize=True, orig_hw=tuple(original_size))

    def boxes_to_input(self, boxes: np.ndarray, original_size: Tuple[int, int],
                       device: torch.device) -> torch.Tensor:
        """``SamAdapter.boxes_to_input``: both corners as points."""
        t = torch.as_tensor(np.asarray(boxes, dtype=np.float32), device=device)
        return self.transforms.transform_boxes(t, normalize=True, orig_hw=tuple(original_size)).reshape(-1, 4)

    def embed_prompts(self, points: Optional[Points], boxes: Optional[torch.Tensor],
                      masks: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """As ``SAM2ImagePredictor._predict``: a box enters as its two corners, labelled 2 and 3,
        ahead of the prompt's clicks."""
        if boxes is not None:
            corners = boxes.reshape(-1, 2, 2)
            corner_labels = torch.tensor([BOX_CORNER_LABELS], dtype=torch.int64, device=boxes.device)
            corner_labels = corner_labels.expand(len(corners), -1)
            if points is not None:
                points = (torch.cat([corners, points[0]], dim=1),
                          torch.cat([corner_labels, points[1].to(torch.int64)], dim=1))
            else:
                points = (corners, corner_labels)
        return self.prompt_encoder(points=points, boxes=None, masks=masks)

    def decode(self, features: ImageFeatures, sparse: torch.Tensor, dense: torch.Tensor,
               multimask: bool, own_images: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """``SamAdapter.decode``: SAM 2's mask decoder with its high-resolution maps."""
        embedding, *high_res = (f.float() for f in features)
        low, iou, _, _ = self.mask_decoder(
            image_embeddings=embedding, image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=multimask,
            repeat_image=not own_images and sparse.shape[0] > 1, high_res_features=high_res or None)
        return low, iou

    def postprocess(self, low: torch.Tensor, input_size: Tuple[int, int],
                    original_size: Tuple[int, int]) -> torch.Tensor:
        """``SamAdapter.postprocess``: SAM 2's upsampling to the original image."""
        return self.transforms.postprocess_masks(low, tuple(original_size))
