"""``StableSam``: a frozen SAM, the plugin serving with it, and the device / precision policy."""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide

from .embedding_cache import EmbeddingCache, image_hash
from .modeling.plugin import StableSamPlugin, attach, route


UNTRAINED_PLUGIN = "init"  # the version of the untrained plugin, a no-op: its masks are plain SAM's


def model_version(base_id: str, plugin_version: str) -> str:
    """The version a prediction carries: the base model and the plugin, ``<base>+plugin-<version>``
    (e.g. ``sam_tiny-3f2a9c1b+plugin-init``)."""
    return f"{base_id}+plugin-{plugin_version}"


class ResizeAtLeastOnePixel(ResizeLongestSide):
    """SAM's resize (longest side to the encoder's input) with every side at least one pixel: SAM's
    own rounds the short side of a 20000 x 1 image to 0 and the resize fails. Otherwise the same."""

    @staticmethod
    def get_preprocess_shape(oldh: int, oldw: int, long_side_length: int) -> Tuple[int, int]:
        newh, neww = ResizeLongestSide.get_preprocess_shape(oldh, oldw, long_side_length)
        return max(newh, 1), max(neww, 1)


@dataclass(frozen=True)
class ImageEmbedding:
    """An encoded image: embedding 1 x C x h x w, the original (H, W) and the resized input (h', w')."""

    embedding: torch.Tensor
    original_size: Tuple[int, int]
    input_size: Tuple[int, int]
    key: str


class StableSam:
    """SAM (frozen, eval mode, never trained) plus the Stable-SAM plugin attached to its decoder.

    Shared by every thread of a process: it holds no per-request state. ``plugin`` can be swapped
    (a single attribute assignment) to serve a new version without a restart.
    """

    def __init__(self, sam: Sam, plugin: StableSamPlugin, model_type: str, model_id: str,
                 device: torch.device, plugin_version: str = UNTRAINED_PLUGIN,
                 cache: Optional[EmbeddingCache] = None) -> None:
        self.sam = attach(sam.to(device).eval(), layer=plugin.config.layer)
        self.sam.requires_grad_(False)
        self.plugin = plugin.to(device).eval()
        self.plugin_version = plugin_version
        self.model_type = model_type
        self.model_id = model_id
        self.device = device
        self.cache = cache if cache is not None else EmbeddingCache(max_mb=512)
        self.transform = ResizeAtLeastOnePixel(sam.image_encoder.img_size)
        self._count_lock = threading.Lock()
        self.encoder_calls = 0

    @property
    def image_size(self) -> int:
        return self.sam.image_encoder.img_size

    @property
    def version(self) -> str:
        """Base model and plugin version (``model_version``)."""
        return model_version(self.model_id, self.plugin_version)

    def set_plugin(self, plugin: StableSamPlugin, version: str) -> None:
        """Serve ``plugin`` as the model's own from now on (a new version, without a restart). To run
        another plugin for some calls only, give it to a ``StableSamPredictor(model, plugin=...)``."""
        if plugin.config.layer != self.plugin.config.layer:
            raise ValueError("a plugin for another decoder layer needs a new StableSam")
        self.plugin = plugin.to(self.device).eval()  # readers take self.plugin once per call
        self.plugin_version = version

    def encoder_autocast(self):
        """bf16 (or fp16) autocast for the image encoder on CUDA; nothing on CPU, where it is slower."""
        if self.device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            return torch.autocast("cuda", dtype=dtype)
        return contextlib.nullcontext()

    def preprocess(self, image: np.ndarray) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """H x W x 3 uint8 RGB -> 1 x 3 x S x S normalised and padded, and the resized (h', w')."""
        resized = self.transform.apply_image(image)
        x = torch.as_tensor(resized, device=self.device).permute(2, 0, 1).contiguous()[None]
        return self.sam.preprocess(x.float()), tuple(resized.shape[:2])

    @torch.inference_mode()
    def embed(self, image: np.ndarray, content_hash: Optional[str] = None) -> ImageEmbedding:
        """Encode an image, or take its embedding from the cache (the encoder runs once per image).
        ``content_hash``: the image's ``image_hash`` when the caller has it (not computed again)."""
        key = f"{self.model_id}/{content_hash or image_hash(image)}"
        input_size = tuple(self.transform.get_preprocess_shape(image.shape[0], image.shape[1], self.image_size))

        def compute() -> torch.Tensor:
            x, _ = self.preprocess(image)
            with self.encoder_autocast():
                emb = self.sam.image_encoder(x)
            with self._count_lock:
                self.encoder_calls += 1
            return emb

        emb = self.cache.get_or_compute(key, compute).to(self.device, non_blocking=True)
        return ImageEmbedding(emb, (int(image.shape[0]), int(image.shape[1])), input_size, key)

    def decode(self, embedding: torch.Tensor, points: Optional[Tuple[torch.Tensor, torch.Tensor]],
               boxes: Optional[torch.Tensor], mask_input: Optional[torch.Tensor], multimask: bool,
               plugin: Optional[StableSamPlugin]) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Prompt encoder + mask decoder for B prompts on one image, coordinates in the resized frame.

        points: (B x K x 2, B x K); boxes: B x 4; mask_input: B x 1 x 4h x 4w. Returns low-res
        logits B x M x 4h x 4w, predicted IoU B x M and alpha B x 2 (None without a plugin).
        """
        sparse, dense = self.sam.prompt_encoder(points=points, boxes=boxes, masks=mask_input)
        with route(plugin) as routing:
            low_res, iou = self.sam.mask_decoder(
                image_embeddings=embedding.float(),
                image_pe=self.sam.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask,
            )
        return low_res, iou, routing.alpha
