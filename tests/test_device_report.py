"""``scripts/device_report.py --device cpu --quick``: every part runs on tiny sizes, the JSON file and
the last printed line hold the same report, and every figure is a positive number. (The figures'
values are the GPU run's business, never asserted here.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, Tuple

import pytest

pytestmark = pytest.mark.slow  # runs scripts/device_report.py in subprocesses

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "device_report.py"
PARTS = ("encoder", "decoder", "app_click", "preannotate", "rts", "decoder_compiled")
PROMPT_KINDS = ("click", "box", "box_2_clicks", "many_boxes", "many_boxes_one_per_call")
# Figures a CPU cannot give (GPU memory): present, and None on CPU.
GPU_ONLY = {"weights_mib", "peak_mib_fp32", "peak_mib_bf16"}
# Figures that may honestly be zero: the decoder stage never waiting, a mask without runs.
MAY_BE_ZERO = {"waited_for_encoder", "mask_runs_per_row", "sam", "stable_sam", "graph_breaks"}


def run_report(tmp_path: Path, *args: str) -> Tuple[Dict[str, Any], Dict[str, Any], str]:
    out = tmp_path / "report.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MODEL_DIR": str(tmp_path / "models")}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--threads", "1", "--json",
                           "--out", str(out), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout.strip().splitlines()[-1])
    return printed, json.loads(out.read_text()), proc.stdout


def numbers(tree: Any, path: str = "") -> Iterator[Tuple[str, Any]]:
    """Every leaf of a JSON tree with its path."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from numbers(v, f"{path}.{k}")
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from numbers(v, f"{path}[{i}]")
    else:
        yield path, tree


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory) -> Tuple[Dict[str, Any], Dict[str, Any], str]:
    return run_report(tmp_path_factory.mktemp("device-report"))


def test_every_part_runs_and_the_file_matches_the_last_line(quick_report):
    printed, written, stdout = quick_report
    assert printed == written
    assert written["complete"] is True and written["running"] is None and written["quick"] is True
    assert written["device"]["type"] == "cpu"
    assert tuple(written["parts"]) == PARTS
    # the GPU targets need ViT-H / ViT-B: a quick run reports them as not measured
    assert set(written["targets"]) == {"decoder_ratio_vit_h", "app_click_ratio_vit_h", "app_click_p50_ms_vit_h",
                                       "preannotate_ratio_vit_b"}
    assert all(t["met"] is None and t["target"] for t in written["targets"].values())
    for name, entry in written["parts"].items():
        assert entry["status"] == "ok", (name, entry.get("error"), entry.get("traceback"))
        assert entry["seconds"] > 0 and entry["results"]
        assert f"## {name}: ok" in stdout  # the table


def test_figures_are_positive_numbers(quick_report):
    _, report, _ = quick_report
    parts = report["parts"]
    for name, entry in parts.items():
        for path, value in numbers(entry["results"], name):
            key = path.rsplit(".", 1)[-1]
            if key in GPU_ONLY:
                assert value is None, path
            elif isinstance(value, bool) or isinstance(value, str):
                continue
            else:
                assert isinstance(value, (int, float)), (path, value)
                assert value >= 0 if key in MAY_BE_ZERO else value > 0, (path, value)

    enc = parts["encoder"]["results"]["sam_tiny"]
    assert {"fp32_ms", "bf16_ms", "bf16_speedup", "peak_mib_fp32", "peak_mib_bf16", "bf16_rel_err"} <= set(enc)
    dec = parts["decoder"]["results"]["sam_tiny"]
    assert tuple(dec["kinds"]) == PROMPT_KINDS
    for kind in dec["kinds"].values():
        assert {"sam_ms", "stable_sam_ms", "ratio"} <= set(kind)
        assert kind["ratio"] == pytest.approx(kind["stable_sam_ms"] / kind["sam_ms"], rel=1e-2)
    assert {"plugin_ms", "projection_ms", "batching_speedup"} <= set(dec)
    app = parts["app_click"]["results"]
    assert {"p50_ms", "p95_ms"} <= set(app["cached_click"]) and {"p50_ms", "p95_ms"} <= set(app["predictor"])
    assert app["encoder_calls"] == app["images"]  # every later click of an image is decoder-only
    pre = parts["preannotate"]["results"]
    assert {"encoder_limit_images_per_s", "encode_ahead_stream_images_per_s", "encode_ahead_images_per_s",
            "serial_images_per_s", "encode_ahead_stream_ratio"} <= set(pre)
    assert pre["identical_output"] is True
    rts = parts["rts"]["results"]
    assert rts["images"] >= 1 and rts["s_per_image"] == pytest.approx(rts["seconds"] / rts["images"], rel=1e-2)
    compiled = parts["decoder_compiled"]["results"]
    assert set(compiled["compiled"]) == set(compiled["eager"]) and compiled["compiled"]
    for kind, diff in compiled["max_logit_diff"].items():  # the compiled decoder makes the eager masks
        assert diff["sam"] < 1e-3 and diff["stable_sam"] < 1e-3 and diff["plugin_vs_plain"] > 1e-3, (kind, diff)


def test_a_run_out_of_time_skips_parts_and_still_writes_its_report(tmp_path):
    printed, written, _ = run_report(tmp_path, "--budget-s", "1", "--parts", "encoder,decoder")
    assert printed == written and written["complete"] is True
    assert [e["status"] for e in written["parts"].values()] == ["skipped", "skipped"]
