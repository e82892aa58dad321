"""The DSP + DRP plugin: budget, exact no-op at init, SAM untouched, routing per call."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stable_sam.modeling.dsp import bilinear_sample
from stable_sam.modeling.plugin import PluginConfig, StableSamPlugin, attach, count_trainable, route
from stable_sam.modeling.sam_tiny import build_sam_tiny
from stable_sam.prompts import mask_to_box, sample_points


def _decoder_inputs(model, scene, rng):
    """Real embeddings of a held-out scene and a batch of box + point prompts in the input frame."""
    emb = model.embed(scene.image)
    boxes = np.stack([mask_to_box(m) for m in scene.masks])
    pts = np.stack([sample_points(m, 2, rng) for m in scene.masks])
    boxes = model.adapter.boxes_to_input(boxes, emb.original_size, model.device)
    pts = model.adapter.points_to_input(pts, emb.original_size, model.device)
    labels = torch.ones(pts.shape[:2], dtype=torch.int64)
    return emb.embedding, (pts, labels), boxes


def test_trainable_parameters_within_budget():
    plugin = StableSamPlugin()
    n = count_trainable(plugin)
    print(f"Stable-SAM plugin trainable parameters at C=256: {n}")
    assert n <= 100_000
    assert 70_000 <= n  # DSP alone is 73.5 K at C=256 (method doc)
    assert count_trainable(StableSamPlugin(PluginConfig(use_drp=False))) == 73_474


@pytest.mark.parametrize("config", [
    PluginConfig(),
    PluginConfig(amplitude=True),
    PluginConfig(resample_pe=False),
    PluginConfig(router_activation="sigmoid"),
    PluginConfig(router_token="iou"),
    PluginConfig(use_drp=False, offset_range=4.0),
])
def test_untrained_plugin_is_an_exact_no_op(tiny_model, heldout, config):
    emb, points, boxes = _decoder_inputs(tiny_model, heldout[3], np.random.default_rng(0))
    plugin = StableSamPlugin(config)
    with torch.no_grad():
        for multimask in (False, True):
            plain, plain_iou, alpha0 = tiny_model.decode(emb, points, boxes, None, multimask, None)
            stable, stable_iou, alpha = tiny_model.decode(emb, points, boxes, None, multimask, plugin)
            assert alpha0 is None and alpha.shape == (len(boxes), 2)
            assert (plain - stable).abs().max().item() < 1e-5
            assert (plain_iou - stable_iou).abs().max().item() < 1e-5


def test_trained_plugin_changes_masks_and_routes_per_prompt(tiny_model, heldout):
    emb, points, boxes = _decoder_inputs(tiny_model, heldout[3], np.random.default_rng(0))
    torch.manual_seed(0)  # before the plugin is built: its router starts random
    plugin = StableSamPlugin()
    with torch.no_grad():
        plugin.dsp.offset.weight.normal_(0, 0.5)
        plugin.dsp.proj.weight.add_(0.1 * torch.randn_like(plugin.dsp.proj.weight))
        plugin.drp.out.weight.normal_(0, 1.0)
        plain, _, _ = tiny_model.decode(emb, points, boxes, None, False, None)
        stable, _, alpha = tiny_model.decode(emb, points, boxes, None, False, plugin)
    assert (plain - stable).abs().max().item() > 1e-2
    assert torch.allclose(alpha.sum(dim=1), torch.ones(len(alpha)), atol=1e-6)
    assert alpha[:, 0].std().item() > 1e-3  # the router looks at each prompt


def test_attach_leaves_sam_modules_and_weights_untouched():
    sam = build_sam_tiny()
    before = {k: v.clone() for k, v in sam.state_dict().items()}
    names = [n for n, _ in sam.named_modules()]
    grid = tuple(sam.prompt_encoder.image_embedding_size)
    attach(sam.mask_decoder, grid)
    attach(sam.mask_decoder, grid)  # idempotent: one hook
    after = sam.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [n for n, _ in sam.named_modules()] == names
    target = sam.mask_decoder.transformer.layers[1].cross_attn_token_to_image
    assert len(target._forward_pre_hooks) == 1


def test_router_token_is_the_stream_after_layer2_self_attention(tiny_model, heldout):
    """The hook recovers t_o as q minus the token's own query pe: check it against SAM's norm1 output."""
    emb, points, boxes = _decoder_inputs(tiny_model, heldout[5], np.random.default_rng(1))
    seen = {}

    class Recorder(StableSamPlugin):
        def forward(self, token, x, pe, grid_hw):
            seen["token"] = token.clone()
            return super().forward(token, x, pe, grid_hw)

    block = tiny_model.sam.mask_decoder.transformer.layers[1]
    handle = block.norm1.register_forward_hook(lambda m, i, o: seen.__setitem__("norm1", o.clone()))
    try:
        with torch.no_grad():
            tiny_model.decode(emb, points, boxes, None, False, Recorder())
    finally:
        handle.remove()
    assert torch.allclose(seen["token"], seen["norm1"][:, 1], atol=1e-5)


@pytest.mark.parametrize("hw", [(16, 16), (5, 7), (64, 48)])
def test_bilinear_sample_matches_grid_sample(hw):
    h, w = hw
    torch.manual_seed(0)
    tokens = torch.randn(2, h * w, 6, dtype=torch.float64, requires_grad=True)
    cells = torch.stack(torch.meshgrid(torch.arange(w, dtype=torch.float64), torch.arange(h, dtype=torch.float64),
                                       indexing="xy"), -1)
    positions = (cells[None] + 3 * torch.randn(2, h, w, 2, dtype=torch.float64)).requires_grad_()
    ours = bilinear_sample(tokens, positions)
    grid = positions / positions.new_tensor([w - 1, h - 1]) * 2 - 1
    ref = F.grid_sample(tokens.view(2, h, w, 6).permute(0, 3, 1, 2), grid, mode="bilinear",
                        padding_mode="border", align_corners=True).permute(0, 2, 3, 1).reshape(2, h * w, 6)
    assert torch.allclose(ours, ref, atol=1e-10)
    g_ours = torch.autograd.grad(ours.square().sum(), (tokens, positions))
    g_ref = torch.autograd.grad(ref.square().sum(), (tokens, positions))
    assert torch.allclose(g_ours[0], g_ref[0], atol=1e-8)
    inside = (positions > 0).all(-1) & (positions[..., 0] < w - 1) & (positions[..., 1] < h - 1)
    assert torch.allclose(g_ours[1][inside], g_ref[1][inside], atol=1e-8)


def test_routing_is_per_thread(tiny_model, heldout):
    """Plain-SAM and plugin calls interleaved from many threads give the single-thread results."""
    emb, points, boxes = _decoder_inputs(tiny_model, heldout[3], np.random.default_rng(0))
    torch.manual_seed(0)
    plugin = StableSamPlugin()
    with torch.no_grad():
        plugin.dsp.offset.weight.normal_(0, 0.05)
        expected = {p is None: tiny_model.decode(emb, points, boxes, None, False, p)[0] for p in (None, plugin)}
    errors = []

    def work(use_plugin: bool):
        with torch.no_grad():
            for _ in range(5):
                out = tiny_model.decode(emb, points, boxes, None, False, plugin if use_plugin else None)[0]
                if not torch.equal(out, expected[not use_plugin]):
                    errors.append(use_plugin)

    threads = [threading.Thread(target=work, args=(i % 2 == 0,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_config_rejects_unknown_knobs():
    with pytest.raises(ValueError, match="router_token"):
        PluginConfig(router_token="cls")
    with pytest.raises(ValueError, match="router activation"):
        StableSamPlugin(PluginConfig(router_activation="relu"))
    with pytest.raises(ValueError, match="unknown plugin config"):
        PluginConfig.from_dict({"offset_rnage": 3})
