"""Pretraining the small SAM from scratch, the way SAM was trained.

Prompts are SAM's own: a GT box with SAM's small jitter or one point from the mask, followed by
corrective clicks sampled from the error region with the previous low-res logits fed back as the
mask prompt. A single point is answered with SAM's three masks and only the best one is penalised
(SAM's ambiguity-aware loss); every other prompt uses the single-mask output. Loss: BCE + Dice on
the logits upsampled to the image, plus MSE of the IoU head against the true IoU.

A step decodes the prompts of all its images together: one decoder call per round for the prompts
that started as boxes, one for those that started as clicks. Training can start at a coarse patch
(cheaper steps) and continue at the fine one from ``refine_patch_grid``'s adapted weights.

This is *not* Stable-SAM training (see RTS): the noisy prompts that Stable-SAM fixes are absent.
"""

from __future__ import annotations

import itertools
import multiprocessing
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Deque, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam

from stable_sam.checkpoint import atomic_torch_save
from stable_sam.data.dataset import Subset
from stable_sam.data.folder import FolderDataset
from stable_sam.data.synthetic import Scene
from stable_sam.data.synthetic_split import world_scenes
from stable_sam.losses import bce_dice_loss
from stable_sam.lr_schedule import warmup_cosine
from stable_sam.metrics import binary_iou
from stable_sam.modeling.batched_decode import decode_all_on_own_images
from stable_sam.prompts import error_point, mask_to_box, noisy_box, sample_points, sam_jittered_box
from training.photo_scenes import PhotoScenes


@dataclass
class PretrainConfig:
    """The three commands in docs/small-sam.md (a patch-16 run, then two patch-8 runs from its refined weights)
    and these defaults made the committed ``checkpoints/sam_tiny.pt``; each run's full config is in
    its summary JSON."""

    steps: int = 1600
    batch_size: int = 8
    masks_per_image: int = 3
    iterations: int = 2  # the first prompt, then one corrective click with the mask prompt
    lr: float = 4e-4  # 1e-3 trained far slower from scratch (held-out box IoU 0.09 vs 0.51 at step 300)
    min_lr_ratio: float = 0.02
    warmup_steps: int = 50
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    point_prob: float = 0.5
    seed: int = 0
    eval_every: int = 100
    eval_images: int = 48
    world: str = "synthetic"  # "synthetic" (objects only), "photos", or a registered world ("regions": research/)
    checkpoint_every: int = 25  # steps between resumable training states
    # SAM caps its box jitter at 20 px of a 1024-px input, so large objects get a nearly tight box;
    # 5 is that cap at the small SAM's 256 px (20 made the committed checkpoints).
    box_jitter_max_px: float = 20.0
    # world "photos": comma-separated folder datasets; the last ``val_per_set`` photos of each are
    # kept out of training and monitor it (so the held-out sets are never used to choose a recipe).
    photos: str = ""
    val_per_set: int = 30
    zoom_min: float = 0.75  # large-scale jitter: zoom factor around the fit to the input size
    zoom_max: float = 2.0
    colour_jitter: float = 0.3
    trainable: str = "all"  # "all" or "decoder" (the image encoder frozen)
    # A point prompt starts as k positive clicks, k uniform in 1..start_points_max (one k per
    # decoder call). SAM answers k > 1 with its single-mask output; with only corrective clicks
    # after a mask prompt, that output never sees several clicks alone, as the product sends them.
    start_points_max: int = 1
    # With one starting click, SAM's single-mask output is penalised too, with this weight, against
    # the chosen object (the three multimask outputs keep the min-loss): what one click answers in
    # single-mask mode, otherwise never trained.
    single_mask_click_weight: float = 0.0


def image_to_tensor(sam: Sam, image: np.ndarray) -> torch.Tensor:
    """H x W x 3 uint8 (long side == encoder size) -> normalised, padded 3 x S x S float tensor."""
    x = torch.as_tensor(np.ascontiguousarray(image).copy(), device=sam.device).permute(2, 0, 1).float()
    return sam.preprocess(x[None])[0]


def _pad(mask: np.ndarray, size: int) -> np.ndarray:
    """H x W bool -> size x size bool, zero on SAM's padding (bottom and right)."""
    out = np.zeros((size, size), dtype=bool)
    out[: mask.shape[0], : mask.shape[1]] = mask
    return out


def _group_loss(sam: Sam, embeddings: torch.Tensor, items: List[Tuple[int, np.ndarray]], use_points: bool,
                cfg: PretrainConfig, rng: np.random.Generator) -> torch.Tensor:
    """Summed loss of P prompts, ``cfg.iterations`` rounds each: items are (image row in
    ``embeddings``, that image's H x W object mask); all start as a jittered GT box, or all as the
    same number of positive clicks. One decoder call per round for all P prompts, whatever image
    they are on."""
    size = sam.image_encoder.img_size
    dev = sam.device
    masks = [m for _, m in items]
    p = len(items)
    emb = embeddings[torch.as_tensor([i for i, _ in items], device=dev)]  # P x C x h x w
    gt_np = np.stack([_pad(m, size) for m in masks])
    gt = torch.as_tensor(gt_np, device=dev)[:, None]  # P x 1 x S x S
    valid = torch.as_tensor(np.stack([_pad(np.ones(m.shape, bool), size) for m in masks]), device=dev)[:, None]
    boxes = None if use_points else torch.as_tensor(np.stack([sam_jittered_box(m, rng, cfg.box_jitter_max_px) for m in masks]), device=dev)
    coords = np.zeros((p, 0, 2), np.float32)
    labels = np.zeros((p, 0), np.int64)
    if use_points:
        k = int(rng.integers(1, cfg.start_points_max + 1)) if cfg.start_points_max > 1 else 1
        coords = np.stack([sample_points(m, k, rng) for m in masks])
        labels = np.ones((p, k), np.int64)
    mask_input: Optional[torch.Tensor] = None
    pe = sam.prompt_encoder.get_dense_pe()
    rows = torch.arange(p, device=dev)
    total = embeddings.new_zeros(())
    for it in range(cfg.iterations):
        points = None
        if coords.shape[1]:
            points = (torch.as_tensor(coords, device=dev), torch.as_tensor(labels, device=dev))
        sparse, dense = sam.prompt_encoder(points=points, boxes=boxes, masks=mask_input)
        low_all, iou_all = decode_all_on_own_images(sam.mask_decoder, emb, pe, sparse, dense)  # P x 4 ...
        one_click = it == 0 and coords.shape[1] == 1 and boxes is None
        outputs = slice(1, None) if one_click else slice(0, 1)  # SAM's multimask rule
        low, iou_pred = low_all[:, outputs], iou_all[:, outputs]
        up = F.interpolate(low, (size, size), mode="bilinear", align_corners=False)
        seg = bce_dice_loss(up, gt.float().expand_as(up), valid)  # P x K
        best = seg.argmin(dim=1)  # SAM's ambiguity-aware loss: only the best candidate counts
        with torch.no_grad():
            pred = (up > 0) & valid
            true_iou = binary_iou(pred, gt.expand_as(pred))
        total = total + p * (seg[rows, best].mean() + F.mse_loss(iou_pred, true_iou))
        if one_click and cfg.single_mask_click_weight > 0:
            total = total + p * cfg.single_mask_click_weight * _single_mask_loss(low_all, iou_all, gt, valid)
        if it + 1 < cfg.iterations:
            pred_best = pred[rows, best].cpu().numpy()
            new = [error_point(pred_best[j][: m.shape[0], : m.shape[1]], m, rng) for j, m in enumerate(masks)]
            coords = np.concatenate([coords, np.stack([q for q, _ in new])[:, None]], axis=1)
            labels = np.concatenate([labels, np.array([[lab] for _, lab in new])], axis=1)
            mask_input = low[rows, best][:, None].detach()
    return total / cfg.iterations


def _single_mask_loss(low_all: torch.Tensor, iou_all: torch.Tensor, gt: torch.Tensor,
                      valid: torch.Tensor) -> torch.Tensor:
    """Mean loss of SAM's single-mask output (``low_all[:, 0]``, P x 4 x h x w logits; IoU P x 4)
    against gt P x 1 x S x S: BCE + Dice plus its IoU head's MSE."""
    size = gt.shape[-1]
    up = F.interpolate(low_all[:, :1], (size, size), mode="bilinear", align_corners=False)
    with torch.no_grad():
        true_iou = binary_iou((up > 0) & valid, gt)
    return bce_dice_loss(up, gt.float(), valid).mean() + F.mse_loss(iou_all[:, :1], true_iou)


def step_loss(sam: Sam, embeddings: torch.Tensor, scenes: Sequence[Scene], cfg: PretrainConfig,
              rng: np.random.Generator) -> torch.Tensor:
    """Mean loss per prompt over a batch: embeddings N x C x h x w of ``scenes``. Each image prompts
    up to ``cfg.masks_per_image`` of its objects, all with boxes or (``point_prob``) all with one
    point; the box prompts of every image share decoder calls, and so do the point prompts."""
    groups: Dict[bool, List[Tuple[int, np.ndarray]]] = {False: [], True: []}
    for i, scene in enumerate(scenes):
        targets = scene.training_targets
        chosen = rng.permutation(len(targets))[: cfg.masks_per_image]
        groups[bool(rng.random() < cfg.point_prob)] += [(i, targets[j]) for j in chosen]
    total = embeddings.new_zeros(())
    for use_points, items in groups.items():
        if items:
            total = total + _group_loss(sam, embeddings, items, use_points, cfg, rng)
    return total / sum(len(v) for v in groups.values())


@torch.no_grad()
def quick_eval(sam: Sam, scenes: Sequence[Scene], n_images: int, seed: int = 0) -> Dict[str, float]:
    """Held-out mIoU of the objects for a GT box and a DN-DETR noisy box of scale 0.4 (single mask),
    one point (best of three by predicted IoU), and, as the evaluation protocol decodes them, one
    point and three points in single-mask mode (``point1_single``, ``point3``)."""
    sam.eval()
    rng = np.random.default_rng(seed)
    # The protocol's point prompts draw from their own generator, so the first three figures stay
    # comparable with runs logged before they were added.
    points_rng = np.random.default_rng(seed + 1)
    pe = sam.prompt_encoder.get_dense_pe()
    size = sam.image_encoder.img_size
    ious: Dict[str, List[float]] = {"gt_box": [], "noisy_box_0.4": [], "point1": [], "point1_single": [], "point3": []}
    for idx in range(min(n_images, len(scenes))):
        scene = scenes[idx]
        if not scene.masks:
            continue
        h, w = scene.image.shape[:2]
        emb = sam.image_encoder(image_to_tensor(sam, scene.image)[None])
        gt_np = np.stack(scene.masks)
        gt = torch.as_tensor(gt_np, device=sam.device)
        boxes = torch.as_tensor(np.stack([mask_to_box(g) for g in gt_np]), device=sam.device)
        noisy = torch.as_tensor(np.stack([noisy_box(g, 0.4, rng) for g in gt_np]), device=sam.device)
        pts = torch.as_tensor(np.stack([sample_points(g, 1, rng) for g in gt_np]), device=sam.device)
        lbl = torch.ones(pts.shape[:2], dtype=torch.int64, device=sam.device)
        pts1 = torch.as_tensor(np.stack([sample_points(g, 1, points_rng) for g in gt_np]), device=sam.device)
        pts3 = torch.as_tensor(np.stack([sample_points(g, 3, points_rng) for g in gt_np]), device=sam.device)
        for name, kwargs, multi in (("gt_box", {"points": None, "boxes": boxes}, False),
                                    ("noisy_box_0.4", {"points": None, "boxes": noisy}, False),
                                    ("point1", {"points": (pts, lbl), "boxes": None}, True),
                                    ("point1_single", {"points": (pts1, lbl), "boxes": None}, False),
                                    ("point3", {"points": (pts3, torch.ones_like(pts3[..., 0], dtype=torch.int64)),
                                                "boxes": None}, False)):
            sparse, dense = sam.prompt_encoder(masks=None, **kwargs)
            low, iou_pred = sam.mask_decoder(emb, pe, sparse, dense, multi)
            pick = iou_pred.argmax(dim=1)
            low = low[torch.arange(len(pick)), pick][:, None]
            up = F.interpolate(low, (size, size), mode="bilinear", align_corners=False)[:, 0, :h, :w]
            ious[name] += binary_iou(up > 0, gt).tolist()
    sam.train()
    return {k: float(np.mean(v)) for k, v in ious.items()}


def batch_scenes(scenes: Sequence[Scene], step: int, cfg: PretrainConfig) -> List[Scene]:
    """Step ``step``'s batch: the next ``cfg.batch_size`` scenes, those with something to prompt."""
    return with_targets([scenes[step * cfg.batch_size + i] for i in range(cfg.batch_size)])


def with_targets(batch: Sequence[Scene]) -> List[Scene]:
    """The scenes of ``batch`` that have something to prompt (a training target)."""
    return [s for s in batch if s.training_targets]


def scene_batches(scenes: Sequence[Scene], first_step: int, cfg: PretrainConfig,
                  workers: int = 0) -> Iterator[List[Scene]]:
    """``batch_scenes`` for every step from ``first_step`` on. With ``workers`` > 0 the scenes are
    drawn ahead in that many processes (each scene is a pure function of its index, so the batches
    are the same): on a GPU, drawing scenes one by one would take longer than the step itself."""
    if workers <= 0:
        for step in range(first_step, cfg.steps):
            yield batch_scenes(scenes, step, cfg)
        return
    ahead = 2 * workers  # batches in flight: every worker busy, memory bounded
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))

    def submit(step: int) -> List[Future]:
        return [pool.submit(scenes.__getitem__, step * cfg.batch_size + i) for i in range(cfg.batch_size)]

    try:
        steps = iter(range(first_step, cfg.steps))
        pending: Deque[List[Future]] = deque(submit(step) for step in itertools.islice(steps, ahead))
        while pending:
            batch = with_targets([f.result() for f in pending.popleft()])
            step = next(steps, None)
            if step is not None:
                pending.append(submit(step))
            yield batch
    finally:  # also when training stops early: no scene is drawn for nothing
        pool.shutdown(cancel_futures=True)


def train_step(sam: Sam, opt: torch.optim.Optimizer, scenes: Sequence[Scene], cfg: PretrainConfig,
               rng: np.random.Generator) -> torch.Tensor:
    """One optimiser step on ``scenes``: encode, ``step_loss``, backward, clip, step. Returns the loss."""
    batch = torch.stack([image_to_tensor(sam, s.image) for s in scenes])
    with torch.set_grad_enabled(cfg.trainable == "all"):
        embeddings = sam.image_encoder(batch)
    loss = step_loss(sam, embeddings, scenes, cfg, rng)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in sam.parameters() if p.requires_grad], cfg.grad_clip)
    opt.step()
    return loss


def training_scenes(cfg: PretrainConfig, size: int) -> Tuple[Sequence[Scene], Sequence[Scene]]:
    """The training and monitoring scenes of ``cfg.world``: the synthetic generators, or the
    photos of ``cfg.photos`` (augmented; their last ``cfg.val_per_set`` images each, plain, monitor)."""
    if cfg.world != "photos":
        return world_scenes(cfg.world, "train", offset=cfg.seed), world_scenes(cfg.world, "heldout")
    folders = [f.strip() for f in cfg.photos.split(",") if f.strip()]
    if not folders:
        raise ValueError("world 'photos' needs --photos: comma-separated folder datasets")
    train_sets, val_sets = [], []
    for folder in folders:
        ds = FolderDataset(Path(folder))
        cut = max(0, len(ds) - cfg.val_per_set)
        train_sets.append(Subset(ds, range(cut)))
        val_sets.append(Subset(ds, range(cut, len(ds))))
    train = PhotoScenes(train_sets, size, seed=cfg.seed, zoom=(cfg.zoom_min, cfg.zoom_max), colour=cfg.colour_jitter)
    return train, PhotoScenes(val_sets, size, augment=False)


def training_state_path(out_path: Path) -> Path:
    """Where ``pretrain_sam`` keeps its resumable state next to the weights it writes."""
    return out_path.with_suffix(".state.pt")


@dataclass
class TrainingProgress:
    """Where a run stands: the next step, the running loss, the eval history, and the minutes
    spent before this process (a resumed run's)."""

    step: int = 0
    running: float = 0.0
    history: List[Dict[str, float]] = field(default_factory=list)
    minutes_before: float = 0.0


def optimiser(sam: Sam, cfg: PretrainConfig) -> Tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW over the weights ``cfg.trainable`` names (the encoder frozen for ``decoder``) and its
    warm-up + cosine schedule."""
    if cfg.trainable not in ("all", "decoder"):
        raise ValueError(f"trainable must be 'all' or 'decoder', got {cfg.trainable!r}")
    sam.image_encoder.requires_grad_(cfg.trainable == "all")
    opt = torch.optim.AdamW([p for p in sam.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    return opt, warmup_cosine(opt, cfg.steps, cfg.warmup_steps, cfg.min_lr_ratio)


def resume_training(state_path: Path, sam: Sam, opt: torch.optim.Optimizer,
                    sched: torch.optim.lr_scheduler.LRScheduler, rng: np.random.Generator, cfg: PretrainConfig,
                    log: Callable[[str], None]) -> TrainingProgress:
    """Load the training state at ``state_path`` into ``sam``, ``opt``, ``sched``, ``rng`` and
    torch's generator; where it stood. Raises ``ValueError`` for a state of another config."""
    state = torch.load(state_path, map_location="cpu", weights_only=False)
    # A state from before a knob existed was trained with that knob's default. Only the run's
    # length may change on resume (a CPU run cut to what time allows): the cosine then ends at
    # the new last step.
    saved = {**asdict(PretrainConfig()), **state["config"]}
    if {**saved, "steps": cfg.steps} != asdict(cfg):
        raise ValueError(f"{state_path} was written by another config; remove it or pass the same "
                         f"arguments (saved: {state['config']})")
    if saved["steps"] != cfg.steps:
        log(f"the schedule now ends at step {cfg.steps} (it was {saved['steps']})")
    sam.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    rng.bit_generator.state = state["numpy_rng"]
    torch.set_rng_state(state["torch_rng"])
    log(f"resumed from {state_path} at step {state['step']}")
    return TrainingProgress(state["step"], state["running"], state["history"], state["minutes"])


def pretrain_sam(sam: Sam, cfg: PretrainConfig, out_path: Path, log: Callable[[str], None] = print,
                 resume: bool = True, data_workers: int = 0) -> Dict[str, object]:
    """Train the weights ``cfg.trainable`` names on ``cfg.world``'s scenes (synthetic or photos);
    save fp16 weights to ``out_path``.
    ``data_workers``: processes drawing the scenes ahead (``scene_batches``; the same result).

    Every ``cfg.checkpoint_every`` steps the full training state (fp32 weights, optimiser,
    schedule, random generators, history) is written atomically beside ``out_path``; with
    ``resume`` a run whose state file exists continues from its last saved step, so a stopped run
    loses at most ``checkpoint_every`` steps and ends where an uninterrupted run would."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    train, heldout = training_scenes(cfg, sam.image_encoder.img_size)
    opt, sched = optimiser(sam, cfg)
    state_path = training_state_path(out_path)
    progress = TrainingProgress()
    if resume and state_path.is_file():
        progress = resume_training(state_path, sam, opt, sched, rng, cfg, log)
    first_step, running, history = progress.step, progress.running, progress.history
    sam.train()
    start = time.time()

    def minutes() -> float:
        return progress.minutes_before + (time.time() - start) / 60

    for step, batch in enumerate(scene_batches(train, first_step, cfg, data_workers), start=first_step):
        loss = train_step(sam, opt, batch, cfg, rng)
        sched.step()
        running = 0.98 * running + 0.02 * loss.item() if step else loss.item()
        if (step + 1) % 25 == 0:
            log(f"step {step + 1}/{cfg.steps} loss {running:.4f} lr {sched.get_last_lr()[0]:.2e} "
                f"{(time.time() - start) / (step + 1 - first_step):.2f} s/step")
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            metrics = quick_eval(sam, heldout, cfg.eval_images)
            history.append({"step": step + 1, "loss": running, "minutes": minutes(), **metrics})
            log(f"eval step {step + 1}: " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            save_sam_fp16(sam, out_path)
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            atomic_torch_save({"config": asdict(cfg), "step": step + 1, "running": running, "history": history,
                               "minutes": minutes(), "model": sam.state_dict(), "optimizer": opt.state_dict(),
                               "scheduler": sched.state_dict(), "numpy_rng": rng.bit_generator.state,
                               "torch_rng": torch.get_rng_state()}, state_path)
    return {"config": asdict(cfg), "history": history, "minutes": minutes()}


def refine_patch_grid(state: Dict[str, torch.Tensor], sam: Sam) -> Dict[str, torch.Tensor]:
    """Adapt the weights of a small SAM with a coarser patch (e.g. 16, a 16 x 16 grid at 256 px) to
    ``sam``'s finer one (e.g. 8, 32 x 32), to start the fine model from the cheaper coarse one
    (progressive resizing). Every weight but three kinds is shape-free and copied:

    - the patch kernel is summed over f x f blocks (f = coarse / fine patch): on an image
      upsampled f times (nearest), the fine model's tokens then equal the coarse model's exactly;
    - the absolute position table is interpolated bilinearly to the finer grid;
    - each relative-position table is re-sampled (linearly) at the fine grid's offsets measured in
      coarse cells, so a table keeps meaning the same distance in pixels.
    """
    encoder = sam.image_encoder
    fine = encoder.patch_embed.proj.kernel_size[0]
    coarse = state["image_encoder.patch_embed.proj.weight"].shape[-1]
    if coarse % fine:
        raise ValueError(f"a patch of {coarse} px cannot be refined to {fine} px")
    f = coarse // fine
    target = sam.state_dict()
    out = {}
    for key, value in state.items():
        value = value.float()
        want = target[key].shape
        if key == "image_encoder.patch_embed.proj.weight":
            o, c = value.shape[:2]
            value = value.view(o, c, fine, f, fine, f).sum(dim=(3, 5))
        elif key == "image_encoder.pos_embed":
            value = F.interpolate(value.permute(0, 3, 1, 2), size=want[1:3], mode="bilinear",
                                  align_corners=False).permute(0, 2, 3, 1)
        elif key.endswith(("rel_pos_h", "rel_pos_w")):
            old_reach, new_reach = (value.shape[0] - 1) // 2, (want[0] - 1) // 2
            offsets = torch.arange(-new_reach, new_reach + 1, dtype=torch.float32) / f  # in coarse cells
            pos = (offsets + old_reach).clamp(0, 2 * old_reach)
            lo = pos.floor().long().clamp(max=2 * old_reach - 1)
            w = (pos - lo)[:, None]
            value = value[lo] * (1 - w) + value[lo + 1] * w
        if value.shape != want:
            raise ValueError(f"{key}: cannot adapt shape {tuple(value.shape)} to {tuple(want)}")
        out[key] = value
    return out


def save_sam_fp16(sam: Sam, path: Path) -> Path:
    """Save SAM's state dict as fp16 CPU tensors (about half the size, the same masks)."""
    state = {k: v.detach().to("cpu", torch.float16) if v.is_floating_point() else v.detach().cpu()
             for k, v in sam.state_dict().items()}
    return atomic_torch_save(state, path)
