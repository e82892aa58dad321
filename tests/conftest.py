"""Shared fixtures: the committed small SAM, loaded once per test session."""

from __future__ import annotations

import os

import pytest

from backend.testing import loopback_guard
from backend_helpers import SYNTHETIC_SAM
from stable_sam import builders
from stable_sam.builders import build
from stable_sam.data.synthetic import HELDOUT_SEED, SyntheticScenes
from stable_sam.model import StableSam


def pytest_configure(config) -> None:
    # `make test-fast` runs -m "not e2e and not slow"; `make test` (CI) runs everything
    config.addinivalue_line("markers", "e2e: needs a real Label Studio (and Chromium for the browser test)")
    config.addinivalue_line("markers", "slow: starts servers, Ray, training jobs or CLI subprocesses, or "
                                       "trains for seconds")
    # Everything the tests start from the environment (the CLI, the backend, training jobs, Ray
    # workers) serves what ``tiny_model`` is, the small SAM with the no-op plugin, so their masks
    # can be compared with it. test_backend checks the shipped default (the RTS plugin) itself.
    os.environ.setdefault("PLUGIN_CHECKPOINT", "none")
    # ... on the synthetic small SAM: the tests' scenes are drawn shapes, which the shipped
    # photo-trained model (checkpoints/sam_tiny.pt) was not made for. Its own tests
    # (test_shipped_model.py) clear this variable.
    os.environ.setdefault("SAM_CHECKPOINT", str(SYNTHETIC_SAM))
    # and so do settings the tests build in code without SAM_CHECKPOINT (their default weights)
    builders.SAM_TINY_CHECKPOINT = SYNTHETIC_SAM
    # Tests name private and link-local addresses (10.0.0.1, 169.254.169.254, 192.168.0.1) to check
    # that the SSRF guard refuses them: no connection of this process may leave loopback, so a
    # regression fails (``loopback_only``) instead of sending traffic. Set here, not in a fixture,
    # so that module and session fixtures are covered too. The subprocesses the tests start (gunicorn,
    # Label Studio, Ray workers, Chromium) are not guarded: no test sends them such an address.
    loopback_guard.install()


@pytest.fixture(autouse=True)
def loopback_only():
    """Fail the test if anything in it tried to connect outside 127.0.0.0/8 and ::1 (the connection
    was refused; code under test may have turned the error into an answer that looks right)."""
    before = len(loopback_guard.refused)
    yield
    tried = loopback_guard.refused[before:]
    if tried:
        pytest.fail(f"connections outside loopback were tried (and refused): {tried}")


@pytest.fixture(scope="session")
def tiny_model() -> StableSam:
    """The synthetic small SAM with the untrained (no-op) plugin, on CPU: what the environment of
    the tests serves (``SAM_CHECKPOINT``)."""
    return build("sam_tiny", sam_checkpoint=SYNTHETIC_SAM, device="cpu")


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
