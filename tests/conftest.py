"""Shared fixtures: the committed small SAM, loaded once per test session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stable_sam.build import build  # noqa: E402
from stable_sam.data.synthetic import HELDOUT_SEED, SyntheticScenes  # noqa: E402
from stable_sam.model import StableSam  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model() -> StableSam:
    """The committed small SAM with the untrained (no-op) plugin, on CPU."""
    return build("sam_tiny", device="cpu")


@pytest.fixture(scope="session")
def heldout() -> SyntheticScenes:
    return SyntheticScenes(seed=HELDOUT_SEED)


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster of 2 CPUs for the module's tests (Ray imported only by the tests that
    use it); its GCS address."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
