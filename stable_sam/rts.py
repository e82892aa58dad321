"""RTS, the robust training strategy: one epoch that teaches the plugin to survive casual prompts.

SAM stays frozen: its encoder and prompt encoder run under ``no_grad`` and every SAM weight has
``requires_grad=False``, so gradients flow through the decoder only to reach the plugin (DSP +
DRP), the one thing the optimiser holds. Each image is encoded once (through the model's
embedding cache) and all of its objects are prompted from that embedding.

Every object gets prompts of mixed quality: the tight GT box, a DN-DETR noisy box with a scale
drawn from U(0, ``max_box_noise``), or 1..``max_points`` positive points (optionally one negative).
An object whose sample carries the annotator's own prompt (``Sample.prompts``: the rough box or
the clicks that made its mask in Label Studio) gets that prompt as one of its
``prompts_per_object``; the others are drawn as above. Without such prompts nothing changes (the
random draws are the same).
All are decoded in single-mask mode and supervised with the whole-object mask, so an ambiguous
click is taught to mean the object, not one of its parts. Loss: BCE + Dice on the low-res logits
upsampled to SAM's input frame, padding excluded.

A step batches the prompts of ``images_per_step`` images into one decoder call per prompt shape;
prompts of different images share a call by adding each prompt's image embedding to its dense
prompt embedding (the decoder only ever uses their sum).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .checkpoint import save_plugin
from .distributed import DataParallelGroup
from .data.dataset import Sample, SegmentationDataset
from .losses import bce_dice_loss
from .lr_schedule import warmup_cosine
from .model import ImageEmbedding, StableSam
from .modeling.plugin import PluginConfig, StableSamPlugin, count_trainable
from .prompts import mask_to_box, negative_points, noisy_box, sample_points

PROMPT_KINDS = ("gt_box", "noisy_box", "points")
TRAINABLE_PARTS = ("all", "offsets", "projection")
ANNOTATED = "annotated"  # the kind of a prompt an annotator drew (``Sample.prompts``)


@dataclass
class RTSConfig:
    """Knobs of RTS; stored in the checkpoint's training summary."""

    epochs: int = 1
    images_per_step: int = 1
    prompts_per_object: int = 3  # one encoder call, several prompts of mixed quality per object
    lr: float = 3e-3
    weight_decay: float = 0.0
    warmup_steps: int = 5
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    mix: Tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3)  # gt_box, noisy_box, points
    max_box_noise: float = 0.5
    max_points: int = 3
    negative_prob: float = 0.0  # chance that a point prompt also gets one negative click
    probe_images: int = 8  # first images of the set: loss before / after on fixed prompts
    seed: int = 0
    # Which part of the plugin learns: "all"; "offsets" (the C->C projection stays the identity:
    # deformation alone); "projection" (the offsets stay zero: a learned projection, no deformation).
    trainable: str = "all"
    offset_lr_scale: float = 1.0  # learning-rate factor of the offset branch (dwconv, norm, offset)

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.images_per_step < 1 or self.prompts_per_object < 1:
            raise ValueError("epochs, images_per_step and prompts_per_object must be >= 1")
        if len(self.mix) != 3 or min(self.mix) < 0 or sum(self.mix) <= 0:
            raise ValueError(f"mix must be 3 non-negative weights (gt_box, noisy_box, points), got {self.mix}")
        if self.max_points < 1:
            raise ValueError("max_points must be >= 1")
        if self.trainable not in TRAINABLE_PARTS:
            raise ValueError(f"trainable must be one of {TRAINABLE_PARTS}, got {self.trainable!r}")
        if self.offset_lr_scale <= 0:
            raise ValueError(f"offset_lr_scale must be > 0, got {self.offset_lr_scale}")


@dataclass
class TrainPrompt:
    """One prompt on one object, in original-image pixels. box: 4 (XYXY) or None; points: K x 2
    with labels K (1 positive, 0 negative) or None."""

    slot: int  # which image of the step
    obj: int
    kind: str
    box: Optional[np.ndarray]
    points: Optional[np.ndarray]
    labels: Optional[np.ndarray]

    @property
    def shape_key(self) -> Tuple[bool, int]:
        """Prompts with equal keys go through one decoder call."""
        return self.box is not None, 0 if self.points is None else len(self.points)


def draw_prompt(mask: np.ndarray, cfg: RTSConfig, rng: np.random.Generator, slot: int = 0,
                obj: int = 0) -> TrainPrompt:
    """A prompt of random quality for one H x W bool mask."""
    p = np.asarray(cfg.mix, dtype=np.float64)
    kind = PROMPT_KINDS[int(rng.choice(3, p=p / p.sum()))]
    if kind == "gt_box":
        return TrainPrompt(slot, obj, kind, mask_to_box(mask), None, None)
    if kind == "noisy_box":
        return TrainPrompt(slot, obj, kind, noisy_box(mask, rng.uniform(0, cfg.max_box_noise), rng), None, None)
    k = int(rng.integers(1, cfg.max_points + 1))
    points, labels = sample_points(mask, k, rng), np.ones(k, np.int64)
    if cfg.negative_prob > 0 and rng.random() < cfg.negative_prob and not mask.all():
        points = np.concatenate([points, negative_points(mask, 1, rng)])
        labels = np.concatenate([labels, np.zeros(1, np.int64)])
    return TrainPrompt(slot, obj, kind, None, points, labels)


def input_frame_target(model: StableSam, mask: np.ndarray, emb: ImageEmbedding) -> torch.Tensor:
    """H x W bool mask -> S x S float in SAM's input frame (resized like the image, zero padding)."""
    s = model.image_size
    t = torch.as_tensor(mask, device=model.device, dtype=torch.float32)[None, None]
    if tuple(mask.shape) != tuple(emb.input_size):
        t = (F.interpolate(t, emb.input_size, mode="bilinear", align_corners=False) > 0.5).float()
    return F.pad(t, (0, s - emb.input_size[1], 0, s - emb.input_size[0]))[0, 0]


def decode_prompts(model: StableSam, features: Union[torch.Tensor, Sequence[torch.Tensor]],
                   points: Optional[Tuple[torch.Tensor, torch.Tensor]], boxes: Optional[torch.Tensor],
                   plugin: Optional[StableSamPlugin]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Single-mask decoding of B prompts, each on its own image: ``features`` the images' features
    stacked (``ImageEmbedding.features`` of each, concatenated per map: B x C_i x h_i x w_i; a
    bare B x C x h x w embedding for SAM 1), coordinates in the input frame. Returns low-res
    logits B x 1 x 4h x 4w and alpha B x 2."""
    low, _, alpha = model.decode(features, points, boxes, None, False, plugin, own_images=True)
    return low, alpha


def prompts_loss(model: StableSam, plugin: Optional[StableSamPlugin], embs: Sequence[ImageEmbedding],
                 targets: Sequence[torch.Tensor], prompts: Sequence[TrainPrompt]) -> torch.Tensor:
    """Mean BCE + Dice over ``prompts``; targets[slot] is n_objects x S x S in the input frame."""
    s = model.image_size
    dev = model.device
    total = torch.zeros((), device=dev)
    groups: Dict[Tuple[bool, int], List[TrainPrompt]] = {}
    for p in prompts:
        groups.setdefault(p.shape_key, []).append(p)
    for (has_box, k), group in sorted(groups.items()):
        features = [torch.cat(maps).float() for maps in zip(*(embs[p.slot].features for p in group))]
        boxes = points = None
        adapter = model.adapter
        if has_box:
            boxes = torch.cat([adapter.boxes_to_input(p.box[None], embs[p.slot].original_size, dev) for p in group])
        if k:
            coords = torch.stack([adapter.points_to_input(p.points, embs[p.slot].original_size, dev) for p in group])
            points = (coords, torch.as_tensor(np.stack([p.labels for p in group]), dtype=torch.int64, device=dev))
        low, _ = decode_prompts(model, features, points, boxes, plugin)
        up = F.interpolate(low, (s, s), mode="bilinear", align_corners=False)
        target = torch.stack([targets[p.slot][p.obj] for p in group])[:, None]
        valid = torch.zeros(len(group), 1, s, s, device=dev)
        for i, p in enumerate(group):
            h, w = embs[p.slot].input_size
            valid[i, :, :h, :w] = 1
        total = total + bce_dice_loss(up, target, valid).sum()
    return total / max(1, len(prompts))


@dataclass
class _Step:
    embs: List[ImageEmbedding]
    targets: List[torch.Tensor]
    prompts: List[TrainPrompt]


def _prepare(model: StableSam, samples: Sequence[Sample], cfg: RTSConfig, rng: np.random.Generator) -> _Step:
    """Embed the images (cached), build input-frame targets and draw every object's prompts."""
    embs, targets, prompts = [], [], []
    for slot, sample in enumerate(samples):
        emb = model.embed(sample.image)
        embs.append(emb)
        targets.append(torch.stack([input_frame_target(model, m, emb) for m in sample.masks]))
        for obj, mask in enumerate(sample.masks):
            given = sample.prompts[obj] if sample.prompts else None
            if given is not None:  # the annotator's own prompt is one of the object's prompts
                prompts.append(TrainPrompt(slot, obj, ANNOTATED, given.box, given.points, given.labels))
            n = cfg.prompts_per_object - (given is not None)
            prompts += [draw_prompt(mask, cfg, rng, slot, obj) for _ in range(n)]
    return _Step(embs, targets, prompts)


def _usable(dataset: SegmentationDataset) -> Callable[[int], Optional[Sample]]:
    def get(i: int) -> Optional[Sample]:
        s = dataset[int(i)]
        return s if s.masks else None
    return get


def plugin_param_groups(plugin: StableSamPlugin, cfg: RTSConfig) -> List[Dict[str, Any]]:
    """The optimiser's parameter groups for ``cfg.trainable``: the offset branch (dwconv, norm,
    offset head) at ``cfg.offset_lr_scale`` x lr, the rest at lr. Parts that stay fixed get
    ``requires_grad=False``, so the saved plugin holds them at their no-op initial values."""
    dsp = plugin.dsp
    offset_branch = [dsp.dwconv, dsp.norm, dsp.offset]
    if cfg.trainable == "offsets":
        dsp.proj.requires_grad_(False)
    elif cfg.trainable == "projection":
        for m in offset_branch:
            m.requires_grad_(False)
    branch_ids = {id(p) for m in offset_branch for p in m.parameters()}
    offset = [p for p in plugin.parameters() if p.requires_grad and id(p) in branch_ids]
    rest = [p for p in plugin.parameters() if p.requires_grad and id(p) not in branch_ids]
    return [g for g in ({"params": rest, "lr": cfg.lr},
                        {"params": offset, "lr": cfg.lr * cfg.offset_lr_scale}) if g["params"]]


def _probe_loss(model: StableSam, plugin: StableSamPlugin, probe: Optional[_Step]) -> Optional[float]:
    """The loss on the fixed probe prompts (the plugin in eval mode for it, then back in training
    mode); None without a probe."""
    if probe is None:
        return None
    plugin.eval()
    with torch.no_grad():
        value = float(prompts_loss(model, plugin, probe.embs, probe.targets, probe.prompts))
    plugin.train()
    return value


def _rts_step(model: StableSam, plugin: StableSamPlugin, samples: List[Sample], cfg: RTSConfig,
              rng: np.random.Generator, opt: torch.optim.Optimizer, params: List[torch.nn.Parameter],
              ddp: DataParallelGroup) -> Optional[Tuple[float, List[TrainPrompt]]]:
    """One optimiser step on this process's ``samples`` (with several processes a rank without
    images still joins the gradient all-reduce). Returns the loss and the prompts drawn; None when
    there were no samples."""
    if not samples and ddp.world == 1:
        return None
    opt.zero_grad(set_to_none=False)
    for p in params:
        p.grad = torch.zeros_like(p) if p.grad is None else p.grad
    loss = batch = None
    if samples:
        batch = _prepare(model, samples, cfg, rng)
        loss = prompts_loss(model, plugin, batch.embs, batch.targets, batch.prompts)
        loss.backward()
    if ddp.average_gradients(params, contributed=bool(samples)):
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
    return None if loss is None else (float(loss.detach()), batch.prompts)


class _RtsRecord:
    """What an RTS run has seen so far: the loss curve and its running mean, the prompt kinds, and
    the images and objects of the first epoch (the data size)."""

    def __init__(self) -> None:
        self.curve: List[Dict[str, float]] = []
        self.kinds: Counter = Counter()
        self.images = self.objects = 0
        self.running: Optional[float] = None

    def add(self, step: int, epoch: int, loss: float, prompts: List[TrainPrompt], samples: List[Sample]) -> None:
        """Step ``step`` (0-based) of ``epoch`` (0-based) trained on ``samples`` with ``prompts``."""
        self.running = loss if self.running is None else 0.95 * self.running + 0.05 * loss
        self.kinds.update(p.kind for p in prompts)
        if epoch == 0:
            self.images += len(samples)
            self.objects += sum(len(s.masks) for s in samples)
        self.curve.append({"step": step + 1, "epoch": epoch + 1, "loss": round(loss, 5)})


def _rts_summary(model: StableSam, plugin: StableSamPlugin, dataset: SegmentationDataset, cfg: RTSConfig,
                 record: _RtsRecord, ddp: DataParallelGroup, total_steps: int,
                 probe_losses: Tuple[Optional[float], Optional[float]], encoder_calls: int,
                 minutes: float) -> Dict[str, Any]:
    """``train_plugin``'s summary (the counts summed over the processes)."""
    images, objects = ddp.total(record.images), ddp.total(record.objects)  # every rank, in this order
    kinds = ddp.merge_counts(record.kinds)
    return {
        "method": "RTS",
        "rts_config": asdict(cfg),
        "plugin_config": plugin.config.to_dict(),
        "trainable_params": count_trainable(plugin),
        "dataset": getattr(dataset, "description", type(dataset).__name__),
        "images": images,
        "objects": objects,
        "prompts": sum(kinds.values()),
        "prompt_kinds": dict(kinds),
        "epochs": cfg.epochs,
        "steps": total_steps,
        "loss_curve": _downsample(record.curve, 200),
        "probe_loss_before": probe_losses[0],
        "probe_loss_after": probe_losses[1],
        "encoder_calls": encoder_calls,
        "minutes": round(minutes, 3),
        "device": str(model.device),
        "processes": ddp.world,
    }


def train_plugin(model: StableSam, dataset: SegmentationDataset, cfg: RTSConfig = RTSConfig(),
                 plugin: Optional[StableSamPlugin] = None, progress: bool = True,
                 log: Callable[[str], None] = print,
                 on_step: Optional[Callable[[int, int, Optional[float]], None]] = None
                 ) -> Tuple[StableSamPlugin, Dict[str, Any]]:
    """Train a plugin (a fresh one of ``PluginConfig()`` by default) with RTS; SAM is untouched.

    Args:
        model: the frozen SAM the plugin serves with.
        dataset: the training images (``len``, ``[i] -> Sample``); images without masks are skipped.
        cfg: the recipe (epochs, lr, prompt mix, seed, ...).
        plugin: the plugin to train further (default: a fresh, no-op one).
        progress: show a progress bar.
        log: where the one-line result goes.
        on_step: ``on_step(step, steps, loss)`` after every step (loss None when the step had no
            usable image).

    Returns:
        The trained plugin (eval mode) and a summary: data size, epochs, steps, loss curve, the
        loss on fixed probe prompts before and after, prompt kinds seen, time.
    """
    torch.manual_seed(cfg.seed)
    ddp = DataParallelGroup.current()
    # One process: one generator for the image order and the prompts, as it always was (the
    # committed plugin stays reproducible). Several: the order is shared, the prompts are per rank.
    rng = np.random.default_rng(cfg.seed if ddp.world == 1 else [cfg.seed, ddp.rank])
    order_rng = rng if ddp.world == 1 else np.random.default_rng(cfg.seed)
    plugin = (plugin or StableSamPlugin()).to(model.device)
    groups = plugin_param_groups(plugin, cfg)
    params = [p for g in groups for p in g["params"]]
    ddp.broadcast(params)
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    n = len(dataset)
    per_step = cfg.images_per_step * ddp.world
    total_steps = math.ceil(n / per_step) * cfg.epochs
    sched = warmup_cosine(opt, total_steps, cfg.warmup_steps, cfg.min_lr_ratio)
    get = _usable(dataset)

    probe_samples = [s for s in (get(i) for i in range(min(cfg.probe_images, n))) if s is not None]
    probe = _prepare(model, probe_samples, cfg, np.random.default_rng([cfg.seed, 1])) if probe_samples else None
    start, encoder_calls0 = time.time(), model.encoder_calls
    before = _probe_loss(model, plugin, probe)
    record = _RtsRecord()
    plugin.train()
    bar = tqdm(total=total_steps, desc="RTS", unit="step", disable=not progress, dynamic_ncols=True)
    step = 0
    for epoch in range(cfg.epochs):
        order = order_rng.permutation(n)
        for s0 in range(0, n, per_step):
            mine = order[s0 + ddp.rank * cfg.images_per_step:s0 + (ddp.rank + 1) * cfg.images_per_step]
            samples = [s for s in (get(i) for i in mine) if s is not None]
            done = _rts_step(model, plugin, samples, cfg, rng, opt, params, ddp)
            if done is not None:
                record.add(step, epoch, done[0], done[1], samples)
                bar.set_postfix(loss=f"{record.running:.4f}")
            sched.step()
            bar.update(1)
            step += 1
            if on_step is not None:
                on_step(step, total_steps, round(done[0], 5) if done is not None else None)
    bar.close()
    after = _probe_loss(model, plugin, probe)
    plugin.eval()
    minutes = (time.time() - start) / 60
    summary = _rts_summary(model, plugin, dataset, cfg, record, ddp, total_steps, (before, after),
                           model.encoder_calls - encoder_calls0, minutes)
    log(f"RTS: {summary['images']} images, {summary['objects']} objects, {summary['prompts']} prompts, "
        f"{total_steps} steps in {minutes:.1f} min; probe loss {before if before is None else round(before, 4)} -> "
        f"{after if after is None else round(after, 4)}")
    return plugin, summary


def _downsample(curve: List[Dict[str, float]], max_points: int) -> List[Dict[str, float]]:
    """Mean loss over equal windows, at most ``max_points`` entries."""
    if len(curve) <= max_points:
        return curve
    size = math.ceil(len(curve) / max_points)
    return [{"step": w[-1]["step"], "epoch": w[-1]["epoch"],
             "loss": round(float(np.mean([c["loss"] for c in w])), 5)}
            for w in (curve[i:i + size] for i in range(0, len(curve), size))]


def plugin_version(plugin: StableSamPlugin) -> str:
    """``rts-<UTC time>-<weights hash>``: unique per trained plugin, sortable by time."""
    h = hashlib.sha256()
    for k, v in sorted(plugin.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return f"rts-{datetime.now(timezone.utc).strftime('%Y%m%d%H%M%S')}-{h.hexdigest()[:8]}"


def finetune(model: StableSam, dataset: SegmentationDataset, out_path: Path, cfg: RTSConfig = RTSConfig(),
             plugin_config: Optional[PluginConfig] = None, version: Optional[str] = None,
             progress: bool = True, extra_summary: Optional[Dict[str, Any]] = None,
             log: Callable[[str], None] = print) -> Tuple[StableSamPlugin, str, Dict[str, Any]]:
    """Train with RTS and write the versioned plugin checkpoint atomically (nothing is written if
    training fails). Returns the plugin, its version and the training summary."""
    plugin, summary = train_plugin(model, dataset, cfg, StableSamPlugin(plugin_config or PluginConfig()),
                                   progress=progress, log=log)
    summary.update(extra_summary or {})
    ddp = DataParallelGroup.current()
    version = ddp.from_rank0(version or plugin_version(plugin))  # the clock differs between ranks
    if ddp.rank == 0:  # the ranks hold the same weights; one writes them
        save_plugin(plugin, out_path, version, {"model_type": model.model_type, "model_id": model.model_id}, summary)
        log(f"plugin {version} written to {out_path}")
    return plugin, version, summary
