"""Automatic masks for images without prompts: ``segment_anything``'s ``SamAutomaticMaskGenerator``
(a grid of single-point prompts, predicted-IoU and stability-score filtering, box NMS) run through
Stable-SAM; on SAM 2, ``sam2``'s ``SAM2AutomaticMaskGenerator`` (the same steps).

The generator is the family's own; only its predictor is swapped for one that takes the image
features from ``StableSam.embed`` (the model's embedding cache: an image already encoded for box
prompts is not encoded again) and runs every decoder call with the plugin routed in.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional

import numpy as np
from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator
from sam2.sam2_image_predictor import SAM2ImagePredictor
from segment_anything import SamAutomaticMaskGenerator, SamPredictor

from ..model import StableSam
from ..modeling.plugin import StableSamPlugin, route


# SAM's filter thresholds (0.88 predicted IoU, 0.95 stability) suit SAM ViT-B/L/H. The small SAM
# scores its masks of clear objects lower (predicted IoU 0.85-0.94, stability 0.93-0.96 on the
# drawn test scenes: SAM's thresholds keep none of them), so it has its own.
# SAM 2.1 gets its own generator's defaults (0.8 predicted IoU, 0.95 stability).
MODEL_THRESHOLDS = {"sam_tiny": {"pred_iou_thresh": 0.8, "stability_score_thresh": 0.9},
                    **{f"sam2.1_hiera_{n}": {"pred_iou_thresh": 0.8, "stability_score_thresh": 0.95}
                       for n in ("tiny", "small", "base_plus", "large")}}


@dataclass(frozen=True)
class AutoConfig:
    """SAM's automatic-mask knobs (its defaults, but a 16 x 16 grid: 256 prompts instead of 1024,
    which keeps a CPU run at seconds per image). ``for_model`` picks the thresholds for a model type."""

    points_per_side: int = 16
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    box_nms_thresh: float = 0.7

    def __post_init__(self) -> None:
        if self.points_per_side < 1 or self.points_per_batch < 1:
            raise ValueError("points_per_side and points_per_batch must be >= 1")
        for name in ("pred_iou_thresh", "stability_score_thresh", "box_nms_thresh"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in 0..1, got {getattr(self, name)}")

    def to_json(self) -> dict:
        """The settings as a JSON object (a job's run key, its summary)."""
        return asdict(self)

    @classmethod
    def for_model(cls, model_type: str, **overrides) -> "AutoConfig":
        """The defaults for ``model_type`` with ``overrides`` (None values ignored) on top."""
        values = dict(MODEL_THRESHOLDS.get(model_type, {}))
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


@dataclass
class AutoMask:
    """One automatic mask: H x W bool, the grid point that made it (x, y), SAM's predicted IoU and
    stability score."""

    mask: np.ndarray
    point: List[float]
    predicted_iou: float
    stability: float


class _StableSamGridPredictor(SamPredictor):
    """``SamPredictor`` as the generator uses it (``set_image``, ``predict_torch``), backed by a
    ``StableSam``: the embedding comes from its cache and the decoder runs with ``plugin``."""

    def __init__(self, model: StableSam, plugin: Optional[StableSamPlugin]) -> None:
        super().__init__(model.sam)
        self.stable_sam, self.plugin = model, plugin

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        if image_format != "RGB":
            image = image[..., ::-1]
        emb = self.stable_sam.embed(np.ascontiguousarray(image))
        self.reset_image()
        # The decoder runs in fp32 (on CUDA the encoder output may be bf16).
        self.features = emb.embedding.float()
        self.original_size, self.input_size = emb.original_size, emb.input_size
        self.is_image_set = True

    def predict_torch(self, *args, **kwargs):
        with route(self.plugin):
            return super().predict_torch(*args, **kwargs)


class _StableSam2GridPredictor(SAM2ImagePredictor):
    """``SAM2ImagePredictor`` as ``SAM2AutomaticMaskGenerator`` uses it (``set_image``, ``_predict``),
    backed by a ``StableSam`` of SAM 2: features from its cache, the decoder run with ``plugin``."""

    def __init__(self, model: StableSam, plugin: Optional[StableSamPlugin]) -> None:
        super().__init__(model.sam)
        self.stable_sam, self.plugin = model, plugin

    def set_image(self, image: np.ndarray) -> None:
        emb = self.stable_sam.embed(np.ascontiguousarray(image))
        self.reset_predictor()
        # The decoder runs in fp32 (on CUDA the encoder output may be bf16).
        self._features = {"image_embed": emb.embedding.float(), "high_res_feats": [f.float() for f in emb.high_res]}
        self._orig_hw = [emb.original_size]
        self._is_image_set = True

    def _predict(self, *args, **kwargs):
        with route(self.plugin):
            return super()._predict(*args, **kwargs)


def _sam1_generator(model: StableSam, plugin: Optional[StableSamPlugin], kwargs: Dict[str, Any]):
    generator = SamAutomaticMaskGenerator(model.sam, **kwargs)
    generator.predictor = _StableSamGridPredictor(model, plugin)
    return generator


def _sam2_generator(model: StableSam, plugin: Optional[StableSamPlugin], kwargs: Dict[str, Any]):
    generator = SAM2AutomaticMaskGenerator(model.sam, **kwargs)
    generator.predictor = _StableSam2GridPredictor(model, plugin)
    return generator


_GENERATORS: Dict[str, Callable[..., Any]] = {"sam": _sam1_generator, "sam2": _sam2_generator}  # by adapter family


def automatic_masks(model: StableSam, image: np.ndarray, config: AutoConfig = AutoConfig(),
                    plugin: Optional[StableSamPlugin] = None) -> List[AutoMask]:
    """Every object SAM finds in an H x W x 3 uint8 image, in the generator's order (deterministic:
    NMS keeps the higher predicted IoU first). ``plugin``: None runs the model's own. An image
    encoded before (e.g. by a read-ahead stage) is taken from the embedding cache."""
    kwargs = dict(points_per_side=config.points_per_side, points_per_batch=config.points_per_batch,
                  pred_iou_thresh=config.pred_iou_thresh, stability_score_thresh=config.stability_score_thresh,
                  box_nms_thresh=config.box_nms_thresh, output_mode="binary_mask")
    generator = _GENERATORS[model.adapter.family](model, plugin if plugin is not None else model.plugin, kwargs)
    return [AutoMask(np.asarray(r["segmentation"], dtype=bool), [float(v) for v in r["point_coords"][0]],
                     float(r["predicted_iou"]), float(r["stability_score"])) for r in generator.generate(image)]
