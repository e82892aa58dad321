"""RTS training, the plugin checkpoint it writes, and the evaluation protocol on the small SAM."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stable_sam.checkpoint import load_plugin
from stable_sam.data.dataset import DatasetError, SegmentationDataset
from stable_sam.data.synthetic import TRAIN_SEED
from stable_sam.data.synthetic_split import SyntheticSplit
from stable_sam.evaluation import PROMPT_TYPES, ProtocolConfig, evaluate, targets_report
from stable_sam.modeling.plugin import PluginConfig, StableSamPlugin
from stable_sam.prompts import mask_to_box
from stable_sam.rts import RTSConfig, decode_prompts, finetune, train_plugin

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """On a shared 2-core machine one torch thread is many times faster than two that contend."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _sam_digest(model) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.sam.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _train_set(n=6):
    return SyntheticSplit(TRAIN_SEED, start=100_000, count=n)


def test_per_prompt_embeddings_decode_like_one_image_at_a_time(tiny_model, heldout):
    scenes = [heldout[0], heldout[1]]
    embs = [tiny_model.embed(s.image) for s in scenes]
    boxes = [tiny_model.adapter.boxes_to_input(mask_to_box(s.masks[0])[None], e.original_size, tiny_model.device)
             for s, e in zip(scenes, embs)]
    plugin = StableSamPlugin()
    with torch.no_grad():
        plugin.dsp.offset.bias.fill_(0.3)  # a plugin that does something
        together, alpha = decode_prompts(tiny_model, torch.cat([e.embedding for e in embs]), None,
                                         torch.cat(boxes).float(), plugin)
        for i, (e, b) in enumerate(zip(embs, boxes)):
            alone, _, a = tiny_model.decode(e.embedding, None, b.float(), None, False, plugin)
            torch.testing.assert_close(together[i:i + 1], alone, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(alpha[i:i + 1], a)


@pytest.mark.slow  # trains for seconds
def test_short_training_lowers_the_loss_and_touches_only_the_plugin(tiny_model):
    before = _sam_digest(tiny_model)
    init = StableSamPlugin()
    init_state = {k: v.clone() for k, v in init.state_dict().items()}
    cfg = RTSConfig(epochs=3, images_per_step=2, prompts_per_object=1, lr=3e-3, warmup_steps=1, probe_images=6)
    plugin, summary = train_plugin(tiny_model, _train_set(6), cfg, StableSamPlugin(), progress=False,
                                   log=lambda s: None)
    assert _sam_digest(tiny_model) == before                       # SAM byte-identical
    assert not any(p.requires_grad for p in tiny_model.sam.parameters())
    assert all(p.grad is None for p in tiny_model.sam.parameters())
    changed = [k for k, v in plugin.state_dict().items() if not torch.equal(v, init_state[k])]
    assert "dsp.offset.weight" in changed and "drp.out.weight" in changed
    print(f"probe loss {summary['probe_loss_before']:.4f} -> {summary['probe_loss_after']:.4f}")
    assert summary["probe_loss_after"] < summary["probe_loss_before"]
    assert summary["epochs"] == 3 and summary["steps"] == 9
    assert summary["images"] == 6 and summary["objects"] > 6
    assert summary["prompts"] == 3 * summary["objects"]
    assert summary["encoder_calls"] <= 6                            # each image encoded at most once
    assert len(summary["loss_curve"]) == 9


def test_finetune_writes_a_versioned_checkpoint_that_round_trips(tiny_model, tmp_path, heldout):
    out = tmp_path / "plugin.pt"
    cfg = RTSConfig(images_per_step=2, probe_images=0)
    plugin, version, summary = finetune(tiny_model, _train_set(2), out, cfg, PluginConfig(offset_range=3.0),
                                        progress=False, log=lambda s: None)
    loaded = load_plugin(out, model_type="sam_tiny")
    assert loaded.version == version and version.startswith("rts-")
    assert loaded.plugin.config == PluginConfig(offset_range=3.0)
    assert loaded.base_model == {"model_type": "sam_tiny", "model_id": tiny_model.model_id}
    for key in ("images", "objects", "epochs", "loss_curve", "minutes", "rts_config", "trainable_params"):
        assert key in loaded.summary
    for k, v in plugin.state_dict().items():
        torch.testing.assert_close(loaded.plugin.state_dict()[k], v.cpu(), rtol=0, atol=0)
    assert out.stat().st_size < 1_000_000
    assert [p.name for p in tmp_path.iterdir()] == ["plugin.pt"]   # no temporary file left


class _Breaks(SegmentationDataset):
    """Good images, then a bad one: training must fail without writing anything."""

    def __init__(self):
        self.good = _train_set(3)

    def __len__(self):
        return 4

    def __getitem__(self, i):
        if i == 3:
            raise DatasetError("mask x.png is empty")
        return self.good[i]


def test_failed_training_leaves_the_previous_checkpoint(tiny_model, tmp_path):
    out = tmp_path / "plugin.pt"
    out.write_bytes(b"previous version")
    with pytest.raises(DatasetError):
        finetune(tiny_model, _Breaks(), out, RTSConfig(images_per_step=1, probe_images=0), progress=False,
                 log=lambda s: None)
    assert out.read_bytes() == b"previous version"
    assert [p.name for p in tmp_path.iterdir()] == ["plugin.pt"]


@pytest.mark.slow  # trains for seconds
def test_protocol_runs_both_models_on_the_same_prompts(tiny_model, heldout):
    ds = SyntheticSplit(heldout.seed, start=0, count=2)
    noop = StableSamPlugin()            # untrained: an exact no-op, so it must score like SAM
    cfg = ProtocolConfig(prompts_per_object=3, figure_cases=1)
    res = evaluate(tiny_model, ds, {"sam": None, "stable_sam": noop}, cfg, progress=False)
    s = res.summary()
    assert set(s) == {"sam", "stable_sam"} and list(s["sam"]) == list(PROMPT_TYPES)
    for t in PROMPT_TYPES:
        for k in ("miou", "mbiou", "stability"):
            assert s["sam"][t][k] == s["stable_sam"][t][k]
            assert 0 <= s["sam"][t][k] <= 100
    assert s["sam"]["gt_box"]["stability"] == 100.0              # one fixed prompt
    assert "alpha_deformed" in s["stable_sam"]["point1"] and "alpha_deformed" not in s["sam"]["point1"]
    assert res.objects == sum(len(ds[i].masks) for i in range(2))
    assert len(res.cases) == 2 and set(res.cases[0].masks) == {"sam", "stable_sam"}
    assert tiny_model.plugin_version == "init"                   # the model's own plugin restored
    again = evaluate(tiny_model, ds, {"sam": None}, cfg, progress=False).summary()
    assert again["sam"] == s["sam"]                               # seeded: same prompts, same numbers
    met = {t["target"]: t["met"] for t in targets_report(s, 81_828)}
    assert met["trainable parameters <= 0.1 M"]
    assert res.offsets["stable_sam"] == {"mean_cells": 0.0, "at_bound_share": 0.0}   # the no-op plugin
    assert res.alpha("sam") is None and set(res.alpha("stable_sam")) == set(PROMPT_TYPES)


def _row(miou: float, stab: float) -> dict:
    return {"miou": miou, "mbiou": miou, "stability": stab}


def test_targets_report_measures_the_share_of_each_gap_recovered():
    sam = {"gt_box": _row(80, 100), "noisy_box_0.4": _row(50, 60), "point3": _row(70, 80), "point1": _row(40, 50)}
    ours = {"gt_box": _row(79.6, 100), "noisy_box_0.4": _row(65, 66), "point3": _row(70, 84), "point1": _row(54, 70)}
    report = targets_report({"sam": sam, "stable_sam": ours}, 81_828, {"gt_box": 0.1, "noisy_box_0.4": 0.3})
    by_name = {t["target"].split(" (")[0]: t for t in report}
    noisy = by_name["share of SAM's gt_box -> noisy_box_0.4 mIoU gap recovered >= 0.5"]
    assert noisy["value"] == 0.5 and noisy["met"]                   # 15 of a 30-point gap
    point = by_name["share of SAM's point3 -> point1 mIoU gap recovered >= 0.5"]
    assert abs(point["value"] - 14 / 30) < 1e-3 and not point["met"]
    assert by_name["Stable-SAM GT box mIoU >= SAM GT box mIoU - 0.5"]["met"]
    assert by_name["Stable-SAM stability >= SAM stability + 5, noisy_box_0.4"]["met"]       # 66 vs 60
    assert not by_name["Stable-SAM stability >= SAM stability + 5, point3"]["met"]          # 84 vs 80
    assert by_name["mean alpha_1 on noisy-0.4 boxes > on GT boxes"]["met"]


def test_trainable_part_keeps_the_other_part_at_its_no_op_start(tiny_model):
    ds = _train_set(1)
    for part in ("offsets", "projection"):
        plugin, _ = train_plugin(tiny_model, ds, RTSConfig(trainable=part, probe_images=0, offset_lr_scale=0.5),
                                 progress=False, log=lambda s: None)
        dsp = plugin.dsp
        if part == "offsets":
            assert torch.equal(dsp.proj.weight, torch.eye(256)) and not dsp.proj.weight.requires_grad
            assert dsp.offset.weight.abs().sum() > 0
        else:
            assert dsp.offset.weight.abs().sum() == 0 and dsp.offset.bias.abs().sum() == 0
            assert not torch.equal(dsp.proj.weight, torch.eye(256))
    with pytest.raises(ValueError, match="trainable"):
        RTSConfig(trainable="decoder")


@pytest.mark.slow  # runs a script in a subprocess
def test_benchmark_script_json_contract(tiny_model, tmp_path):
    plugin_path = tmp_path / "p.pt"
    finetune(tiny_model, _train_set(1), plugin_path, RTSConfig(probe_images=0), progress=False, log=lambda s: None)
    cmd = [sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--plugin", str(plugin_path), "--images", "1",
           "--prompts", "2", "--out", str(tmp_path / "b.json"), "--figure", str(tmp_path / "b.png"),
           "--threads", "1", "--no-progress", "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    last = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(last) == {"sam", "stable_sam", "offsets", "plugin_params", "by_size"}
    for model in ("sam", "stable_sam"):
        assert list(last[model]) == list(PROMPT_TYPES) + ["alpha"]
        assert all(set(last[model][t]) == {"miou", "mbiou", "stability"} for t in PROMPT_TYPES)
    assert last["sam"]["alpha"] is None
    assert list(last["stable_sam"]["alpha"]) == list(PROMPT_TYPES)
    assert all(0 < a < 1 for a in last["stable_sam"]["alpha"].values())
    assert set(last["offsets"]) == {"mean_cells", "at_bound_share"}
    assert last["offsets"]["mean_cells"] > 0 and 0 <= last["offsets"]["at_bound_share"] <= 1
    assert last["plugin_params"] == 81_828
    assert (tmp_path / "b.png").stat().st_size > 0
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["results"]["sam"] == {t: last["sam"][t] for t in PROMPT_TYPES}
    assert report["alpha"]["stable_sam"] == last["stable_sam"]["alpha"]
    assert report["by_size"] == last["by_size"]
    # COCO's size buckets: each present bucket's objects add up to the run's, per model and type
    for model in ("sam", "stable_sam"):
        for t in PROMPT_TYPES:
            buckets = last["by_size"][model][t]
            assert set(buckets) <= {"small", "medium", "large"} and buckets
            assert sum(b["objects"] for b in buckets.values()) == report["objects"]
            assert all(0 <= b["miou"] <= 100 for b in buckets.values())
    bad = subprocess.run(cmd[:2] + ["--plugin", str(tmp_path / "missing.pt")], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert bad.returncode == 2 and "not found" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("warmup, total, scale", [(5, 40, 1.0), (5, 40, 0.3), (1, 7, 1.0), (0, 9, 2.0), (3, 200, 1.0)])
def test_lr_schedule_warms_up_then_follows_a_cosine_on_each_groups_own_lr(warmup, total, scale):
    """The rate of every step, every group: (k + 1) / warmup of the group's lr during the warm-up,
    then a cosine down to ``min_lr_ratio`` of the group's own lr at ``total`` steps.

    torch's LinearLR + CosineAnnealingLR in a SequentialLR were tried in its place and give other
    rates: one absolute eta_min for all groups (the offset group at ``offset_lr_scale`` x lr ends
    at the other group's floor: 3.3 x its own with scale 0.3), and with one group
    they agree only to about 1e-14 (CosineAnnealingLR's recursive update), not exactly.
    """
    from stable_sam.lr_schedule import warmup_cosine

    cfg = RTSConfig(warmup_steps=warmup, lr=3e-3, min_lr_ratio=0.1, offset_lr_scale=scale)
    base = [cfg.lr, cfg.lr * scale]
    opt = torch.optim.AdamW([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr} for lr in base])
    sched = warmup_cosine(opt, total, cfg.warmup_steps, cfg.min_lr_ratio)
    for k in range(total):
        if k < warmup:
            factor = (k + 1) / warmup
        else:
            t = (k - warmup) / max(1, total - warmup)
            factor = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))
        for group, lr in zip(opt.param_groups, base):
            assert group["lr"] == pytest.approx(lr * factor, rel=1e-12, abs=0), (k, lr)
        opt.step()
        sched.step()
