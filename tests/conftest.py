"""Shared fixtures: the path of the real data (skipped when absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sample_factory import SHARED_DATA


@pytest.fixture
def shared_data() -> Path:
    """../shared/data, or skip the test with a message when it is absent."""
    if not (SHARED_DATA / "her2st").is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (tests about real formats need ../shared/data)")
    return SHARED_DATA


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """$CMRCNET_CACHE (frozen features, the precision probe) in a folder of this test session, so tests never
    read or fill the user's cache; child processes inherit it."""
    os.environ["CMRCNET_CACHE"] = str(tmp_path_factory.mktemp("cmrcnet_cache"))
