"""Stable-SAM: Segment Anything (frozen) with the Stable-SAM plugin (DSP + DRP) in its mask decoder.

The public API, as ``segment_anything`` exports its builders and predictor::

    from stable_sam import build, StableSamPredictor

    model = build("sam_tiny", plugin_checkpoint="checkpoints/plugin_sam_tiny_rts.pt")  # the small SAM, its plugin
    predictor = StableSamPredictor(model)
    predictor.set_image(image)                            # H x W x 3 uint8, RGB
    prediction = predictor.predict(box=[x0, y0, x1, y1])  # .masks: 1 x H x W bool

- builders: ``build`` (a model type, weights, plugin, device), ``build_from_settings`` (the
  environment, as the backend serves), ``build_sam`` (the bare SAM behind its adapter),
  ``MODEL_TYPES`` (the registry's names);
- the model and predictor: ``StableSam``, ``ImageEmbedding``, ``StableSamPredictor``,
  ``Prediction``, ``ObjectMask``, ``ObjectPrompt``, ``PromptError``;
- the plugin: ``PluginConfig``, ``StableSamPlugin``, ``load_plugin``, ``save_plugin``,
  ``PluginCheckpoint``;
- datasets: ``open_dataset`` (a folder, COCO JSON, a Label Studio export or ``synthetic:<split>``),
  ``SegmentationDataset``, ``Sample``;
- training the plugin: ``RTSConfig``, ``train_plugin``, ``finetune``;
- masks out: ``clean_mask``, ``mask_polygons``, ``PolygonOptions``.

Names are imported on first use (PEP 562), so ``import stable_sam.settings`` stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "MODEL_TYPES": "builders", "build": "builders", "build_from_settings": "builders", "build_sam": "builders",
    "ImageEmbedding": "model", "StableSam": "model",
    "ObjectMask": "predictor", "Prediction": "predictor", "PromptError": "predictor", "StableSamPredictor": "predictor",
    "ObjectPrompt": "prompts",
    "PluginConfig": "modeling.plugin", "StableSamPlugin": "modeling.plugin",
    "PluginCheckpoint": "checkpoint", "load_plugin": "checkpoint", "save_plugin": "checkpoint",
    "open_dataset": "data.sources", "Sample": "data.dataset", "SegmentationDataset": "data.dataset",
    "RTSConfig": "rts", "finetune": "rts", "train_plugin": "rts",
    "PolygonOptions": "masks", "clean_mask": "masks", "mask_polygons": "masks",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # what the names are, for readers and type checkers
    from .builders import MODEL_TYPES, build, build_from_settings, build_sam
    from .checkpoint import PluginCheckpoint, load_plugin, save_plugin
    from .data.dataset import Sample, SegmentationDataset
    from .data.sources import open_dataset
    from .masks import PolygonOptions, clean_mask, mask_polygons
    from .model import ImageEmbedding, StableSam
    from .modeling.plugin import PluginConfig, StableSamPlugin
    from .predictor import ObjectMask, Prediction, PromptError, StableSamPredictor
    from .prompts import ObjectPrompt
    from .rts import RTSConfig, finetune, train_plugin


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'stable_sam' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
