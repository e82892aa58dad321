"""The project's small SAM: ``segment_anything``'s own modules with a small image encoder.

Only the image encoder is shrunk: 256-px input, patch 8 (a 32 x 32 embedding grid, so the mask
decoder's low-res logits are 128 x 128), ViT embed 128, depth 4, attention in 16 x 16-token windows.
The prompt encoder and the mask decoder are the standard 256-wide SAM ones, so the Stable-SAM
plugin runs the exact code it runs on ViT-B/L/H. Trained from scratch on synthetic scenes by
``training/train_small_sam.py`` (first at patch 16, then refined to patch 8); the checkpoint ships
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


def build_sam_tiny(checkpoint: Optional[Union[str, Path]] = None, patch_size: Optional[int] = None,
                   image_size: Optional[int] = None) -> Sam:
    """Assemble the small SAM; load ``checkpoint`` (a state dict, fp16 or fp32) when given.
    ``patch_size`` and ``image_size`` default to the checkpoint's own (read from its patch kernel
    and position table), else to 8 and 256. A coarser patch is for the cheaper first stage of
    training; another input size is for training at that size (``pretrain.refine_patch_grid``
    adapts the weights)."""
    state = None
    if checkpoint is not None:
        state = torch.load(Path(checkpoint), map_location="cpu", weights_only=True)
        saved_patch = state["image_encoder.patch_embed.proj.weight"].shape[-1]
        patch_size = patch_size or saved_patch
        image_size = image_size or state["image_encoder.pos_embed"].shape[1] * saved_patch
    patch_size = patch_size or SAM_TINY_PATCH_SIZE
    image_size = image_size or SAM_TINY_IMAGE_SIZE
    grid = image_size // patch_size
    sam = Sam(
        image_encoder=ImageEncoderViT(
            img_size=image_size,
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
            input_image_size=(image_size, image_size),
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
    if state is not None:
        sam.load_state_dict({k: v.float() for k, v in state.items()})
    return sam
