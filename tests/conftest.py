"""Shared fixtures: the path of the real data (skipped when absent)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sample_factory import SHARED_DATA


@pytest.fixture
def shared_data() -> Path:
    """../shared/data, or skip the test with a message when it is absent."""
    if not (SHARED_DATA / "her2st").is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (tests about real formats need ../shared/data)")
    return SHARED_DATA
