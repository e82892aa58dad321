"""Soak: N client threads x M requests of mixed valid and hostile bodies against a running backend.

Starts its own gunicorn backend on 127.0.0.1 (a free port, the small SAM, a temporary local-files
root with drawn images), or uses ``--url`` (loopback addresses only). Some hostile bodies name private
and link-local image addresses (10.0.0.1, 169.254.169.254) that the backend's SSRF guard must refuse:
this script and the backend it starts run under ``backend/testing/loopback_guard.py``, so that if the SSRF
guard regressed the connection fails (and counts as an error) instead of leaving the machine; a
``--url`` backend is not guarded by this script. Every valid body is first
sent once from one thread; then the threads send valid and hostile bodies in a seeded random mix.
Prints, per class of body, how many answers had the expected status and which did not (any 5xx,
non-JSON answer or unexpected status is an error), latency p50 / p95 / max, the worker's peak
resident memory (VmHWM; only for a backend this script started) and whether every valid answer's
masks equal the single-threaded ones.

    python scripts/soak.py [--threads 8] [--requests 50] [--time-limit 300] [--url http://127.0.0.1:9090]
                           [--limit-cost 200] [--json]

Last line with --json: {"requests", "errors", "errors_by_class", "status_by_class", "latency_ms":
{"p50", "p95", "max"}, "worker_peak_rss_mb", "valid_masks_equal", "valid_answers", "seconds", ...}.
"""

from __future__ import annotations

import argparse
import base64
import io
import ipaddress
import json
import random
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple
from urllib.parse import urlparse

import numpy as np
import requests
from PIL import Image

from backend.testing.drawn_scene import drawn_scene
from backend.testing.label_studio_regions import centroid, keypoint, loosen, recommended_config, rectangle

if TYPE_CHECKING:
    from backend.testing.local_server import Process

ROOT = Path(__file__).resolve().parents[1]
RECOMMENDED_CONFIG = recommended_config()
MAX_THREADS, MAX_REQUESTS, MAX_SECONDS = 32, 1000, 1800  # the soak's own bounds


class Body:
    """One request: method, path, JSON or raw bytes, the statuses that are right for it."""

    def __init__(self, cls: str, path: str, expect: Tuple[int, ...], payload: Any = None, raw: Optional[bytes] = None,
                 key: Optional[str] = None, method: str = "post", close: bool = False) -> None:
        self.cls, self.path, self.expect, self.payload, self.raw = cls, path, expect, payload, raw
        self.key = key  # valid bodies: compared with the single-threaded answer
        self.method = method
        # gunicorn answers a body it did not read (413 on Content-Length) with keep-alive, then
        # drops the connection when more than 64 KB of it is left: such a request goes on a
        # connection of its own, or the next request on it fails with RemoteDisconnected
        self.close = close


def predict(image: str, regions: List[dict], task_id: int = 1, config: Any = RECOMMENDED_CONFIG, **extra) -> dict:
    """A /predict body of one task (``image``) with ``regions`` as the click context."""
    out = {"tasks": [{"id": task_id, "data": {"image": image}}], "project": "1.1700000000", "label_config": config,
           "params": {"context": {"result": regions}}}
    out.update(extra)
    return out


def png_bytes(array: np.ndarray) -> bytes:
    """``array`` (H x W x 3 uint8) as PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def make_bodies(root: Path, images: int) -> Tuple[List[Body], List[Body]]:
    """(valid bodies, hostile bodies); images written under ``root`` (the local-files root)."""
    valid: List[Body] = []
    task = 0
    for i in range(images):
        sc = drawn_scene(200 + i)
        path = root / f"scene{i}.png"
        Image.fromarray(sc.image).save(path)
        # one keypoint or rectangles only: no prompt that extends an earlier one, so an answer
        # does not depend on which clicks the server saw before
        prompts = {"keypoint-0": [keypoint(*centroid(sc.masks[0]), sc.size)],
                   "keypoint-1": [keypoint(*centroid(sc.masks[1]), sc.size, rid="k1")],
                   "rectangle-0": [rectangle(loosen(sc.boxes[0], sc.size), sc.size)],
                   "two-rectangles": [rectangle(loosen(b, sc.size), sc.size, rid=f"r{j}") for j, b in enumerate(sc.boxes)]}
        for name, regions in prompts.items():
            task += 1
            valid.append(Body("valid", "/predict", (200,), predict(str(path), regions, task_id=task), key=f"{i}/{name}"))
    sc = drawn_scene(200)
    img = str(root / "scene0.png")
    kp = keypoint(*centroid(sc.masks[0]), sc.size)
    grey16 = np.asarray(Image.fromarray(sc.image).convert("L")).astype(np.uint16) * 257
    buf = io.BytesIO()
    Image.fromarray(grey16).save(buf, format="PNG")
    thin = np.random.default_rng(0).integers(0, 255, (1, 20000, 3), dtype=np.uint8)
    full = {"id": "r", "from_name": "rect", "to_name": "image", "type": "rectanglelabels",
            "value": {"x": 0, "y": 0, "width": 100, "height": 100, "rectanglelabels": ["Object"]}}
    overflow = json.dumps(predict(img, [kp])).replace(json.dumps(kp["value"]["x"]), "1" * 400, 1).encode()
    rotated = dict(rectangle(loosen(sc.boxes[0], sc.size), sc.size, rotation=30), original_width=10**9,
                   original_height=10**9)
    hostile = [
        Body("deep-json", "/predict", (400,), raw=b'{"a": ' + b"[" * 10000 + b"]" * 10000 + b"}"),
        Body("deep-json-webhook", "/webhook", (400,), raw=b"[" * 10000 + b"]" * 10000),
        Body("malformed-json", "/predict", (400,), raw=b'{"tasks": ['),
        Body("project-id-unicode", "/train", (400,), {"project": "٣"}),
        Body("project-id-huge", "/train/cancel", (400,), {"project": "1" * 5000}),
        Body("label-config-list", "/predict", (400,), predict(img, [kp], config=["<View/>"])),
        Body("schema-object", "/setup", (400,), {"project": "1.1", "schema": {"a": 1}}),
        Body("number-overflow", "/predict", (400,), raw=overflow),
        Body("claimed-size-1e9", "/predict", (200,), predict(img, [rotated], task_id=9001)),
        Body("nul-path", "/predict", (400,), predict(img.replace("scene0", "scene\x000"), [kp])),
        Body("directory-path", "/predict", (400,), predict("/data/local-files/?d=.", [kp])),
        Body("image-20000x1", "/predict", (200,), predict("data:image/png;base64," + base64.b64encode(
            png_bytes(thin)).decode(), [full], task_id=9002)),
        Body("image-16-bit", "/predict", (200,), predict("data:image/png;base64," + base64.b64encode(
            buf.getvalue()).decode(), [rectangle(loosen(sc.boxes[0], sc.size), sc.size)], task_id=9003)),
        Body("regions-10000", "/predict", (413,), predict(img, [keypoint(10 + j % 200, 10 + j % 150, sc.size, rid=f"k{j}")
                                                          for j in range(10000)])),
        Body("tasks-1001", "/predict", (413,), {"tasks": [{"id": j, "data": {"image": img}} for j in range(1001)],
                                               "label_config": RECOMMENDED_CONFIG}),
        Body("from-name-1mb", "/predict", (400,), predict(img, [dict(kp, from_name="n" * 1_000_000)])),
        Body("action-3mb", "/webhook", (200,), {"action": "A" * 3_000_000}),
        Body("wrong-control-kind", "/predict", (400,), predict(img, [dict(rectangle(loosen(sc.boxes[0], sc.size),
                                                                                    sc.size), from_name="kp")])),
        Body("unknown-label", "/predict", (400,), predict(img, [keypoint(*centroid(sc.masks[0]), sc.size, label="Car")])),
        Body("ssrf-private", "/predict", (403,), predict("http://10.0.0.1/x.png", [kp])),
        Body("ssrf-loopback", "/predict", (403,), predict("http://127.0.0.1:1/x.png", [kp])),
        Body("body-over-limit", "/predict", (413,), raw=b'{"pad": "' + b"x" * (5 * 2**20) + b'"}', close=True),
    ]
    return valid, hostile


def send(session: requests.Session, url: str, body: Body) -> Tuple[int, Optional[dict], float]:
    """POST ``body`` to ``url``: the status, the JSON answer (None when not JSON) and the seconds."""
    t = time.perf_counter()
    kwargs: Dict[str, Any] = {"timeout": 120}
    headers = {"Connection": "close"} if body.close else {}
    if body.raw is not None:
        kwargs["data"] = body.raw
        headers["Content-Type"] = "application/json"
    elif body.payload is not None:
        kwargs["json"] = body.payload
    kwargs["headers"] = headers
    r = getattr(session, body.method)(url + body.path, **kwargs)
    seconds = time.perf_counter() - t
    try:
        data = r.json()
    except ValueError:
        data = None
    return r.status_code, data if isinstance(data, dict) else None, seconds


def masks_of(data: Optional[dict]) -> Optional[List[str]]:
    """The brush RLEs of a /predict answer (each as JSON text), None when it holds no results list."""
    if not data or not isinstance(data.get("results"), list):
        return None
    out = []
    for res in data["results"]:
        for r in (res.get("result") or []) if isinstance(res, dict) else []:
            out.append(json.dumps(r["value"]["rle"]))
    return out


def loopback_only(url: str) -> None:
    """Refuse (SystemExit) a ``--url`` outside loopback: the soak sends hostile bodies."""
    host = urlparse(url).hostname or ""
    try:
        ok = ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = host == "localhost"
    if not ok:
        raise SystemExit(f"--url must be a loopback address (127.0.0.1, ::1, localhost), not {host!r}")


def worker_pid(master: int) -> Optional[int]:
    """The gunicorn worker: the master's child process."""
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                fields = (p / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == master:
                return int(p.name)
    return None


def peak_rss_mb(pid: Optional[int]) -> Optional[float]:
    """The peak resident memory of process ``pid`` in MB (None when unknown)."""
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def percentile(values: List[float], q: float) -> float:
    """The ``q`` percentile of ``values`` (0 for none)."""
    return float(np.percentile(values, q)) if values else 0.0


def parse_args() -> argparse.Namespace:
    """The command line (``--help``); SystemExit outside the soak's own bounds."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--requests", type=int, default=50, help="requests per thread")
    ap.add_argument("--hostile-share", type=float, default=0.4, help="share of hostile bodies in the mix")
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--time-limit", type=float, default=300.0, help="seconds; threads stop sending after it")
    ap.add_argument("--url", default=None, help="a backend already running on a loopback address")
    ap.add_argument("--server-threads", type=int, default=8, help="THREADS of the backend this script starts")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit-cost", type=int, default=0, metavar="N",
                    help="afterwards, time one request of N rectangles and one of N keypoints (e.g. 200, the "
                         "default MAX_REGIONS_PER_CONTEXT): what one request at the limit costs")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if not (1 <= args.threads <= MAX_THREADS and 1 <= args.requests <= MAX_REQUESTS
            and 0 < args.time_limit <= MAX_SECONDS):
        raise SystemExit(f"bounds: 1..{MAX_THREADS} threads, 1..{MAX_REQUESTS} requests each, "
                         f"time limit up to {MAX_SECONDS} s")
    return args


def start_target(args: argparse.Namespace, work: Path, media: Path) -> Tuple[Optional["Process"], str]:
    """(the backend process started here or None, its URL): ``--url`` (loopback only), else a
    gunicorn backend on a free loopback port serving ``media``, under the loopback guard."""
    from backend.testing.local_server import start_backend  # gunicorn on 127.0.0.1, a free port

    if args.url:
        loopback_only(args.url)
        url = args.url.rstrip("/")
        print(f"soak against {url} (the images must be under its LOCAL_FILES_DOCUMENT_ROOT={media})", file=sys.stderr)
        return None, url
    env = {"LOCAL_FILES_DOCUMENT_ROOT": str(media), "MODEL_DIR": str(work / "models"), "MAX_REQUEST_MB": "4",
           "THREADS": str(args.server_threads), "LABEL_STUDIO_URL": "", "LOG_LEVEL": "WARNING",
           "DEVICE": "cpu"}
    return start_backend(work, env, loopback_only=True)


def reference_answers(session: requests.Session, url: str, valid: List[Body]) -> Dict[str, List[str]]:
    """Every valid body's masks, sent once from one thread: what the concurrent answers must equal."""
    reference: Dict[str, List[str]] = {}
    for b in valid:
        status, data, _ = send(session, url, b)
        if status != 200:
            raise SystemExit(f"valid body {b.key} answered {status}: {data}")
        reference[b.key] = masks_of(data)
    return reference


class Tally:
    """What the client threads saw, under one lock: statuses and errors per class of body,
    latencies, valid answers and the keys of those whose masks differed from the reference."""

    def __init__(self, reference: Dict[str, List[str]]) -> None:
        self.reference = reference
        self.lock = threading.Lock()
        self.status_by_class: Dict[str, Counter] = defaultdict(Counter)
        self.errors_by_class: Dict[str, Counter] = defaultdict(Counter)
        self.latencies: List[float] = []
        self.mismatches: List[str] = []
        self.valid_answers = 0

    def no_answer(self, b: Body, e: Exception) -> None:
        """``b`` got no answer (a connection error)."""
        with self.lock:
            self.errors_by_class[b.cls][f"no answer: {e.__class__.__name__}: {str(e)[-120:]}"] += 1

    def answer(self, b: Body, status: int, data: Optional[dict], seconds: float) -> None:
        """``b`` was answered: an error unless JSON with an expected status under 500; a valid body's
        masks are compared with the reference."""
        with self.lock:
            self.latencies.append(seconds)
            self.status_by_class[b.cls][status] += 1
            if data is None:
                self.errors_by_class[b.cls][f"{status} not JSON"] += 1
            elif status >= 500 or status not in b.expect:
                self.errors_by_class[b.cls][f"{status}: {str(data.get('error'))[:80]}"] += 1
            if b.key is not None and status == 200:
                self.valid_answers += 1
                if masks_of(data) != self.reference[b.key]:
                    self.mismatches.append(b.key)


def run_clients(url: str, plans: List[List[Body]], deadline: float, tally: Tally) -> float:
    """One thread per plan, all starting together, each sending its bodies in order on its own
    session until ``deadline`` (``time.monotonic``); the seconds until the last one ends."""
    barrier = threading.Barrier(len(plans))

    def client(plan: List[Body]) -> None:
        s = requests.Session()
        barrier.wait()
        for b in plan:
            if time.monotonic() > deadline:
                return
            try:
                status, data, seconds = send(s, url, b)
            except requests.RequestException as e:
                tally.no_answer(b, e)
                continue
            tally.answer(b, status, data, seconds)

    t1 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(p,)) for p in plans]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t1


def limit_request_cost(session: requests.Session, url: str, image: Path, n: int) -> Dict[str, Any]:
    """The status and seconds of one request of ``n`` rectangles and one of ``n`` keypoints."""
    sc = drawn_scene(200)
    limit_cost: Dict[str, Any] = {}
    for kind, regions in (
            ("rectangles", [rectangle((j % 100, j % 80, j % 100 + 100, j % 80 + 90), sc.size, rid=f"r{j}")
                            for j in range(n)]),
            ("keypoints", [keypoint(10 + j % 200, 10 + j % 150, sc.size, rid=f"k{j}") for j in range(n)])):
        status, _, secs = send(session, url, Body("limit", "/predict", (200,),
                                                  predict(str(image), regions, task_id=9100)))
        limit_cost[kind] = {"regions": n, "status": status, "seconds": round(secs, 2)}
    return limit_cost


def soak_report(args: argparse.Namespace, tally: Tally, started_here: bool, rss: Optional[float],
                metrics: Dict[str, Any], warm_s: float, seconds: float, limit_cost: Dict[str, Any]) -> Dict[str, Any]:
    """The summary (the ``--json`` line): requests, errors and statuses per class, latency, memory,
    masks, encoder calls, times and, with ``--limit-cost``, the request at the limit."""
    ms = [1000 * x for x in tally.latencies]
    out = {
        "requests": len(tally.latencies), "planned": args.threads * args.requests, "threads": args.threads,
        "server_threads": args.server_threads if started_here else None,
        "hostile_share": args.hostile_share, "errors": sum(sum(c.values()) for c in tally.errors_by_class.values()),
        "errors_by_class": {k: dict(v) for k, v in sorted(tally.errors_by_class.items())},
        "status_by_class": {k: {str(s): n for s, n in sorted(v.items())}
                            for k, v in sorted(tally.status_by_class.items())},
        "latency_ms": {"p50": round(percentile(ms, 50), 1), "p95": round(percentile(ms, 95), 1),
                       "max": round(max(ms), 1) if ms else 0.0},
        "worker_peak_rss_mb": rss,
        "valid_answers": tally.valid_answers, "valid_masks_equal": not tally.mismatches,
        "mask_mismatches": len(tally.mismatches),
        "encoder_calls": metrics.get("model_encoder_calls_total", metrics.get("encoder_calls_total")),
        "single_thread_warmup_s": round(warm_s, 1), "seconds": round(seconds, 1),
    }
    if limit_cost:
        out["limit_request"] = limit_cost
    return out


def print_summary(args: argparse.Namespace, out: Dict[str, Any], tally: Tally) -> None:
    """The summary lines: requests and errors, statuses per class, latency, memory, masks, limit cost."""
    print(f"{out['requests']} of {out['planned']} requests ({args.threads} threads, {args.hostile_share:.0%} hostile) "
          f"in {out['seconds']} s: {out['errors']} errors")
    for cls in sorted(tally.status_by_class):
        bad = dict(tally.errors_by_class.get(cls, {}))
        print(f"  {cls:22s} {dict(tally.status_by_class[cls])}{'  ERRORS ' + str(bad) if bad else ''}")
    for cls in sorted(set(tally.errors_by_class) - set(tally.status_by_class)):
        print(f"  {cls:22s} ERRORS {dict(tally.errors_by_class[cls])}")
    lat, rss = out["latency_ms"], out["worker_peak_rss_mb"]
    print(f"latency p50 {lat['p50']} ms, p95 {lat['p95']} ms, max {lat['max']} ms; worker peak RSS "
          f"{rss if rss is not None else 'unknown'} MB; valid masks equal to the single-threaded ones: "
          f"{out['valid_masks_equal']} ({tally.valid_answers} answers)")
    for kind, c in out.get("limit_request", {}).items():
        print(f"one request of {c['regions']} {kind}: {c['status']} in {c['seconds']} s")


def main() -> None:
    """Run the soak (``--help``) and print its summary."""
    args = parse_args()
    from backend.testing import loopback_guard

    loopback_guard.install()  # this process only talks to the backend on loopback

    work = Path(tempfile.mkdtemp(prefix="soak-"))
    media = work / "media"
    media.mkdir()
    valid, hostile = make_bodies(media, args.images)
    proc, url = start_target(args, work, media)
    try:
        session = requests.Session()
        t0 = time.perf_counter()
        tally = Tally(reference_answers(session, url, valid))  # single-threaded answers first
        warm_s = time.perf_counter() - t0

        rng = random.Random(args.seed)
        plans = [[rng.choice(hostile) if rng.random() < args.hostile_share else rng.choice(valid)
                  for _ in range(args.requests)] for _ in range(args.threads)]
        seconds = run_clients(url, plans, time.monotonic() + args.time_limit, tally)
        rss = peak_rss_mb(worker_pid(proc.proc.pid)) if proc is not None else None
        limit_cost = limit_request_cost(session, url, media / "scene0.png", args.limit_cost) if args.limit_cost else {}
        metrics = session.get(f"{url}/metrics", params={"format": "json"}, timeout=30).json()
    finally:
        if proc is not None:
            proc.stop()

    # connections the guard refused, here and in the backend (its log): each an SSRF guard regression
    outside = len(loopback_guard.refused) + (proc.log_tail(10**8).count("loopback_guard: refused") if proc else 0)
    if outside:
        tally.errors_by_class["connection outside loopback"]["refused by backend/testing/loopback_guard.py"] += outside
    out = soak_report(args, tally, proc is not None, rss, metrics, warm_s, seconds, limit_cost)
    print_summary(args, out, tally)
    if args.json:
        print(json.dumps(out))
    if out["errors"] or tally.mismatches:
        sys.exit(1)


if __name__ == "__main__":
    main()
