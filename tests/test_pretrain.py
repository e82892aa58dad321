"""Pretraining the small SAM: prompts of several images share decoder calls, and a step trains."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from stable_sam.data.synthetic import TRAIN_SEED, SyntheticScenes
from stable_sam.modeling.batched_decode import decode_on_own_images
from stable_sam.modeling.sam_tiny import build_sam_tiny
from training.pretrain import PretrainConfig, image_to_tensor, refine_patch_grid, save_sam_fp16, step_loss


def test_multimask_prompts_of_two_images_decode_like_one_image_at_a_time():
    torch.manual_seed(0)
    sam = build_sam_tiny()  # any weights will do: this is about the batching, not the masks
    grid = sam.prompt_encoder.image_embedding_size
    emb = torch.randn(2, 256, *grid, requires_grad=True)
    coords = torch.tensor([[[40.0, 50.0]], [[200.0, 120.0]]])
    labels = torch.ones(2, 1, dtype=torch.int64)
    pe = sam.prompt_encoder.get_dense_pe()
    sparse, dense = sam.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
    together, iou = decode_on_own_images(sam.mask_decoder, emb, pe, sparse, dense, multimask=True)
    assert together.shape == (2, 3, 4 * grid[0], 4 * grid[1]) and iou.shape == (2, 3)
    for i in range(2):
        alone, alone_iou = sam.mask_decoder(emb[i:i + 1], pe, sparse[i:i + 1], dense[i:i + 1], True)
        torch.testing.assert_close(together[i:i + 1], alone, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(iou[i:i + 1], alone_iou, rtol=1e-4, atol=1e-4)
    together[1].sum().backward()  # each prompt's gradient reaches its own image only
    assert emb.grad[0].abs().max() == 0 and emb.grad[1].abs().max() > 0


def test_a_few_steps_on_one_batch_lower_its_loss_and_save_fp16(tmp_path):
    torch.manual_seed(0)
    sam = build_sam_tiny()
    sam.train()
    scenes = [s for s in (SyntheticScenes(seed=TRAIN_SEED)[i] for i in range(3)) if s.masks][:2]
    cfg = replace(PretrainConfig(), masks_per_image=2, iterations=2, point_prob=0.5)
    batch = torch.stack([image_to_tensor(sam, s.image) for s in scenes])
    opt = torch.optim.AdamW(sam.parameters(), lr=1e-3)

    def loss_now() -> torch.Tensor:  # the same prompts every time
        return step_loss(sam, sam.image_encoder(batch), scenes, cfg, np.random.default_rng(0))

    first = loss_now()
    first.backward()
    assert sam.image_encoder.patch_embed.proj.weight.grad.abs().sum() > 0  # the encoder trains too
    assert sam.mask_decoder.iou_prediction_head.layers[0].weight.grad.abs().sum() > 0
    opt.step()
    for _ in range(4):
        opt.zero_grad()
        loss_now().backward()
        opt.step()
    with torch.no_grad():
        last = loss_now()
    assert last.item() < 0.9 * first.item(), (first.item(), last.item())

    path = save_sam_fp16(sam, tmp_path / "tiny.pt")
    state = torch.load(path, weights_only=True)
    assert all(v.dtype == torch.float16 for v in state.values() if v.is_floating_point())
    reloaded = build_sam_tiny(path)
    with torch.no_grad():
        emb = sam.image_encoder(batch[:1])
        again = reloaded.image_encoder(batch[:1])
    assert (emb - again).abs().max() < 0.05 * emb.abs().max()  # fp16 rounding only


def test_refining_a_coarse_model_keeps_what_its_weights_mean():
    torch.manual_seed(0)
    coarse = build_sam_tiny(patch_size=16)
    fine = build_sam_tiny(patch_size=8)
    state = refine_patch_grid(coarse.state_dict(), fine)
    fine.load_state_dict(state)
    # The patch kernel: fine tokens of an image equal coarse tokens of it upsampled 2x (nearest).
    x = torch.randn(1, 3, 64, 64)
    up = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    with torch.no_grad():
        torch.testing.assert_close(fine.image_encoder.patch_embed.proj(x),
                                   coarse.image_encoder.patch_embed.proj(up), rtol=1e-4, atol=1e-4)
    # A relative-position table means the same distance in pixels: fine offset 2d = coarse offset d.
    old, new = coarse.image_encoder.blocks[0].attn.rel_pos_h, state["image_encoder.blocks.0.attn.rel_pos_h"]
    reach_old, reach_new = (len(old) - 1) // 2, (len(new) - 1) // 2
    for d in range(-7, 8):
        torch.testing.assert_close(new[reach_new + 2 * d], old[reach_old + d])
    # Shape-free weights are copied as they are.
    torch.testing.assert_close(fine.mask_decoder.iou_token.weight, coarse.mask_decoder.iou_token.weight)
    assert fine.image_encoder.pos_embed.shape[1:3] == (32, 32)


def test_scenes_drawn_ahead_in_workers_are_the_loops_own_batches():
    import research.region_world  # noqa: F401 - registers the "regions" world
    from stable_sam.data.synthetic_split import world_scenes
    from training.pretrain import batch_scenes, scene_batches

    cfg = replace(PretrainConfig(), batch_size=3, steps=5, world="regions")
    scenes = world_scenes("regions", "train")
    inline = list(scene_batches(scenes, 2, cfg, workers=0))
    ahead = list(scene_batches(scenes, 2, cfg, workers=2))
    assert len(inline) == len(ahead) == 3  # steps 2, 3, 4
    for step, (a, b) in enumerate(zip(inline, ahead), start=2):
        assert [s.image.tobytes() for s in a] == [s.image.tobytes() for s in b]
        assert [s.image.tobytes() for s in a] == [s.image.tobytes() for s in batch_scenes(scenes, step, cfg)]
    early = scene_batches(scenes, 0, replace(cfg, steps=1000), workers=2)
    assert len(next(early)) <= 3
    early.close()  # a run that stops early shuts its workers down, without drawing the rest


def test_sam_box_jitter_is_capped_in_pixels():
    from stable_sam.prompts import mask_to_box, sam_jittered_box

    mask = np.zeros((256, 256), bool)
    mask[20:236, 30:230] = True  # 10 % of the side is 20 px: the cap binds
    tight = mask_to_box(mask)
    rng = np.random.default_rng(0)
    capped = np.stack([sam_jittered_box(mask, rng, max_px=5.0) for _ in range(200)]) - tight
    wide = np.stack([sam_jittered_box(mask, rng) for _ in range(200)]) - tight
    assert np.abs(capped).max() <= 5.0 + 1e-4 and np.abs(capped).max() > 4.0
    assert np.abs(wide).max() > 10.0


def _one_step_run(tmp_path):
    """A one-step pretraining run that leaves its resumable state: (its config, its weights path)."""
    from training.pretrain import pretrain_sam

    cfg = replace(PretrainConfig(), steps=1, batch_size=1, masks_per_image=1, iterations=1,
                  eval_every=1000, eval_images=1, checkpoint_every=1)
    torch.manual_seed(0)
    out = tmp_path / "tiny.pt"
    pretrain_sam(build_sam_tiny(), cfg, out, log=lambda _: None)
    return cfg, out


def test_a_state_saved_before_a_knob_existed_resumes(tmp_path):
    from training.pretrain import pretrain_sam, training_state_path

    cfg, out = _one_step_run(tmp_path)
    state_path = training_state_path(out)
    state = torch.load(state_path, weights_only=False)
    del state["config"]["box_jitter_max_px"]  # as written before the knob
    torch.save(state, state_path)
    lines = []
    pretrain_sam(build_sam_tiny(), cfg, out, log=lines.append)
    assert any("resumed" in line for line in lines)
    state["config"]["lr"] = cfg.lr * 2  # another config is still refused
    torch.save(state, state_path)
    with pytest.raises(ValueError, match="another config"):
        pretrain_sam(build_sam_tiny(), cfg, out, log=lambda _: None)


PHOTOS = Path(__file__).resolve().parents[1] / "examples" / "photos"
REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"


def test_the_committed_photos_read_as_a_folder_set_of_parts_and_wholes():
    from stable_sam.data.sources import open_dataset

    ds = open_dataset(PHOTOS)
    assert len(ds) == 3
    for sample in ds:
        assert len(sample.masks) >= 5 and all(m.shape == sample.image.shape[:2] for m in sample.masks)
        whole = max(sample.masks, key=lambda m: m.sum())  # the person
        parts = [m for m in sample.masks if m is not whole]
        # garments lie (mostly) inside the person: masks of parts and wholes overlap by design
        assert sum((m & whole).sum() > 0.5 * m.sum() for m in parts) >= len(parts) // 2


def test_augmented_photo_scenes_are_seeded_by_index_and_keep_masks_on_their_pixels():
    from stable_sam.data.dataset import Sample, SegmentationDataset
    from training.photo_scenes import MIN_TARGET_AREA, PhotoScenes

    class Painted(SegmentationDataset):  # objects painted in pure colours: a mask must stay on its colour
        def __len__(self):
            return 2

        def __getitem__(self, i):
            rng = np.random.default_rng(i)
            image = np.zeros((300 + 50 * i, 420, 3), np.uint8)
            masks = []
            for k, colour in enumerate(((255, 0, 0), (0, 255, 0), (0, 0, 255))):
                m = np.zeros(image.shape[:2], bool)
                y, x = rng.integers(0, 200), rng.integers(0, 300)
                m[y:y + 90, x:x + 110] = True
                m &= ~np.any(masks, axis=0) if masks else True
                image[m] = colour
                masks.append(m)
            return Sample(image, masks, f"painted{i}")

    scenes = PhotoScenes([Painted()], size=256, seed=3, colour=0.0)
    again = PhotoScenes([Painted()], size=256, seed=3, colour=0.0)
    seen_flip = set()
    for index in range(12):
        scene = scenes[index]
        assert scene.image.tobytes() == again[index].image.tobytes()  # a pure function of the index
        assert max(scene.image.shape[:2]) <= 256
        for m in scene.masks:
            assert m.shape == scene.image.shape[:2] and m.sum() >= MIN_TARGET_AREA
            colour = np.median(scene.image[m], axis=0)
            assert (colour >= 200).sum() == 1 and (colour <= 50).sum() == 2  # on one pure colour
    # colour jitter changes pixels but not where the masks are
    jittered = PhotoScenes([Painted()], size=256, seed=3, colour=0.3)
    for index in range(4):
        a, b = scenes[index], jittered[index]
        assert [m.tobytes() for m in a.masks] == [m.tobytes() for m in b.masks]
        assert a.image.tobytes() != b.image.tobytes()
    # the validation view: every photo once, fitted to the input size
    plain = PhotoScenes([Painted()], size=256, augment=False)
    assert len(plain) == 2 and all(max(plain[i].image.shape[:2]) == 256 for i in range(2))
    assert len(plain[0].masks) == 3


def test_pretraining_on_photos_keeps_the_validation_photos_out(tmp_path):
    from training.pretrain import training_scenes

    cfg = replace(PretrainConfig(), world="photos", photos=str(PHOTOS), val_per_set=1)
    train, val = training_scenes(cfg, 256)
    assert len(val) == 1 and {train.photo_index(i) for i in range(30)} == {0, 1}
    assert val[0].image.shape[:2] != (0, 0) and len(val[0].masks) >= 5
    with pytest.raises(ValueError, match="--photos"):
        training_scenes(replace(cfg, photos=""), 256)


def test_a_photo_training_run_steps_and_saves_a_model_of_its_input_size(tmp_path):
    from training.pretrain import pretrain_sam

    cfg = replace(PretrainConfig(), world="photos", photos=str(PHOTOS), val_per_set=1, steps=2, batch_size=1,
                  masks_per_image=2, iterations=2, eval_every=2, eval_images=1, trainable="decoder")
    torch.manual_seed(0)
    init = build_sam_tiny()
    sam = build_sam_tiny(image_size=320)
    sam.load_state_dict(refine_patch_grid(init.state_dict(), sam))
    before = sam.image_encoder.patch_embed.proj.weight.clone()
    summary = pretrain_sam(sam, cfg, tmp_path / "photo.pt", log=lambda _: None)
    assert summary["history"][-1]["step"] == 2 and 0 <= summary["history"][-1]["gt_box"] <= 1
    assert torch.equal(sam.image_encoder.patch_embed.proj.weight, before)  # decoder-only: encoder frozen
    reloaded = build_sam_tiny(tmp_path / "photo.pt")  # input size read from the checkpoint
    assert reloaded.image_encoder.img_size == 320 and reloaded.prompt_encoder.image_embedding_size == (40, 40)


@pytest.mark.skipif(not REAL.is_dir(), reason=f"the real photo sets are not at {REAL} (a user's own clone)")
def test_the_real_photo_sets_open_with_many_masks_per_image():
    from stable_sam.data.sources import open_dataset

    for name, least in (("ccp-heldout", 200), ("camvid-val", 100)):
        ds = open_dataset(REAL / name)
        assert len(ds) >= least
        sample = ds[0]
        assert len(sample.masks) >= 3 and all(m.shape == sample.image.shape[:2] for m in sample.masks)


def test_a_run_resumes_with_another_length_and_ends_its_schedule_there(tmp_path):
    from training.pretrain import pretrain_sam

    cfg, out = _one_step_run(tmp_path)
    lines = []
    summary = pretrain_sam(build_sam_tiny(), replace(cfg, steps=2), out, log=lines.append)
    assert any("resumed" in line for line in lines) and any("now ends at step 2" in line for line in lines)
    assert [h["step"] for h in summary["history"]] == [1, 2]


def test_one_click_trains_the_single_mask_output_only_when_asked():
    """SAM's output token 0 answers one click in single-mask mode (the protocol's 1 point): with
    point prompts of one click and no corrective round, it gets a gradient only from the knob."""
    torch.manual_seed(0)
    sam = build_sam_tiny()
    scenes = [s for s in (SyntheticScenes(seed=TRAIN_SEED)[i] for i in range(3)) if s.masks][:2]
    batch = torch.stack([image_to_tensor(sam, s.image) for s in scenes])
    token0 = sam.mask_decoder.output_hypernetworks_mlps[0].layers[0].weight

    def token0_grad(cfg: PretrainConfig, seed: int = 0) -> float:
        sam.zero_grad()
        step_loss(sam, sam.image_encoder(batch), scenes, cfg, np.random.default_rng(seed)).backward()
        return token0.grad.abs().sum().item() if token0.grad is not None else 0.0

    one_click = replace(PretrainConfig(), masks_per_image=2, iterations=1, point_prob=1.0)
    assert token0_grad(one_click) == 0.0
    assert token0_grad(replace(one_click, single_mask_click_weight=0.5)) > 0
    # several starting clicks are answered (and trained) in single-mask mode, as SAM does
    several = replace(one_click, start_points_max=3)
    grads = [token0_grad(several, seed) for seed in range(6)]  # k drawn per call: some 1, some more
    assert any(g == 0 for g in grads) and any(g > 0 for g in grads), grads
