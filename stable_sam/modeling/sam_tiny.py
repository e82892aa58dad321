"""The project's small SAM: ``segment_anything``'s own modules with a small image encoder.

Only the image encoder is shrunk: 256-px input, patch 8 (a 32 x 32 embedding grid, so the mask
decoder's low-res logits are 128 x 128), ViT embed 128, depth 4, attention in 16 x 16-token windows.
The prompt encoder and the mask decoder are the standard 256-wide SAM ones, so the Stable-SAM
plugin runs the exact code it runs on ViT-B/L/H. Trained from scratch on synthetic scenes by
``scripts/train_small_sam.py`` (first at patch 16, then refined to patch 8); the checkpoint ships
in ``checkpoints/``.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Optional, Union

import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

SAM_TINY_IMAGE_SIZE = 256
SAM_TINY_PATCH_SIZE = 8
PROMPT_EMBED_DIM = 256


def build_sam_tiny(checkpoint: Optional[Union[str, Path]] = None, patch_size: int = SAM_TINY_PATCH_SIZE) -> Sam:
    """Assemble the small SAM; load ``checkpoint`` (a state dict, fp16 or fp32) when given.
    A coarser ``patch_size`` than the committed model's is for the cheaper first stage of training."""
    grid = SAM_TINY_IMAGE_SIZE // patch_size
    sam = Sam(
        image_encoder=ImageEncoderViT(
            img_size=SAM_TINY_IMAGE_SIZE,
            patch_size=patch_size,
            embed_dim=128,
            depth=4,
            num_heads=4,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            qkv_bias=True,
            use_rel_pos=True,
            # No global layers: at 1024 tokens they tripled the encoder's training cost. A 16-token
            # window is 128 px here, and the whole image at the coarse first stage's patch 16.
            global_attn_indexes=(),
            window_size=16,
            out_chans=PROMPT_EMBED_DIM,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=PROMPT_EMBED_DIM,
            image_embedding_size=(grid, grid),
            input_image_size=(SAM_TINY_IMAGE_SIZE, SAM_TINY_IMAGE_SIZE),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=PROMPT_EMBED_DIM, mlp_dim=2048, num_heads=8),
            transformer_dim=PROMPT_EMBED_DIM,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    sam.eval()
    if checkpoint is not None:
        state = torch.load(Path(checkpoint), map_location="cpu", weights_only=True)
        sam.load_state_dict({k: v.float() for k, v in state.items()})
    return sam
