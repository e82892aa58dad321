"""SAM 2.1 through the real paths, without downloadable weights.

Hiera-tiny is built once per test run from the ``sam2`` package's own config with random (seeded)
weights, saved in the official checkpoint layout (``{"model": state_dict}``) under the official
file name in a MODEL_DIR, and loaded back by ``build`` through the package's loader. Masks of
random weights mean nothing, so these tests check the paths: the plugin's exact no-op and its
gradients, the router's token, an RTS step, /predict through the app and pre-annotation giving
what the bare predictor gives. Two images are encoded in all (the cache serves every reuse).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from backend.app import create_app
from backend.ml_backend import StableSamBackend
from backend.testing.label_studio_regions import predict_payload, predict_regions
from backend.server_settings import BackendSettings
from backend_helpers import RECOMMENDED_CONFIG, centroid, drawn_scene, iou, keypoint, loosen, rectangle, result_mask
from stable_sam import download
from stable_sam.timing import InMemoryDataset, live_plugin
from stable_sam.builders import build, build_sam, model_identity
from stable_sam.checkpoint import load_plugin
from stable_sam.data.dataset import Sample
from stable_sam.download import CheckpointError
from stable_sam.embedding_cache import EmbeddingCache, features_nbytes
from stable_sam.model import StableSam
from stable_sam.modeling.plugin import StableSamPlugin
from stable_sam.predictor import StableSamPredictor
from stable_sam.preannotation import AutoConfig, automatic_masks, items_from_coco, run_offline
from stable_sam.prompts import mask_to_box
from stable_sam.rts import RTSConfig, decode_prompts, finetune
from test_preannotate import write_coco_input
from test_rts import one_thread  # noqa: F401 - its autouse fixture: one torch thread in this module, restored after

ROOT = Path(__file__).resolve().parents[1]
TYPE = "sam2.1_hiera_tiny"
OFFICIAL = download.OFFICIAL_CHECKPOINTS[TYPE]


@pytest.fixture(scope="session")
def sam2_dir(tmp_path_factory) -> Path:
    """A MODEL_DIR holding ``sam2.1_hiera_tiny.pt``: seeded random weights in the official layout."""
    torch.manual_seed(0)
    adapter = build_sam(TYPE, None)
    folder = tmp_path_factory.mktemp("sam2-models")
    torch.save({"model": adapter.base.state_dict()}, folder / OFFICIAL.filename)
    return folder


@pytest.fixture(scope="session")
def sam2_model(sam2_dir) -> StableSam:
    """SAM 2.1 hiera-tiny as the backend loads an official file (no download), untrained plugin."""
    return build(TYPE, model_dir=sam2_dir, device="cpu", download=False)


@pytest.fixture(scope="module")
def scenes():
    return [drawn_scene(60), drawn_scene(61)]


def _digest(model: StableSam) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.sam.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _prompts(model: StableSam, scene, emb):
    """Each object's tight box and two clicks inside it, in SAM 2's input frame."""
    rng = np.random.default_rng(0)
    boxes = np.stack([mask_to_box(m) for m in scene.masks])
    pts = np.stack([np.argwhere(m)[rng.choice(int(m.sum()), 2)][:, ::-1] + 0.5 for m in scene.masks])
    dev = model.device
    points = (model.adapter.points_to_input(pts, emb.original_size, dev), torch.ones(pts.shape[:2], dtype=torch.int64))
    return points, model.adapter.boxes_to_input(boxes, emb.original_size, dev)


# --------------------------------------------------------------------------------------------------
# loading


def test_the_official_layout_loads_through_the_package_loader(sam2_model, sam2_dir, tmp_path):
    assert sam2_model.adapter.family == "sam2" and sam2_model.model_type == TYPE
    assert sam2_model.model_id == f"{TYPE}-{download.SAM2_RELEASE}"      # the official file: its release
    saved = torch.load(sam2_dir / OFFICIAL.filename, map_location="cpu", weights_only=True)["model"]
    loaded = sam2_model.sam.state_dict()
    assert list(loaded) == list(saved)
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    assert not any(p.requires_grad for p in sam2_model.sam.parameters())
    # Weights of one's own under another name are named by their SHA-256.
    other = tmp_path / "my_sam2.pt"
    other.symlink_to(sam2_dir / OFFICIAL.filename)
    assert model_identity(TYPE, other) == f"{TYPE}-{download.file_sha256(other)[:12]}"


def test_a_missing_checkpoint_names_the_file_and_the_url(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError) as e:
        build(TYPE, model_dir=tmp_path, download=False)
    assert str(tmp_path / OFFICIAL.filename) in str(e.value) and OFFICIAL.url in str(e.value)
    assert OFFICIAL.url == "https://dl.fbaipublicfiles.com/segment_anything_2/092824/sam2.1_hiera_tiny.pt"
    # Offline: the download fails with the same advice (a closed local port stands in for no network).
    monkeypatch.setitem(download.OFFICIAL_CHECKPOINTS, TYPE, replace(OFFICIAL, url="http://127.0.0.1:9/x.pt"))
    with pytest.raises(CheckpointError, match="download from http://127.0.0.1:9/x.pt failed"):
        build(TYPE, model_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []  # no partial file left


@pytest.mark.parametrize("payload", ["state_dict_without_model_key", "garbage"])
def test_a_file_that_is_no_sam2_checkpoint_is_refused(tmp_path, payload):
    path = tmp_path / "weights.pt"
    if payload == "garbage":
        path.write_bytes(b"not a checkpoint")
    else:
        torch.save({"image_encoder.trunk.pos_embed": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match=f"is not a SAM 2.1 {TYPE} checkpoint"):
        build(TYPE, sam_checkpoint=path)


# --------------------------------------------------------------------------------------------------
# the plugin on SAM 2's decoder


def test_untrained_plugin_is_an_exact_no_op_on_sam2(sam2_model, scenes):
    emb = sam2_model.embed(scenes[0].image)
    assert [tuple(f.shape) for f in emb.features] == [(1, 256, 64, 64), (1, 32, 256, 256), (1, 64, 128, 128)]
    points, boxes = _prompts(sam2_model, scenes[0], emb)
    with torch.no_grad():
        for multimask in (False, True):
            for pts, bx in ((points, None), (None, boxes), (points, boxes)):
                plain, iou_plain, _ = sam2_model.decode(emb.features, pts, bx, None, multimask, None)
                ours, iou_ours, alpha = sam2_model.decode(emb.features, pts, bx, None, multimask, StableSamPlugin())
                assert (plain - ours).abs().max().item() <= 1e-5
                assert (iou_plain - iou_ours).abs().max().item() <= 1e-5
                assert alpha.shape == (len(plain), 2)


def test_a_live_plugin_changes_sam2_logits_and_routes_on_the_mask_token(sam2_model, scenes):
    """SAM 2's output tokens are (object score, IoU, mask 0..3): the router reads mask token 0, the
    stream after layer-2 self-attention (SAM's norm1 output), as on SAM 1."""
    emb = sam2_model.embed(scenes[0].image)
    points, boxes = _prompts(sam2_model, scenes[0], emb)
    seen = {}

    class Recorder(StableSamPlugin):
        def forward(self, token, x, pe, grid_hw):
            seen["token"] = token.clone()
            return super().forward(token, x, pe, grid_hw)

    torch.manual_seed(0)
    plugin = Recorder()
    plugin.load_state_dict(live_plugin().state_dict())
    block = sam2_model.adapter.mask_decoder.transformer.layers[1]
    handle = block.norm1.register_forward_hook(lambda m, i, o: seen.__setitem__("norm1", o.clone()))
    try:
        with torch.no_grad():
            plain, _, _ = sam2_model.decode(emb.features, points, boxes, None, False, None)
            ours, _, alpha = sam2_model.decode(emb.features, points, boxes, None, False, plugin)
    finally:
        handle.remove()
    assert torch.allclose(seen["token"], seen["norm1"][:, 2], atol=1e-5)
    assert not torch.allclose(seen["token"], seen["norm1"][:, 1], atol=1e-2)
    assert (plain - ours).abs().max().item() > 1e-3
    assert torch.allclose(alpha.sum(dim=1), torch.ones(len(alpha)), atol=1e-6)


def test_gradients_reach_every_plugin_parameter_and_sam2_stays_frozen(sam2_model, scenes):
    before = _digest(sam2_model)
    embs = [sam2_model.embed(sc.image) for sc in scenes]
    boxes = torch.cat([sam2_model.adapter.boxes_to_input(mask_to_box(sc.masks[0])[None], e.original_size, "cpu")
                       for sc, e in zip(scenes, embs)])
    features = [torch.cat(maps) for maps in zip(*(e.features for e in embs))]  # each image its own prompt
    plugin = live_plugin().train()
    low, alpha = decode_prompts(sam2_model, features, None, boxes, plugin)
    assert low.shape == (2, 1, 256, 256) and alpha.shape == (2, 2)
    with torch.no_grad():  # the same two prompts one image at a time: the batched call is theirs
        for i, e in enumerate(embs):
            alone, _, _ = sam2_model.decode(e.features, None, boxes[i:i + 1], None, False, plugin)
            torch.testing.assert_close(low[i:i + 1], alone, rtol=1e-4, atol=1e-4)
    low.sigmoid().square().mean().backward()
    for name, p in plugin.named_parameters():
        assert p.grad is not None and p.grad.abs().sum().item() > 0, name
    assert all(p.grad is None for p in sam2_model.sam.parameters())
    assert _digest(sam2_model) == before


def test_an_rts_step_trains_the_plugin_and_its_checkpoint_names_sam2(sam2_model, scenes, tmp_path):
    before = _digest(sam2_model)
    calls = sam2_model.encoder_calls
    data = InMemoryDataset([Sample(sc.image, sc.masks, f"scene{i}") for i, sc in enumerate(scenes)])
    out = tmp_path / "plugin.pt"
    cfg = RTSConfig(images_per_step=2, prompts_per_object=1, probe_images=0, warmup_steps=0)
    plugin, version, summary = finetune(sam2_model, data, out, cfg, progress=False, log=lambda s: None)
    assert summary["steps"] == 1 and summary["images"] == 2
    init = StableSamPlugin().state_dict()
    changed = [k for k, v in plugin.state_dict().items() if not torch.equal(v.cpu(), init[k])]
    # One step from the untrained plugin moves the DSP; the router has no gradient yet (its two
    # inputs are equal until the DSP moves), every parameter has one with a live plugin (above).
    assert "dsp.offset.weight" in changed and "dsp.proj.weight" in changed
    assert _digest(sam2_model) == before
    assert sam2_model.encoder_calls - calls <= 2
    loaded = load_plugin(out, model_type=TYPE)
    assert loaded.base_model == {"model_type": TYPE, "model_id": sam2_model.model_id}
    for other in ("vit_b", "sam2.1_hiera_small"):  # a plugin refuses another base model ...
        with pytest.raises(CheckpointError, match="trained on base model 'sam2.1_hiera_tiny'"):
            load_plugin(out, model_type=other)
    with pytest.raises(CheckpointError, match="trained on base model 'sam_tiny'"):  # ... and SAM 1's refuse SAM 2
        load_plugin(ROOT / "checkpoints" / "plugin_sam_tiny_rts.pt", model_type=TYPE)


# --------------------------------------------------------------------------------------------------
# the predictor, the app, pre-annotation


def test_predictor_api_on_sam2(sam2_model, scenes):
    sc = scenes[0]
    predictor = StableSamPredictor(sam2_model)
    predictor.set_image(sc.image)
    h, w = sc.image.shape[:2]
    click = predictor.predict(point_coords=[centroid(sc.masks[0])], point_labels=[1])
    assert click.multimask and click.masks.shape == (1, h, w) and click.low_res_logits.shape == (1, 1, 256, 256)
    assert np.abs(click.low_res_logits).max() <= 32.0  # clamped as SAM2ImagePredictor hands them back
    boxes = np.array([mask_to_box(m) for m in sc.masks], dtype=np.float64)
    both = predictor.predict(box=boxes)
    assert both.masks.shape == (len(boxes), h, w) and both.alpha.shape == (len(boxes), 2)
    refined = predictor.predict(point_coords=[centroid(sc.masks[0])], point_labels=[1], box=boxes[0],
                                mask_input=click.low_res_logits)
    assert refined.masks.shape == (1, h, w) and 0 <= refined.stability[0] <= 1
    plain = predictor.predict(box=boxes, use_plugin=False)
    assert np.array_equal(plain.masks, both.masks)  # the untrained plugin: plain SAM 2's masks
    with pytest.raises(ValueError, match="mask_input must be 1 x 1 x 256 x 256"):
        predictor.predict(box=boxes[0], mask_input=np.zeros((1, 1, 64, 64)))


def test_predict_through_the_app_click_loose_box_two_boxes(sam2_model, scenes, tmp_path):
    sc = scenes[0]
    Image.fromarray(sc.image).save(tmp_path / "scene.png")
    # MASK_MIN_REGION_PX=0: the masks as the model made them, to compare with the bare predictor's
    settings = BackendSettings(local_files_root=tmp_path, model_dir=tmp_path / "models", sam_model_type=TYPE,
                               mask_min_region_px=0)
    client = create_app(backend=StableSamBackend(settings, model=sam2_model)).test_client()
    health = client.get("/health").get_json()
    assert health["model_loaded"] and health["model_version"] == sam2_model.version
    predictor = StableSamPredictor(sam2_model)
    predictor.set_image(sc.image)
    click = [keypoint(*centroid(sc.masks[0]), sc.size)]
    loose = [rectangle(loosen(sc.boxes[1], sc.size, 0.3), sc.size)]
    two = [rectangle(loosen(b, sc.size), sc.size, rid=f"r{i}") for i, b in enumerate(sc.boxes[:2])]
    for regions in (click, loose, two):
        r = client.post("/predict", json=predict_payload(1, str(tmp_path / "scene.png"), regions, RECOMMENDED_CONFIG))
        assert r.status_code == 200, r.get_json()
        (res,) = r.get_json()["results"]
        assert res["model_version"] == sam2_model.version
        assert len(res["result"]) == len(regions)
        for region, got in zip(regions, res["result"]):
            alone = predict_regions(predictor, [region], sc.size).masks[0]
            assert iou(result_mask(got), alone) >= (1.0 if len(regions) == 1 else 0.99)
    bad = client.post("/predict", json=predict_payload(1, str(tmp_path / "scene.png"),
                                                         [keypoint(5 * sc.size[0], 3, sc.size)], RECOMMENDED_CONFIG))
    assert 400 <= bad.status_code < 500 and "error" in bad.get_json()


def test_preannotating_two_images_offline(sam2_model, scenes, tmp_path):
    work = items_from_coco(write_coco_input(tmp_path, scenes), tmp_path)
    calls = sam2_model.encoder_calls
    summary = run_offline(sam2_model, work, tmp_path / "out.json", progress=False)
    assert (summary.processed, summary.failed) == (2, [])
    assert sam2_model.encoder_calls == calls  # both images were encoded before: the cache serves them
    data = json.loads((tmp_path / "out.json").read_text())
    for im, sc in zip(data["images"], scenes):
        anns = [a for a in data["annotations"] if a["image_id"] == im["id"]]
        assert len(anns) == len(sc.masks)
        predictor = StableSamPredictor(sam2_model)
        predictor.set_image(sc.image)
        for a in anns:  # each mask is the predictor's for the object's own prompt (a loose box)
            box = np.array(a["stable_sam"]["prompt"]["box"], dtype=np.float64)
            want = predictor.predict(box=box).masks[0]
            assert np.array_equal(mask_utils.decode(a["segmentation"]).astype(bool), want)


def test_automatic_masks_on_sam2(sam2_model, scenes):
    calls = sam2_model.encoder_calls
    found = automatic_masks(sam2_model, scenes[0].image,
                            AutoConfig(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0))
    assert sam2_model.encoder_calls == calls  # the cached features serve SAM 2's own generator
    h, w = scenes[0].image.shape[:2]
    assert found and all(a.mask.shape == (h, w) and a.mask.dtype == bool for a in found)


def test_the_cache_counts_sam2_high_res_maps_in_its_bound_and_stores_them_on_disk(sam2_model, tmp_path):
    shapes = sam2_model.adapter.feature_shapes()
    features = tuple(torch.randn((1, *s)) for s in shapes)
    assert features_nbytes(features) == 16 * 2**20  # 4 MiB embedding + 8 + 4 MiB high-res maps
    cache = EmbeddingCache(max_mb=20, disk_dir=tmp_path)
    cache.get_or_compute("a", lambda: features)
    cache.get_or_compute("b", lambda: features)
    assert cache.get("a") is None and cache.get("b") is not None and cache.nbytes == 16 * 2**20
    again = EmbeddingCache(max_mb=20, disk_dir=tmp_path).get_or_compute("a", lambda: pytest.fail("recomputed"))
    assert isinstance(again, tuple) and all(torch.equal(x, y) for x, y in zip(again, features))
