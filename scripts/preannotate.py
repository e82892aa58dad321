"""Batch pre-annotation with Stable-SAM: rough boxes / points in, masks out.

Label Studio: every task of a project (or a Data Manager tab) gets its rough rectangles / keypoints
turned into brush masks, uploaded as predictions of the model's version. Tasks that already have a
prediction of that version are skipped, so the command can be re-run (or resumed) safely:

    python scripts/preannotate.py label-studio --project 3 [--view 7] [--source annotations|predictions|any]
        [--auto] [--limit 100] [--dry-run] [--url http://localhost:8080 --api-key KEY]

Offline: a folder of images and a COCO JSON with boxes (or a CSV of boxes / points) in; a COCO JSON
with RLE masks out (and PNG masks). A killed run restarted with the same arguments does only what
is missing (the journal is ``<out>.journal.jsonl``):

    python scripts/preannotate.py offline --images imgs/ --coco boxes.json --out masks.json [--png-dir masks/]
    python scripts/preannotate.py offline --images imgs/ --csv prompts.csv --out masks.json
    python scripts/preannotate.py offline --images imgs/ --out masks.json      # no prompts: automatic masks

On a Ray cluster (``pip install -r requirements-ray.txt``): the same job, its shards on one Ray
worker per GPU (else per CPU); the same output and journal, so either way resumes the other:

    python scripts/preannotate.py offline --ray-address auto|host:6379|ray://host:10001|local \
        --images imgs/ --coco boxes.json --out masks.json [--workers N] [--shard-size 16]

The Label Studio mode too: the workers upload the predictions (the Label Studio URL and key go to
them); tasks with a prediction of the version are skipped, so either way resumes the other:

    python scripts/preannotate.py label-studio --project 3 --ray-address auto [--workers N] [--shard-size 16]

CSV columns: image, x0, y0, x1, y1 (a box) and / or x, y (a point), positive (1/0), label, object
(rows of one image with the same object value make one prompt). ``--auto``: images / tasks without
prompts get SAM's automatic masks (grid of points, stability filter, NMS).

The model: SAM_MODEL_TYPE / SAM_CHECKPOINT / PLUGIN_CHECKPOINT / DEVICE as for the backend, or the
flags. Exit status 0: all done; 1: some images / tasks failed (listed at the end); 2: bad input.
With --json the last line is the run's summary as one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import os
import sys
from pathlib import Path

import torch

from backend.errors import BadInput
from backend.server_settings import BackendSettings, SettingsError
from stable_sam.builders import MODEL_TYPES, build_from_settings
from stable_sam.data.dataset import DatasetError
from stable_sam.download import CheckpointError
from stable_sam.preannotation import (AutoConfig, InputError, items_from_coco, items_from_csv,
                                      items_from_folder, run_offline)
from stable_sam.settings import ModelSettings

EXPECTED = (BadInput, SettingsError, CheckpointError, InputError, DatasetError)
ENCODE_AHEAD = {"auto": None, "on": True, "off": False}  # --encode-ahead


def _settings(args) -> BackendSettings:
    """The backend's settings from the environment, with the command line on top."""
    s = BackendSettings.from_env()
    over = {"sam_model_type": args.model_type, "sam_checkpoint": args.checkpoint,
            "plugin_checkpoint": args.plugin, "device": args.device}
    return dataclasses.replace(s, **{k: v for k, v in over.items() if v is not None})


def _auto(args, model_type: str):
    if not args.auto:
        return None
    try:
        return AutoConfig.for_model(model_type, points_per_side=args.points_per_side,
                                    pred_iou_thresh=args.pred_iou_thresh,
                                    stability_score_thresh=args.stability_thresh, box_nms_thresh=args.nms_thresh)
    except ValueError as e:
        raise InputError(f"automatic mode: {e}") from None


def _print_failures(failed, what: str) -> None:
    if failed:
        print(f"{len(failed)} {what} failed:", file=sys.stderr)
        for name, message in failed:
            print(f"  {name}: {message}", file=sys.stderr)


def cmd_offline(args) -> int:
    """``preannotate offline``: an image folder (COCO or CSV prompts) to COCO JSON; the exit code."""
    if args.coco and args.csv:
        raise InputError("give --coco or --csv, not both")
    if args.coco:
        work = items_from_coco(args.coco, args.images)
    elif args.csv:
        work = items_from_csv(args.csv, args.images)
    else:
        work = items_from_folder(args.images, label=args.auto_label or "object")
        args.auto = True  # a bare folder has no prompts: automatic masks are the only kind
    settings = _settings(args)
    auto = _auto(args, settings.sam_model_type)
    if args.ray_address:
        return _offline_on_ray(args, work, settings, auto)
    if args.workers is not None:
        raise InputError("--workers needs --ray-address (without it the job runs in this process)")
    model = build_from_settings(settings)
    print(f"{model.version} on {model.device}: {len(work.items)} images from {work.source}", file=sys.stderr)
    summary = run_offline(model, work, args.out, png_dir=args.png_dir, auto=auto,
                          auto_label=args.auto_label or "object", limit=args.limit, fresh=args.fresh,
                          read_ahead=args.read_ahead, encode_ahead=ENCODE_AHEAD[args.encode_ahead],
                          progress=not args.no_progress, min_region_px=settings.mask_min_region_px)
    print(f"{summary.processed} images pre-annotated now ({summary.already_done} by an earlier run), "
          f"{summary.objects} masks in {summary.output}; {summary.images_per_s:.2f} images/s", file=sys.stderr)
    _print_failures(summary.failed, "images")
    if args.json:
        print(json.dumps(dict(summary.to_json(), model_version=model.version)))
    return 1 if summary.failed else 0


def _offline_on_ray(args, work, settings: BackendSettings, auto) -> int:
    """The offline job on the Ray cluster at --ray-address; Ray is imported only here."""
    from stable_sam.preannotation.ray_job import connect, run_offline_ray

    connect_s = connect(args.ray_address)
    # the workers get the model's settings only: no Label Studio key or password goes to the cluster
    model_settings = ModelSettings(**{f.name: getattr(settings, f.name) for f in dataclasses.fields(ModelSettings)})
    summary = run_offline_ray(
        functools.partial(build_from_settings, model_settings), work, args.out, png_dir=args.png_dir, auto=auto,
        auto_label=args.auto_label or "object", limit=args.limit, fresh=args.fresh, use_gpu=_use_gpu(settings),
        encode_ahead=ENCODE_AHEAD[args.encode_ahead], min_region_px=settings.mask_min_region_px,
        **_on_ray_options(args))
    print(f"{summary.model_version} on {summary.workers} Ray worker(s) ({summary.device}; connected in "
          f"{connect_s:.1f} s, models loaded in {summary.startup_s:.1f} s): {summary.processed} images pre-annotated "
          f"now ({summary.already_done} by an earlier run), {summary.objects} masks in {summary.output}; "
          f"{summary.images_per_s:.2f} images/s; {summary.retried_shards} shard(s) retried", file=sys.stderr)
    _print_failures(summary.failed, "images")
    if args.json:
        print(json.dumps(dict(summary.to_json(), connect_s=round(connect_s, 3))))
    return 1 if summary.failed else 0


def _use_gpu(settings: BackendSettings):
    """Ray workers on GPUs (True), on CPUs (False), or on GPUs where the cluster has some (None)."""
    device = settings.device.strip().lower()
    return False if device == "cpu" else True if device.startswith("cuda") else None


def _on_ray_options(args) -> dict:
    return dict(workers=args.workers, shard_size=args.shard_size, cpus_per_worker=args.cpus_per_worker,
                threads=args.threads, read_ahead=args.read_ahead, progress=not args.no_progress)


def cmd_label_studio(args) -> int:
    """``preannotate label-studio``: a Label Studio project's tasks to predictions; the exit code."""
    from backend.label_studio import connect
    from backend.ml_backend import StableSamBackend
    from backend.project_preannotation import run_label_studio

    if args.workers is not None and not args.ray_address:
        raise InputError("--workers needs --ray-address (without it the job runs in this process)")
    settings = _settings(args)
    settings = dataclasses.replace(
        settings, label_studio_url=(args.url or settings.label_studio_url).rstrip("/"),
        label_studio_api_key=args.api_key or settings.label_studio_api_key,
        # every image read ahead must still be in the URL cache when its task is decoded
        image_cache_items=max(settings.image_cache_items, 2 * args.read_ahead + 2))
    client = connect(settings.label_studio_url, settings.label_studio_api_key)
    if args.ray_address:
        return _label_studio_on_ray(args, client, settings)
    backend = StableSamBackend(settings, model=build_from_settings(settings))
    print(f"{backend.model.model_id} on {backend.model.device}: project {args.project}"
          f"{f' view {args.view}' if args.view else ''} at {settings.label_studio_url}"
          f"{' (dry run: nothing is uploaded)' if args.dry_run else ''}", file=sys.stderr)
    summary = run_label_studio(client, backend, args.project, view=args.view, source=args.source,
                               auto=_auto(args, settings.sam_model_type), auto_label=args.auto_label,
                               limit=args.limit, dry_run=args.dry_run, read_ahead=args.read_ahead,
                               progress=not args.no_progress)
    return _label_studio_report(args, summary)


def _label_studio_report(args, summary, where: str = "") -> int:
    done = f"{summary.would_upload} predictions would be uploaded" if args.dry_run else \
        f"{summary.uploaded} predictions uploaded"
    print(f"{summary.model_version}{where}: {summary.processed} tasks pre-annotated ({summary.masks} masks), {done}; "
          f"skipped: {summary.skipped_done} already done, {summary.no_prompts} without prompts, {summary.empty} with "
          f"no mask; {summary.images_per_s:.2f} images/s", file=sys.stderr)
    _print_failures(summary.failed, "tasks")
    if args.json:
        print(json.dumps(summary.to_json()))
    return 1 if summary.failed else 0


def _label_studio_on_ray(args, client, settings: BackendSettings) -> int:
    """The Label Studio job on the Ray cluster at --ray-address; Ray is imported only here. The
    workers upload the predictions themselves: the Label Studio URL and key go to them."""
    from backend.project_preannotation_ray import run_label_studio_ray
    from stable_sam.preannotation.ray_job import connect

    connect_s = connect(args.ray_address)
    print(f"project {args.project}{f' view {args.view}' if args.view else ''} at {settings.label_studio_url} on "
          f"the Ray cluster at {args.ray_address}{' (dry run: nothing is uploaded)' if args.dry_run else ''}",
          file=sys.stderr)
    summary = run_label_studio_ray(client, settings, args.project, view=args.view, source=args.source,
                                   auto=_auto(args, settings.sam_model_type), auto_label=args.auto_label,
                                   limit=args.limit, dry_run=args.dry_run, use_gpu=_use_gpu(settings),
                                   **_on_ray_options(args))
    return _label_studio_report(args, summary, f" on {summary.workers} Ray worker(s) ({summary.device}; connected "
                                               f"in {connect_s:.1f} s, ready in {summary.startup_s:.1f} s; "
                                               f"{summary.retried_shards} shard(s) retried)")


def parser() -> argparse.ArgumentParser:
    """The command line: the ``offline`` and ``label-studio`` modes and their options."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("model (default: the environment, as the backend reads it)")
    g.add_argument("--model-type", choices=MODEL_TYPES, default=None)
    g.add_argument("--checkpoint", type=Path, default=None, help="SAM weights")
    g.add_argument("--plugin", type=Path, default=None, help="a Stable-SAM plugin checkpoint")
    g.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:N")
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads per stage (0: torch's default)")
    a = common.add_argument_group("automatic masks (SAM's generator) for images / tasks without prompts")
    a.add_argument("--auto", action="store_true", help="segment images / tasks without prompts automatically")
    a.add_argument("--auto-label", default=None, help="the label / category automatic masks get")
    a.add_argument("--points-per-side", type=int, default=None, help="grid side (default 16)")
    a.add_argument("--pred-iou-thresh", type=float, default=None, help="SAM's predicted-IoU filter")
    a.add_argument("--stability-thresh", type=float, default=None, help="SAM's stability-score filter")
    a.add_argument("--nms-thresh", type=float, default=None, help="box NMS IoU (default 0.7)")
    r = common.add_argument_group("run")
    r.add_argument("--limit", type=int, default=None, help="pre-annotate at most this many images / tasks")
    r.add_argument("--read-ahead", type=int, default=4, help="images read (and encoded) ahead in the background")
    r.add_argument("--no-progress", action="store_true")
    r.add_argument("--json", action="store_true", help="print the summary as one JSON object, last line")
    ray = common.add_argument_group("on a Ray cluster (needs requirements-ray.txt)")
    ray.add_argument("--ray-address", default=None,
                     help="auto, host:port, ray://host:port, or local (a cluster of this machine, started here)")
    ray.add_argument("--workers", type=int, default=None,
                     help="Ray workers, each with its own model (default: one per GPU, else per --cpus-per-worker)")
    ray.add_argument("--shard-size", type=int, default=16, help="images / tasks per shard sent to a worker")
    ray.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs each Ray worker reserves")

    ls = sub.add_parser("label-studio", aliases=["ls"], parents=[common], help="pre-annotate a Label Studio project")
    ls.add_argument("--project", type=int, required=True)
    ls.add_argument("--view", type=int, default=None, help="a Data Manager tab id: only its (filtered) tasks")
    ls.add_argument("--source", choices=("any", "annotations", "predictions"), default="any",
                    help="where the rough prompts come from (any: newest annotation with prompts, else prediction)")
    ls.add_argument("--url", default=None, help="Label Studio URL (default LABEL_STUDIO_URL)")
    ls.add_argument("--api-key", default=None, help="legacy or personal access token (default LABEL_STUDIO_API_KEY)")
    ls.add_argument("--dry-run", action="store_true", help="compute the masks, upload nothing")
    ls.set_defaults(run=cmd_label_studio)

    off = sub.add_parser("offline", parents=[common], help="a folder of images + boxes -> COCO JSON with RLE masks")
    off.add_argument("--images", type=Path, required=True, help="the image folder (file names are relative to it)")
    off.add_argument("--coco", type=Path, default=None, help="COCO JSON with boxes (bbox) per annotation")
    off.add_argument("--csv", type=Path, default=None, help="CSV of boxes / points")
    off.add_argument("--out", type=Path, required=True, help="output COCO JSON (RLE masks)")
    off.add_argument("--png-dir", type=Path, default=None, help="also write <stem>_mask_<k>.png per mask here")
    off.add_argument("--fresh", action="store_true", help="ignore the journal of an earlier run; start over")
    off.add_argument("--encode-ahead", choices=("auto", "on", "off"), default="auto",
                     help="encode the next images in a second thread: auto = on a GPU, or on CPU when two stages' "
                          "torch threads fit the cores (--threads); off = encode in the decoding thread")
    off.set_defaults(run=cmd_offline)
    return ap


def main(argv=None) -> int:
    """Run the mode the command line names; the exit code (2: bad input)."""
    args = parser().parse_args(argv)
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "WARNING").upper(),
                        format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return args.run(args)
    except EXPECTED as e:
        print(f"error: {e.message if isinstance(e, BadInput) else e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
