"""Shared test fixtures.

Real weights and data live outside the repository, in ../shared/assets (override with LORA_LAB_ASSETS).
Tests that need them skip with the reason when they are absent, unless LORA_LAB_REQUIRE_ASSETS=1 (set by
.ci/run), which turns that skip into a failure.
"""

import os
import signal
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # finetune/ and generate/ scripts import as modules in tests

# `pytest -n N` (pytest-xdist; the README's test command runs two workers): the N workers share the cores, so each
# one, and every process it starts, computes on cores / N threads, not on all of them each (oversubscribed OpenMP
# threads wait on one another and slow every test down)
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
THREADS = max(1, len(os.sched_getaffinity(0)) // _WORKERS)  # this worker's share of the cores: all of them alone
if _WORKERS > 1:
    os.environ["OMP_NUM_THREADS"] = str(THREADS)
    torch.set_num_threads(THREADS)


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


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module: tiny models run fastest so on two cores that other processes keep busy,
    and in-process runs compute in the order of the scripts started with OMP_NUM_THREADS=1, bit for bit. A module
    takes it for all its tests with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _restore_signal_handlers():
    """The finetune scripts handle Ctrl-C while they train (and give it back at the end, unless they fail):
    pytest gets its own handlers back after each test whatever happened."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """SmolLM2-135M-Instruct as a lora_lab checkpoint (converted from the shared GGUF), once per test module."""
    from lora_lab.formats.gguf_import import convert_gguf

    folder = require_asset("models/smollm2-135m-instruct")
    out = tmp_path_factory.mktemp("smollm2") / "ckpt"
    convert_gguf(folder / "SmolLM2-135M-Instruct.Q4_1.gguf", out, tokenizer_dir=folder)
    return out


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A tiny random Llama checkpoint with SmolLM2's real tokenizer, once per test module."""
    from tiny_checkpoint import SMOL_TOKENIZER, write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", require_asset(SMOL_TOKENIZER))
