"""Batch pre-annotation: many images, many prompts each, masks out (COCO RLE, PNG, Label Studio).

The job is split so that the same pieces run on one machine or on many workers (they share no
state and their output does not depend on the order images finish in):

- ``items``: the work list. Inputs (a COCO file with boxes, a CSV of boxes / points, a bare folder)
  become ``WorkItem`` s in a deterministic order, each with its image id and object prompts.
- ``segment``: the pure per-image function ``annotate_image(model, item, image)`` -> an
  ``ImageResult`` whose ``record`` is JSON (pycocotools RLE, rounded scores), deterministic for a
  given model and image.
- ``automatic``: SAM's automatic mask generator (point grid, stability filtering, NMS) run through
  Stable-SAM, for images without prompts.
- ``output``: per-image records -> the final COCO JSON, merged in input order (annotation ids from
  that order, never from completion order), written atomically; optional PNG masks.
- ``journal``: the JSON-lines journal of a run (single-machine or Ray), so a restart skips finished images.
- ``readahead``: background stages (read, encode) so the encoder never waits on I/O.
- ``offline``: the single-machine offline job over all of these (its stages: ``ImagePipeline``).
- ``ray_job``: the same job on a Ray cluster, shards on one worker per GPU / CPU slot; imports Ray
  only when it runs (not exported here: the single-machine path never loads it).
"""

from .automatic import AutoConfig, automatic_masks
from .items import InputError, ObjectSpec, WorkItem, WorkList, items_from_coco, items_from_csv, items_from_folder
from .offline import OfflineSummary, run_offline
from .output import build_coco
from .segment import ImageResult, annotate_image

__all__ = [
    "AutoConfig", "automatic_masks", "InputError", "ObjectSpec", "WorkItem", "WorkList", "items_from_coco",
    "items_from_csv", "items_from_folder", "OfflineSummary", "run_offline", "build_coco",
    "ImageResult", "annotate_image",
]
