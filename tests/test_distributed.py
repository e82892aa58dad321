"""RTS under data parallelism: two CPU processes (gloo), as ``torchrun --nproc_per_node 2`` runs them.

Each rank encodes and prompts its own share of the images; the plugin's gradients are averaged
before every step, so both ranks end with the same weights, which moved away from the start, and
the counts in the summary are the whole data set's.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.slow  # two gloo processes

IMAGES = 5  # odd: the last step has an image for rank 0 only, rank 1 still joins the all-reduce


def _rank_main(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from stable_sam.builders import build
    from stable_sam.data.sources import open_dataset
    from stable_sam.distributed import init_from_env
    from stable_sam.modeling.plugin import StableSamPlugin
    from stable_sam.rts import RTSConfig, finetune

    group = init_from_env("cpu")
    assert (group.rank, group.world) == (rank, world)
    model = build("sam_tiny", device="cpu")
    data = open_dataset("synthetic:train", limit=IMAGES, start=100_000)
    start = {k: v.clone() for k, v in StableSamPlugin().state_dict().items()}
    plugin, version, summary = finetune(model, data, Path(out_dir) / "plugin.pt",
                                        RTSConfig(prompts_per_object=1, probe_images=1, lr=1e-2),
                                        progress=False, log=lambda s: None)
    torch.save({"state": plugin.state_dict(), "start": start, "version": version, "summary": summary},
               Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_two_gloo_processes_end_with_the_same_plugin(tmp_path):
    from ls_server import free_port
    from stable_sam.checkpoint import load_plugin

    mp.spawn(_rank_main, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["state"].keys() == r1["state"].keys()
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    moved = max(float((r0["state"][k].float() - r0["start"][k].float()).abs().max()) for k in r0["state"])
    assert moved > 1e-4, "training did not change the plugin"
    assert r0["version"] == r1["version"]
    s = r0["summary"]
    assert s["processes"] == 2 and s["images"] == IMAGES and s["steps"] == 3  # ceil(5 / (1 image x 2 ranks))
    for key in ("images", "objects", "prompts", "prompt_kinds", "steps", "probe_loss_after"):
        assert s[key] == r1["summary"][key], key  # whole-run figures; each rank keeps its own loss curve
    saved = load_plugin(tmp_path / "plugin.pt")  # written once, by rank 0, with the same weights
    assert saved.version == r0["version"]
    for k, v in saved.plugin.state_dict().items():
        assert torch.equal(v, r0["state"][k]), k
