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
