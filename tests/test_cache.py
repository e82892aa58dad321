"""Embedding cache: one encoder call per distinct image, LRU bound, disk store, concurrency."""

from __future__ import annotations

import threading

import numpy as np
import torch

from stable_sam.builders import build
from stable_sam.embedding_cache import EmbeddingCache, image_hash
from stable_sam.predictor import StableSamPredictor


def test_encoder_runs_once_per_distinct_image(heldout):
    model = build("sam_tiny", device="cpu")
    predictor = StableSamPredictor(model)
    a, b = heldout[0].image, heldout[1].image
    for _ in range(3):
        predictor.set_image(a)
        predictor.predict(box=[10, 10, 100, 100])
    predictor.set_image(a.copy())  # same pixels, another array: same key
    assert model.encoder_calls == 1
    predictor.set_image(b)
    predictor.set_image(a)
    assert model.encoder_calls == 2
    assert model.cache.hits == 4 and model.cache.misses == 2


def test_key_depends_on_pixels_shape_and_model(heldout, tiny_model):
    img = heldout[0].image
    changed = img.copy()
    changed[0, 0, 0] ^= 1
    assert image_hash(img) != image_hash(changed)
    assert image_hash(img) != image_hash(img.reshape(img.shape[0] // 2, img.shape[1] * 2, 3))
    assert tiny_model.embed(img).key == f"{tiny_model.model_id}/{image_hash(img)}"


def test_lru_is_bounded_in_megabytes():
    cache = EmbeddingCache(max_mb=1.0)
    one_third_mb = 1024 * 1024 // 3 // 4
    for i in range(6):
        cache.put(f"k{i}", torch.zeros(one_third_mb))
        assert cache.nbytes <= cache.max_bytes
    assert len(cache) == 3
    assert cache.get("k0") is None and cache.get("k5") is not None
    cache.get("k3")  # touch: k4 becomes the oldest
    cache.put("k6", torch.zeros(one_third_mb))
    assert cache.get("k3") is not None and cache.get("k4") is None
    cache.put("huge", torch.zeros(2 * 1024 * 1024 // 4))  # larger than the budget: not kept
    assert cache.get("huge") is None and cache.nbytes <= cache.max_bytes


def test_disk_store_survives_a_restart(tmp_path, heldout):
    img = heldout[0].image
    first = build("sam_tiny", device="cpu", cache=EmbeddingCache(64, tmp_path))
    emb1 = first.embed(img).embedding
    second = build("sam_tiny", device="cpu", cache=EmbeddingCache(64, tmp_path))
    emb2 = second.embed(img).embedding
    assert second.encoder_calls == 0 and second.cache.disk_hits == 1
    assert torch.equal(emb1, emb2)
    assert not list(tmp_path.glob("*.tmp"))


def test_corrupt_disk_entry_is_recomputed(tmp_path, heldout):
    img = heldout[0].image
    model = build("sam_tiny", device="cpu", cache=EmbeddingCache(64, tmp_path))
    model.embed(img)
    for f in tmp_path.glob("*.pt"):
        f.write_bytes(b"not a tensor")
    again = build("sam_tiny", device="cpu", cache=EmbeddingCache(64, tmp_path))
    again.embed(img)
    assert again.encoder_calls == 1


def test_concurrent_requests_for_one_new_image_encode_once(heldout):
    model = build("sam_tiny", device="cpu")
    img = heldout[7].image
    results = []
    barrier = threading.Barrier(6)

    def work():
        barrier.wait()
        results.append(model.embed(img).embedding)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert model.encoder_calls == 1
    assert all(torch.equal(r, results[0]) for r in results)
