"""python -m lora_lab.convert: recognising the source, dispatching to the converters (replaced by fakes here, so
this runs whatever state they are in), --dtype, --to hf, one-line errors; and one real run on stories260K."""

import os
import struct
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_lab.formats import convert as cv
from lora_lab.checkpoint import save_checkpoint
from lora_lab.config import Config
from lora_lab.utils import LoraLabError

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(name="tiny", n_layer=1, n_embd=8, n_head=2, vocab_size=16, block_size=16)


def _write_tiny_checkpoint(out_dir, dtype=torch.float32):
    state_dict = {"wte.weight": torch.randn(16, 8, dtype=dtype), "norm_f.weight": torch.ones(8, dtype=dtype)}
    save_checkpoint(out_dir, Config(**TINY), state_dict)
    return Config(**TINY)


def _llama2c_file(path: Path, dim=8, hidden=12, n_layers=1, n_heads=2, n_kv=1, vocab=10, seq_len=4, extra=0):
    header = (dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len)
    size = cv.llama2c_expected_size(header)
    path.write_bytes(struct.pack("<7i", *header) + b"\0" * (size - 28 + extra))
    return path


# ------------------------------------------------------------------------------------------------------------
# recognising SRC
# ------------------------------------------------------------------------------------------------------------
def test_detect_source(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    assert cv.detect_source(hf) == "hf"

    _write_tiny_checkpoint(tmp_path / "ours")
    assert cv.detect_source(tmp_path / "ours") == "lora_lab"

    # GGUF is recognised by its magic bytes, whatever the name
    (tmp_path / "model.bin").write_bytes(b"GGUF" + struct.pack("<I", 3) + b"\0" * 64)
    assert cv.detect_source(tmp_path / "model.bin") == "gguf"

    assert cv.detect_source(_llama2c_file(tmp_path / "stories.bin")) == "llama2c"
    assert cv.detect_source(_llama2c_file(tmp_path / "renamed.weights")) == "llama2c"


def test_llama2c_size_matches_the_real_file(assets):
    path = assets("models/stories260K/stories260K.bin")
    header = struct.unpack("<7i", path.read_bytes()[:28])
    assert cv.llama2c_expected_size(header) == path.stat().st_size
    assert cv.detect_source(path) == "llama2c"


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "missing", "does not exist"),
    (lambda d: _mkdir(d / "empty"), "folder without config.json"),
    (lambda d: _write(d / "fake.gguf", b"GGML" + b"\0" * 64), "GGUF magic bytes"),
    (lambda d: _llama2c_file(d / "cut.bin", extra=-8), "has a llama2.c header but is"),
    (lambda d: _write(d / "notes.txt", b"hello, this is not a model at all"), "not a model file this tool reads"),
])
def test_unrecognised_sources_are_one_line(tmp_path, make, message):
    with pytest.raises(LoraLabError) as info:
        cv.detect_source(make(tmp_path))
    assert message in str(info.value) and "\n" not in str(info.value)
    if message in ("does not exist", "folder without config.json", "not a model file this tool reads"):
        assert "Hugging Face model folder" in str(info.value) and "GGUF" in str(info.value)


def test_cli_unrecognised_source_subprocess(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    cmd = [sys.executable, "-m", "lora_lab.convert", str(tmp_path / "notes.txt"), str(tmp_path / "o")]
    result = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=60)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "llama2.c" in lines[0]
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------------------------
# dispatch, with fake converters
# ------------------------------------------------------------------------------------------------------------
@pytest.fixture
def fakes(monkeypatch):
    calls = []

    def convert_hf_checkpoint(hf_dir, out_dir, dtype=None):
        calls.append(("hf", Path(hf_dir), Path(out_dir), dtype))
        return _write_tiny_checkpoint(out_dir, getattr(torch, dtype) if dtype else torch.float32)

    def export_hf(checkpoint_dir, out_dir):
        calls.append(("export", Path(checkpoint_dir), Path(out_dir)))
        Path(out_dir).mkdir(parents=True)
        return {}

    def convert_gguf(gguf_path, out_dir, tokenizer_dir=None):  # takes no dtype: the CLI casts afterwards
        calls.append(("gguf", Path(gguf_path), Path(out_dir), tokenizer_dir))
        return _write_tiny_checkpoint(out_dir)

    def convert_llama2c(bin_path, out_dir, tokenizer_path=None, dtype=torch.float32):
        calls.append(("llama2c", Path(bin_path), Path(out_dir), tokenizer_path, dtype))
        return _write_tiny_checkpoint(out_dir)

    monkeypatch.setitem(sys.modules, "lora_lab.formats.hf",
                        types.SimpleNamespace(convert_hf_checkpoint=convert_hf_checkpoint, export_hf=export_hf))
    monkeypatch.setitem(sys.modules, "lora_lab.formats.gguf_import", types.SimpleNamespace(convert_gguf=convert_gguf))
    monkeypatch.setitem(sys.modules, "lora_lab.formats.llama2c", types.SimpleNamespace(convert_llama2c=convert_llama2c))
    return calls


def test_dispatch_hf_folder(fakes, tmp_path, capsys):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    cv.main([str(hf), str(tmp_path / "out"), "--dtype", "bfloat16"])
    assert fakes == [("hf", hf, tmp_path / "out", "bfloat16")]
    out = capsys.readouterr().out.strip()
    assert out == f"Converted Hugging Face folder {hf} (tiny) to {tmp_path / 'out'}: 136 parameters, bfloat16"
    with pytest.raises(LoraLabError, match="--tokenizer is for GGUF and llama2.c"):
        cv.convert(hf, tmp_path / "out2", tokenizer=tmp_path)


def test_dispatch_gguf_casts_when_the_converter_takes_no_dtype(fakes, tmp_path, capsys):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 64)
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    cv.main([str(gguf), str(tmp_path / "out"), "--tokenizer", str(tok / "tokenizer.json"), "--dtype", "float16"])
    assert fakes == [("gguf", gguf, tmp_path / "out", tok)]  # a tokenizer file means its folder
    weights = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert {v.dtype for v in weights.values()} == {torch.float16}
    assert capsys.readouterr().out.startswith(f"Converted GGUF file {gguf} (tiny) to")


def test_dispatch_llama2c(fakes, tmp_path):
    model = _llama2c_file(tmp_path / "stories.bin")
    tok = tmp_path / "tok512.bin"
    tok.write_bytes(b"\0" * 8)
    summary = cv.convert(model, tmp_path / "out", tokenizer=tok)
    assert fakes == [("llama2c", model, tmp_path / "out", tok, torch.float32)]  # no --dtype: converter's default
    assert summary.startswith(f"Converted llama2.c model {model} (tiny) to {tmp_path / 'out'}: 136 parameters")
    with pytest.raises(LoraLabError, match="--tokenizer .* does not exist"):
        cv.convert(model, tmp_path / "out2", tokenizer=tmp_path / "missing.bin")


def test_to_hf(fakes, tmp_path, capsys):
    _write_tiny_checkpoint(tmp_path / "ours")
    cv.main(["--to", "hf", str(tmp_path / "ours"), str(tmp_path / "hf")])
    assert fakes == [("export", tmp_path / "ours", tmp_path / "hf")]
    expected = f"Exported {tmp_path / 'ours'} to Hugging Face format in {tmp_path / 'hf'}"
    assert capsys.readouterr().out.strip() == expected
    # converting a lora_lab checkpoint without --to hf says what to do
    with pytest.raises(SystemExit) as exit_info:
        cv.main([str(tmp_path / "ours"), str(tmp_path / "x")])
    assert exit_info.value.code == 1
    assert "already a lora_lab checkpoint" in capsys.readouterr().err
    # --to hf from something that is not a checkpoint
    with pytest.raises(SystemExit):
        cv.main(["--to", "hf", str(tmp_path / "nothing"), str(tmp_path / "y")])
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------------------------
# the real converters
# ------------------------------------------------------------------------------------------------------------
def test_real_llama2c_conversion(assets, tmp_path):
    pytest.importorskip("lora_lab.formats.llama2c")
    model_path = assets("models/stories260K/stories260K.bin")
    tok = assets("models/stories260K/tok512.bin")
    out = tmp_path / "stories260K"
    cmd = [sys.executable, "-m", "lora_lab.convert", str(model_path), str(out), "--tokenizer", str(tok)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
    assert result.returncode == 0, result.stderr
    # 512 * 64 embedding + 5 layers * 45440 + 64 final norm = 260032
    expected = f"Converted llama2.c model {model_path} (stories260K) to {out}: 260.0K parameters, float32"
    assert result.stdout.strip() == expected

    from lora_lab.generate import generate
    from lora_lab.model import GPT
    from lora_lab.tokenizer import Tokenizer

    # greedy from BOS reproduces the published sample
    model = GPT.from_checkpoint(out)
    tokenizer = Tokenizer(out)
    ids = list(generate(model, torch.tensor([tokenizer.bos_id]), max_new_tokens=40))
    assert tokenizer.decode(ids).startswith("Once upon a time, there was a little girl named Lily. She loved to play")

    # --dtype casts
    summary = cv.convert(model_path, tmp_path / "bf16", tokenizer=tok, dtype="bfloat16")
    assert summary.endswith("260.0K parameters, bfloat16")
    assert {v.dtype for v in load_file(str(tmp_path / "bf16" / "model.safetensors")).values()} == {torch.bfloat16}
