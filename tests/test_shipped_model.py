"""What `make run` serves with no environment: the photo-trained small SAM with its RTS plugin,
and it segments the committed photos (held-out Clothing Co-Parsing photos, never trained on)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from stable_sam.checkpoint import load_plugin
from stable_sam.data.sources import open_dataset
from stable_sam.metrics import mask_iou
from stable_sam.prompts import mask_to_box
from stable_sam.settings import SAM_TINY_CHECKPOINT, SAM_TINY_PLUGIN, ModelSettings

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shipped():
    from stable_sam.builders import build_from_settings

    from stable_sam import builders

    with pytest.MonkeyPatch.context() as mp:  # undo conftest: the shipped defaults, not the tests'
        for name in ("SAM_MODEL_TYPE", "SAM_CHECKPOINT", "PLUGIN_CHECKPOINT", "PLUGIN_VERSION"):
            mp.delenv(name, raising=False)
        mp.setattr(builders, "SAM_TINY_CHECKPOINT", SAM_TINY_CHECKPOINT)
        settings = ModelSettings.from_env()
        yield settings, build_from_settings(settings, device="cpu")


def test_the_default_build_is_the_photo_model_with_its_plugin(shipped):
    settings, model = shipped
    assert settings.sam_checkpoint is None and settings.plugin_path == SAM_TINY_PLUGIN
    plugin = load_plugin(SAM_TINY_PLUGIN, model_type="sam_tiny")
    assert model.version.endswith(f"+plugin-{plugin.version}")
    # the shipped weights, not the synthetic ones the tests' environment serves
    synthetic = ROOT / "checkpoints" / "sam_tiny_synthetic.pt"
    assert SAM_TINY_CHECKPOINT.read_bytes() != synthetic.read_bytes()
    # the plugin was trained on these very weights
    assert plugin.base_model["model_id"] == model.version.split("+")[0]


def test_the_shipped_model_segments_held_out_photos_from_their_boxes(shipped):
    from stable_sam.predictor import StableSamPredictor

    _, model = shipped
    predictor = StableSamPredictor(model)
    ious = []
    for sample in open_dataset(ROOT / "examples" / "photos"):
        predictor.set_image(sample.image)
        out = predictor.predict(box=np.stack([mask_to_box(m) for m in sample.masks]))
        ious += [float(mask_iou(p, g)) for p, g in zip(out.masks, sample.masks)]
    # The synthetic small SAM scores about 0.37 on such photos; the photo-trained one well above
    # (docs/small-sam.md has the held-out figures). A bound far from both, so it says which serves.
    assert np.mean(ious) > 0.5, np.round(ious, 2)
