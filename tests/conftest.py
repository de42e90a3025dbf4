"""Shared test fixtures.

Real weights and data live outside the repository, in ../shared/assets (override with LORA_LAB_ASSETS).
Tests that need them skip with the reason when they are absent, unless LORA_LAB_REQUIRE_ASSETS=1 (set by
.ci/run), which turns that skip into a failure.
"""

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # finetune/ and generate/ scripts import as modules in tests


def assets_dir() -> Path:
    return Path(os.environ.get("LORA_LAB_ASSETS", ROOT.parent / "shared" / "assets"))


def require_asset(relative: str) -> Path:
    """The path of a file or folder under the assets dir, or skip (fail under LORA_LAB_REQUIRE_ASSETS=1)."""
    path = assets_dir() / relative
    if not path.exists():
        msg = f"needs {path} (real weights/data; set LORA_LAB_ASSETS to the shared assets folder)"
        if os.environ.get("LORA_LAB_REQUIRE_ASSETS") == "1":
            pytest.fail(msg + " and LORA_LAB_REQUIRE_ASSETS=1 forbids skipping")
        pytest.skip(msg)
    return path


@pytest.fixture
def assets():
    return require_asset


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
