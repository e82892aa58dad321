"""The research code (research/): the same-set oracle (the plugin against fine-tuning SAM's own
attention on one small set)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from research.same_set_oracle import attention_finetuned, attention_module, fit_plugin
from stable_sam.data.synthetic import TRAIN_SEED
from stable_sam.data.synthetic_split import SyntheticSplit
from stable_sam.evaluation import PROMPT_TYPES
from stable_sam.rts import RTSConfig
from test_rts import one_thread  # noqa: F401 - its autouse fixture: one torch thread in this module, restored after

ROOT = Path(__file__).resolve().parents[1]


def _train_set(n=6):
    return SyntheticSplit(TRAIN_SEED, start=100_000, count=n)


@pytest.mark.slow  # trains for seconds
def test_oracle_fine_tunes_sams_attention_and_puts_it_back(tiny_model):
    ds = _train_set(1)
    module = attention_module(tiny_model)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    cfg = RTSConfig(epochs=2, probe_images=0)
    with attention_finetuned(tiny_model, ds, cfg) as losses:
        assert len(losses) == 2 * sum(1 for i in range(len(ds)) if ds[i].masks)
        assert any(not torch.equal(v, before[k]) for k, v in module.state_dict().items())
        assert not any(p.requires_grad for p in module.parameters())
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())   # SAM restored
    assert all(p.grad is None for p in module.parameters())  # and no gradient left on the shared model
    plugin, _ = fit_plugin(tiny_model, ds, cfg)
    assert not plugin.training and plugin.dsp.offset.weight.abs().sum() > 0


@pytest.mark.slow  # runs a script in a subprocess
def test_oracle_script_trains_on_one_set_and_evaluates_on_another():
    cmd = [sys.executable, "-m", "research.run_same_set_oracle", "--images", "1", "--epochs", "1", "--prompts", "2",
           "--eval-dataset", "regions:heldout", "--eval-start", "1000", "--eval-images", "1", "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "evaluated on regions heldout scenes 1000..1000" in done.stdout
    last = json.loads(done.stdout.strip().splitlines()[-1])
    assert list(last) == ["sam", "plugin", "attention fine-tune"]
    for row in last.values():
        assert set(row) == set(PROMPT_TYPES) | {"gt_minus_noisy04", "point3_minus_point1"}
        assert row["gt_minus_noisy04"] == pytest.approx(row["gt_box"] - row["noisy_box_0.4"], abs=0.011)
    bad = subprocess.run(cmd[:3] + ["--eval-dataset", "regions:nowhere", "--eval-images", "1"], capture_output=True,
                         text=True, timeout=120, cwd=ROOT)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
