"""``StableSam``: a frozen SAM, the plugin serving with it, and the device / precision policy."""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .embedding_cache import EmbeddingCache, image_hash
from .modeling.adapter import ImageFeatures, Points, SamAdapter
from .modeling.plugin import StableSamPlugin, attach, route


UNTRAINED_PLUGIN = "init"  # the version of the untrained plugin, a no-op: its masks are plain SAM's


def model_version(base_id: str, plugin_version: str) -> str:
    """The version a prediction carries: the base model and the plugin, ``<base>+plugin-<version>``
    (e.g. ``sam_tiny-3f2a9c1b+plugin-init``)."""
    return f"{base_id}+plugin-{plugin_version}"


@dataclass(frozen=True)
class ImageEmbedding:
    """An encoded image: embedding 1 x C x h x w, the original (H, W), the resized input (h', w')
    and, for SAM 2, its high-resolution maps (1 x C/8 x 4h x 4w, 1 x C/4 x 2h x 2w; SAM 1: none)."""

    embedding: torch.Tensor
    original_size: Tuple[int, int]
    input_size: Tuple[int, int]
    key: str
    high_res: Tuple[torch.Tensor, ...] = ()

    @property
    def features(self) -> ImageFeatures:
        """What the decoder takes: (embedding, *high_res)."""
        return (self.embedding,) + tuple(self.high_res)


class StableSam:
    """SAM (frozen, eval mode, never trained) plus the Stable-SAM plugin attached to its decoder.

    ``adapter`` is SAM behind its family's adapter (SAM 1 or SAM 2); ``sam`` the bare model (its
    parameters and state dict). Shared by every thread of a process: it holds no per-request
    state. ``plugin`` can be swapped (a single attribute assignment) to serve a new version
    without a restart.
    """

    def __init__(self, adapter: SamAdapter, plugin: StableSamPlugin, model_type: str, model_id: str,
                 device: torch.device, plugin_version: str = UNTRAINED_PLUGIN,
                 cache: Optional[EmbeddingCache] = None) -> None:
        self.adapter = adapter
        self.sam = adapter.base.to(device).eval()
        self.sam.requires_grad_(False)
        attach(adapter.mask_decoder, adapter.grid_hw, layer=plugin.config.layer)
        self.plugin = plugin.to(device).eval()
        self.plugin_version = plugin_version
        self.model_type = model_type
        self.model_id = model_id
        self.device = device
        self.cache = cache if cache is not None else EmbeddingCache(max_mb=512)
        self._count_lock = threading.Lock()
        self.encoder_calls = 0

    @property
    def image_size(self) -> int:
        """The encoder's input side S in pixels."""
        return self.adapter.image_size

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
        """H x W x 3 uint8 RGB -> 1 x 3 x S x S normalised (and padded, SAM 1), and the resized (h', w')."""
        return self.adapter.preprocess(image, self.device), self.adapter.input_size(*image.shape[:2])

    @torch.inference_mode()
    def embed(self, image: np.ndarray, content_hash: Optional[str] = None) -> ImageEmbedding:
        """Encode an image, or take its features from the cache (the encoder runs once per image).
        ``content_hash``: the image's ``image_hash`` when the caller has it (not computed again)."""
        key = f"{self.model_id}/{content_hash or image_hash(image)}"
        input_size = self.adapter.input_size(image.shape[0], image.shape[1])

        def compute() -> ImageFeatures:
            x, _ = self.preprocess(image)
            with self.encoder_autocast():
                features = self.adapter.encode(x)
            with self._count_lock:
                self.encoder_calls += 1
            return features

        cached = self.cache.get_or_compute(key, compute)
        if isinstance(cached, torch.Tensor):  # an embedding stored on disk before features were tuples
            cached = (cached,)
        embedding, *high_res = (t.to(self.device, non_blocking=True) for t in cached)
        return ImageEmbedding(embedding, (int(image.shape[0]), int(image.shape[1])), input_size, key, tuple(high_res))

    def decode(self, features: Union[torch.Tensor, Sequence[torch.Tensor]], points: Optional[Points],
               boxes: Optional[torch.Tensor], mask_input: Optional[torch.Tensor], multimask: bool,
               plugin: Optional[StableSamPlugin], own_images: bool = False
               ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Prompt encoder + mask decoder for B prompts, coordinates in the input frame.

        features: an ``ImageEmbedding.features`` (or a bare embedding, SAM 1), batch 1 and shared by
        the B prompts, or with ``own_images`` batch B, row i prompt i's image. points: (B x K x 2,
        B x K); boxes: B x 4; mask_input: B x 1 x 4h x 4w. Returns low-res logits B x M x 4h x 4w,
        predicted IoU B x M and alpha B x 2 (None without a plugin).
        """
        features = (features,) if isinstance(features, torch.Tensor) else tuple(features)
        sparse, dense = self.adapter.embed_prompts(points, boxes, mask_input)
        with route(plugin) as routing:
            low_res, iou = self.adapter.decode(features, sparse, dense, multimask, own_images)
        return low_res, iou, routing.alpha
