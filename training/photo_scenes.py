"""Photographs as training scenes for the small SAM: folder datasets, augmented.

``PhotoScenes(datasets, size, seed)`` is an endless sequence of ``Scene``: scene ``i`` is one photo
(the photos are walked epoch by epoch, each epoch in its own seeded order) with large-scale jitter
(zoomed by a log-uniform factor around the fit to ``size``, then a random ``size`` x ``size`` crop
where it overflows), a horizontal flip and a colour jitter (brightness, contrast, saturation, hue).
Every draw comes from a generator seeded by (seed, i), so a scene is a pure function of its index,
as the synthetic worlds' are (training state can resume, and workers can draw ahead).

``augment=False`` gives the photos in order, only resized to fit ``size``: the validation view.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from stable_sam.data.dataset import SegmentationDataset
from stable_sam.data.synthetic import Scene

# Objects smaller than this many pixels after the crop are not prompted for: a box or a click on a
# few pixels teaches nothing and makes the loss noisy.
MIN_TARGET_AREA = 24


def _resize_mask(mask: np.ndarray, size: Tuple[int, int], box: Optional[Tuple[float, ...]] = None) -> np.ndarray:
    """H x W bool (its ``box`` region, source pixels, when given) -> size (w, h) bool; bilinear then
    thresholded, so thin parts survive a shrink about as well as they would in an image."""
    im = Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.BILINEAR, box=box)
    return np.asarray(im) > 127


class PhotoScenes(Sequence[Scene]):
    """Scenes from ``datasets`` (each a ``SegmentationDataset`` of photos with object masks) at an
    encoder input of ``size`` px. ``zoom``: the (min, max) factor applied to the fit-to-``size``
    scale, drawn log-uniformly; ``colour``: the jitter strength (0 = none)."""

    def __init__(self, datasets: Sequence[SegmentationDataset], size: int = 256, seed: int = 0,
                 augment: bool = True, zoom: Tuple[float, float] = (0.75, 2.0), colour: float = 0.3) -> None:
        self.items: List[Tuple[SegmentationDataset, int]] = [(ds, i) for ds in datasets for i in range(len(ds))]
        if not self.items:
            raise ValueError("no photos to train on")
        self.size, self.seed, self.augment, self.zoom, self.colour = size, seed, augment, zoom, colour

    def __len__(self) -> int:
        # Augmented scenes never run out (the training loop asks for step * batch + i); the
        # validation view has one scene per photo.
        return 2**62 if self.augment else len(self.items)

    def photo_index(self, index: int) -> int:
        """Which photo scene ``index`` shows: epoch ``index // n`` walks the n photos in an order
        seeded by (seed, epoch)."""
        n = len(self.items)
        if not self.augment:
            return index
        epoch, pos = divmod(index, n)
        return int(np.random.default_rng([self.seed, epoch]).permutation(n)[pos])

    def __getitem__(self, index: int) -> Scene:  # type: ignore[override]
        if not 0 <= index < len(self):
            raise IndexError(index)
        ds, i = self.items[self.photo_index(index)]
        sample = ds[i]
        if not self.augment:
            return self._fit(sample.image, sample.masks)
        return self._augmented(sample.image, sample.masks, np.random.default_rng([self.seed, index, 1]))

    def _fit(self, image: np.ndarray, masks: Sequence[np.ndarray]) -> Scene:
        h, w = image.shape[:2]
        scale = self.size / max(h, w)
        new = (max(1, round(w * scale)), max(1, round(h * scale)))
        img = np.asarray(Image.fromarray(image).resize(new, Image.BILINEAR))
        out = [m for m in (_resize_mask(m, new) for m in masks) if m.sum() >= MIN_TARGET_AREA]
        return Scene(image=img, masks=out, kinds=["photo"] * len(out))

    def _augmented(self, image: np.ndarray, masks: Sequence[np.ndarray], rng: np.random.Generator) -> Scene:
        h, w = image.shape[:2]
        lo, hi = np.log(self.zoom[0]), np.log(self.zoom[1])
        scale = self.size / max(h, w) * float(np.exp(rng.uniform(lo, hi)))
        rw, rh = max(1, round(w * scale)), max(1, round(h * scale))
        # The crop window in the resized image; where the image is smaller it is kept whole and
        # SAM's padding (bottom and right) fills the rest.
        cw, ch = min(rw, self.size), min(rh, self.size)
        x0, y0 = int(rng.integers(0, rw - cw + 1)), int(rng.integers(0, rh - ch + 1))
        flip = bool(rng.random() < 0.5)
        # Crop in the source image's coordinates first, so only the kept part is resampled.
        sx0, sy0 = x0 / scale, y0 / scale
        box = (sx0, sy0, min(w, sx0 + cw / scale), min(h, sy0 + ch / scale))
        pil = Image.fromarray(image).resize((cw, ch), Image.BILINEAR, box=box)
        if self.colour > 0:
            c = self.colour
            t = torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1)
            t = TF.adjust_brightness(t, float(rng.uniform(1 - c, 1 + c)))
            t = TF.adjust_contrast(t, float(rng.uniform(1 - c, 1 + c)))
            t = TF.adjust_saturation(t, float(rng.uniform(1 - c, 1 + c)))
            t = TF.adjust_hue(t, float(rng.uniform(-c / 6, c / 6)))
            img = t.permute(1, 2, 0).numpy()
        else:
            img = np.asarray(pil)
        out = []
        for m in masks:
            mk = _resize_mask(m, (cw, ch), box)
            if mk.sum() >= MIN_TARGET_AREA:
                out.append(mk[:, ::-1] if flip else mk)
        if flip:
            img = img[:, ::-1]
        return Scene(image=np.ascontiguousarray(img), masks=[np.ascontiguousarray(m) for m in out],
                     kinds=["photo"] * len(out))
