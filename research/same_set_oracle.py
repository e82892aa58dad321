"""The same-set oracle: how much can a decoder change gain at all, and how much of it does the
plugin get?

Both learners train on one small set and are evaluated on that same set (overfitting is the
point: it bounds what the capacity can do, free of generalisation):

- the Stable-SAM plugin (SAM frozen), with RTS prompts;
- SAM's own token-to-image attention of the plugin's decoder layer (the module whose keys and
  values the plugin re-routes), unfrozen, with the same prompts, steps and schedule.

If fine-tuning the attention closes the GT box -> noisy box gap and the plugin does not, the
plugin's design (not the data) is what limits it. SAM's weights are restored afterwards.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from stable_sam.data.dataset import SegmentationDataset
from stable_sam.lr_schedule import warmup_cosine
from stable_sam.model import StableSam
from stable_sam.modeling.plugin import StableSamPlugin
from stable_sam.rts import RTSConfig, _prepare, plugin_param_groups, prompts_loss


def fit(model: StableSam, dataset: SegmentationDataset, groups: List[Dict[str, Any]], cfg: RTSConfig,
        plugin: Optional[StableSamPlugin] = None) -> List[float]:
    """Train the parameter ``groups`` (the optimiser's: some of the plugin's or of SAM's decoder)
    with RTS prompts for ``cfg.epochs`` epochs, one image a step, warm-up then cosine; returns each
    step's loss."""
    params = [p for g in groups for p in g["params"]]
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    samples = [dataset[i] for i in range(len(dataset))]
    samples = [s for s in samples if s.masks]
    steps = len(samples) * cfg.epochs
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = warmup_cosine(opt, steps, cfg.warmup_steps, cfg.min_lr_ratio)  # RTS's schedule, per group
    if plugin is not None:
        plugin.train()
    losses: List[float] = []
    for _ in range(cfg.epochs):
        for i in rng.permutation(len(samples)):
            batch = _prepare(model, [samples[i]], cfg, rng)
            loss = prompts_loss(model, plugin, batch.embs, batch.targets, batch.prompts)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            sched.step()
            value = float(loss.detach())
            losses.append(value if math.isfinite(value) else float("nan"))
    if plugin is not None:
        plugin.eval()
    return losses


def fit_plugin(model: StableSam, dataset: SegmentationDataset, cfg: RTSConfig,
               plugin: Optional[StableSamPlugin] = None) -> Tuple[StableSamPlugin, List[float]]:
    """A plugin (fresh by default) trained by ``fit`` on ``dataset`` with ``cfg``'s trainable
    parts and learning rates."""
    plugin = (plugin or StableSamPlugin()).to(model.device)
    return plugin, fit(model, dataset, plugin_param_groups(plugin, cfg), cfg, plugin)


def attention_module(model: StableSam, layer: int = 1) -> nn.Module:
    """SAM's token-to-image attention of decoder layer ``layer`` (the plugin's layer)."""
    return model.adapter.mask_decoder.transformer.layers[layer].cross_attn_token_to_image


@contextlib.contextmanager
def attention_finetuned(model: StableSam, dataset: SegmentationDataset, cfg: RTSConfig,
                        layer: int = 1) -> Iterator[List[float]]:
    """Inside the block, ``model``'s layer-``layer`` token-to-image attention is fine-tuned on
    ``dataset`` (yields the loss curve); on exit SAM's weights are back, frozen, without gradients
    (the model is shared: a later check that SAM holds no gradient must not see these)."""
    module = attention_module(model, layer)
    saved = {k: v.detach().clone() for k, v in module.state_dict().items()}
    module.requires_grad_(True)
    try:
        losses = fit(model, dataset, [{"params": list(module.parameters())}], cfg)
        module.requires_grad_(False)
        yield losses
    finally:
        module.load_state_dict(saved)
        module.requires_grad_(False)
        for p in module.parameters():
            p.grad = None
