"""Plugin checkpoints, SAM checkpoint resolution and the clear errors when files are missing."""

from __future__ import annotations

import urllib.error

import pytest
import torch

from stable_sam import checkpoint as checkpoint_mod
from stable_sam import download
from stable_sam.builders import build, resolve_device
from stable_sam.checkpoint import atomic_torch_save, load_plugin, save_plugin
from stable_sam.download import CheckpointError, ensure_official_checkpoint
from stable_sam.modeling.plugin import PluginConfig, StableSamPlugin

BASE = {"model_type": "sam_tiny", "model_id": "sam_tiny-0123456789ab"}


def _trained_plugin(config: PluginConfig) -> StableSamPlugin:
    torch.manual_seed(0)
    plugin = StableSamPlugin(config)
    with torch.no_grad():
        for p in plugin.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return plugin


def test_plugin_round_trip(tmp_path):
    config = PluginConfig(offset_range=3.0, amplitude=True, router_activation="sigmoid", router_token="iou")
    plugin = _trained_plugin(config)
    path = save_plugin(plugin, tmp_path / "v1.pt", "v1", BASE, {"epochs": 1, "loss": [0.5, 0.4]})
    loaded = load_plugin(path, model_type="sam_tiny")
    assert loaded.version == "v1" and loaded.base_model == BASE
    assert loaded.summary == {"epochs": 1, "loss": [0.5, 0.4]}
    assert loaded.plugin.config == config and loaded.created
    for (k, a), (_, b) in zip(plugin.state_dict().items(), loaded.plugin.state_dict().items()):
        assert torch.equal(a, b), k
    assert path.stat().st_size < 1_000_000
    assert not list(tmp_path.glob(".*tmp"))


def test_build_serves_a_plugin_checkpoint(tmp_path):
    save_plugin(_trained_plugin(PluginConfig()), tmp_path / "p.pt", "v7", BASE)
    model = build("sam_tiny", plugin_checkpoint=tmp_path / "p.pt", device="cpu")
    assert model.plugin_version == "v7"
    assert model.version.startswith("sam_tiny-") and model.version.endswith("+plugin-v7")


def test_plugin_for_another_base_model_is_refused(tmp_path):
    save_plugin(StableSamPlugin(), tmp_path / "p.pt", "v1", {"model_type": "vit_l", "model_id": "x"})
    with pytest.raises(CheckpointError, match="trained on base model 'vit_l'"):
        load_plugin(tmp_path / "p.pt", model_type="sam_tiny")


def test_missing_and_garbage_plugin_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_plugin(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_plugin(tmp_path / "junk.pt")
    torch.save({"some": "dict"}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a Stable-SAM plugin"):
        load_plugin(tmp_path / "other.pt")


def test_a_crash_mid_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = save_plugin(StableSamPlugin(), tmp_path / "p.pt", "v1", BASE)
    before = path.read_bytes()

    def crash(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(checkpoint_mod.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_plugin(_trained_plugin(PluginConfig()), path, "v2", BASE)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert load_plugin(path).version == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.pt"]
    atomic_torch_save({"x": 1}, tmp_path / "sub" / "new.pt")  # parents are created
    assert (tmp_path / "sub" / "new.pt").is_file()


def test_missing_sam_checkpoint_names_the_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope\.pth.*sam_vit_b_01ec64\.pth"):
        build("vit_b", sam_checkpoint=tmp_path / "nope.pth", device="cpu")


def test_offline_official_checkpoint_error_says_where_to_get_it(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match=r"sam_vit_h_4b8939\.pth.*https://.*sam_vit_h_4b8939\.pth"):
        ensure_official_checkpoint("vit_h", tmp_path, download=False)

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(download.urllib.request, "urlopen", offline)
    with pytest.raises(CheckpointError, match=r"download .* failed \(<urlopen error no route to host>\)"):
        build("vit_l", model_dir=tmp_path, device="cpu")
    assert list(tmp_path.iterdir()) == []  # no partial download left behind


def test_corrupt_download_is_rejected(tmp_path, monkeypatch):
    import io

    class FakeResponse(io.BytesIO):
        headers = {"Content-Length": "11"}

    monkeypatch.setattr(download.urllib.request, "urlopen", lambda *a, **k: FakeResponse(b"not weights"))
    with pytest.raises(CheckpointError, match="SHA-256"):
        ensure_official_checkpoint("vit_b", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_stalled_download_fails_after_the_timeout(tmp_path, monkeypatch):
    """Why stable_sam/download.py is not torch.hub.download_url_to_file: that one has no timeout."""
    import socket
    import time
    from dataclasses import replace

    server = socket.create_server(("127.0.0.1", 0))  # accepts (the OS does), never answers
    try:
        url = f"http://127.0.0.1:{server.getsockname()[1]}/sam_vit_b_01ec64.pth"
        stalled = replace(download.OFFICIAL_CHECKPOINTS["vit_b"], url=url)
        monkeypatch.setitem(download.OFFICIAL_CHECKPOINTS, "vit_b", stalled)
        t = time.monotonic()
        with pytest.raises(CheckpointError, match="timed out"):
            ensure_official_checkpoint("vit_b", tmp_path, timeout=1.0)
        # without a timeout it would wait for ever; 1 s plus a loaded machine's slack is far below 60
        assert time.monotonic() - t < 60
    finally:
        server.close()
    assert list(tmp_path.iterdir()) == []


def test_unknown_model_type_and_device():
    with pytest.raises(ValueError, match="unknown SAM model type"):
        build("vit_x", device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA device"):
            resolve_device("cuda")
    assert resolve_device("auto").type in ("cpu", "cuda")


def test_small_sam_checkpoint_is_fp16_and_loads(tiny_model):
    from stable_sam.settings import SAM_TINY_CHECKPOINT

    state = torch.load(SAM_TINY_CHECKPOINT, map_location="cpu", weights_only=True)
    assert all(v.dtype == torch.float16 for v in state.values() if v.is_floating_point())
    assert SAM_TINY_CHECKPOINT.stat().st_size < 15_000_000
    assert all(p.dtype == torch.float32 for p in tiny_model.sam.parameters())
    assert not any(p.requires_grad for p in tiny_model.sam.parameters())
