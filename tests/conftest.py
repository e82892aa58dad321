"""Shared fixtures: the committed small SAM, loaded once per test session."""

from __future__ import annotations

import os

import pytest

from stable_sam.build import build
from stable_sam.data.synthetic import HELDOUT_SEED, SyntheticScenes
from stable_sam.model import StableSam


def pytest_configure(config) -> None:
    # Everything the tests start from the environment (the CLI, the backend, training jobs, Ray
    # workers) serves what ``tiny_model`` is, the small SAM with the no-op plugin, so their masks
    # can be compared with it. test_backend checks the shipped default (the RTS plugin) itself.
    os.environ.setdefault("PLUGIN_CHECKPOINT", "none")


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
