"""Continued pre-training on raw text (lora_lab/data/text.py): documents -> EOS-separated stream -> blocks in which
every token is a target exactly once; all four finetune scripts accept it; LoRA on tinyshakespeare lowers the
held-out perplexity."""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from conftest import THREADS, require_asset
from lora_lab.data import get_dataloaders
from lora_lab.data.text import pack, read_documents, split_blank_lines, split_stream, token_stream
from lora_lab.tokenizer import Tokenizer
from lora_lab.utils import LoraLabError
from lora_lab.args import call_flat
from tiny_checkpoint import SMOL_TOKENIZER, write_tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer(require_asset(SMOL_TOKENIZER))


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "b.txt").write_text("Second document.\nIt has two lines.\n")
    (folder / "a.txt").write_text("First document, short.")
    (folder / "notes.md").write_text("not a .txt file: ignored")
    return folder


def test_documents_of_a_folder_and_of_blank_lines(corpus, tmp_path):
    assert read_documents(corpus) == ["First document, short.", "Second document.\nIt has two lines.\n"]
    assert split_blank_lines("one\ntwo\n\n  \nthree\n\n\nfour") == ["one\ntwo", "three", "four"]
    (tmp_path / "c.txt").write_text("doc one\nstill one\n\ndoc two\n")
    assert read_documents(tmp_path / "c.txt", blank_line_docs=True) == ["doc one\nstill one", "doc two"]
    assert read_documents(tmp_path / "c.txt") == ["doc one\nstill one\n\ndoc two\n"]
    with pytest.raises(LoraLabError, match="no .txt files"):
        read_documents(_empty(tmp_path))


def _empty(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    return d


def test_stream_has_eos_after_each_document(corpus, tokenizer):
    docs = read_documents(corpus)
    stream = token_stream(docs, tokenizer)
    expected = []
    for doc in docs:
        expected += tokenizer.encode(doc, bos=False).tolist() + [tokenizer.eos_id]
    assert stream.tolist() == expected
    assert (stream == tokenizer.eos_id).sum() == len(docs) and stream[-1] == tokenizer.eos_id


@pytest.mark.parametrize("n, block", [(100, 10), (101, 10), (91, 10), (10, 10), (5, 10), (2, 2), (37, 7)])
def test_packing_makes_every_token_a_target_exactly_once(n, block):
    stream = torch.arange(n)
    blocks = pack(stream, block)
    assert all(2 <= len(b) <= block for b in blocks)
    # the loss predicts b[1:] from b[:-1] in each block: together, every token but the first, once, in order
    targets = torch.cat([b[1:] for b in blocks])
    assert targets.tolist() == list(range(1, n))
    # and nothing is lost or repeated beyond the one token of overlap that gives each block its first context
    assert torch.cat([blocks[0]] + [b[1:] for b in blocks[1:]]).tolist() == list(range(n))


def test_get_dataloaders_dispatches_raw_text(tokenizer, tmp_path):
    text = require_asset("data/tinyshakespeare.txt").read_text()[:20000]
    path = tmp_path / "shakespeare.txt"
    path.write_text(text)
    train_dl, val_dl, stats = get_dataloaders(str(path), tokenizer, "chatml", max_seq_length=64, micro_batch_size=4,
                                              val_split_fraction=0.1, verbose=False)
    stream = token_stream([text], tokenizer)
    train_stream, val_stream = split_stream(stream, 64, 0.1)
    assert len(val_stream) == round(0.1 * len(stream)) and torch.equal(torch.cat([train_stream, val_stream]), stream)
    train = [train_dl.dataset[i] for i in range(len(train_dl.dataset))]
    assert all(torch.equal(s["input_ids"], s["labels"]) for s in train)  # every token a target
    assert torch.cat([train[0]["input_ids"]] + [s["input_ids"][1:] for s in train[1:]]).tolist() == \
        train_stream.tolist()
    val = torch.cat([val_dl.dataset[0]["input_ids"]] + [s["input_ids"][1:] for s in list(val_dl.dataset)[1:]])
    assert val.tolist() == val_stream.tolist()  # held out: the end of the text, never trained on
    batch = next(iter(train_dl))
    assert batch["input_ids"].shape == (4, 64) and (batch["labels"] != -100).all()
    assert stats["n_train"] == len(train) and stats["stream_tokens"] == len(stream)
    with pytest.raises(LoraLabError, match="val_data"):
        get_dataloaders(str(path), tokenizer, "chatml", max_seq_length=64, micro_batch_size=4, val_data=str(path))


@pytest.mark.parametrize("script", ["lora", "qlora", "full", "adapter"])
def test_every_finetune_script_trains_on_raw_text(script, corpus, tmp_path, tmp_path_factory):
    ckpt = write_tiny_checkpoint(tmp_path / "ckpt", require_asset(SMOL_TOKENIZER))
    (corpus / "long.txt").write_text(require_asset("data/tinyshakespeare.txt").read_text()[:4000] + "\n\nNext.\n")
    ft = importlib.import_module(f"finetune.{script}")
    out = tmp_path / "out"
    own = {"adapter_start_layer": 0} if script == "adapter" else {}  # the tiny model has 2 layers
    call_flat(ft.setup, checkpoint_dir=ckpt, data=str(corpus), out_dir=out, blank_line_docs=True, max_steps=2, batch_size=2,
             micro_batch_size=2, max_seq_length=64, eval_interval=2, eval_iters=1, log_interval=1, eval_samples=0,
             **own)
    rows = (out / "metrics.csv").read_text().splitlines()
    assert len(rows) >= 3 and math.isfinite(float(rows[-1].split(",")[1]))


@pytest.mark.slow
def test_lora_on_tinyshakespeare_lowers_held_out_perplexity(tmp_path):
    """Continued pre-training with LoRA (SmolLM2-135M-Instruct, 8 steps of 4 x 128 tokens): the held-out end of the
    text becomes more predictable."""
    import subprocess
    import sys

    import finetune.lora as ft
    from conftest import ROOT
    from lora_lab.evaluate.load import load_model
    from lora_lab.evaluate.perplexity import sliding_window_nll

    gguf = require_asset("models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf")
    text = require_asset("data/tinyshakespeare.txt")
    ckpt = tmp_path / "smol"
    subprocess.run([sys.executable, "-m", "lora_lab.convert", str(gguf), str(ckpt)], check=True, cwd=ROOT,
                   capture_output=True, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    torch.set_num_threads(THREADS)  # this worker's share of the cores (conftest.py)
    L = 128
    base = load_model(ckpt)
    held_out = split_stream(token_stream(read_documents(text), base.tokenizer), L, 0.05)[1][:1024]

    def ppl(model) -> float:
        nll, n = sliding_window_nll(model, held_out, max_length=L, stride=L)
        return math.exp(nll / n)

    before = ppl(base.model)
    del base
    call_flat(ft.setup, checkpoint_dir=ckpt, data=str(text), out_dir=tmp_path / "lora", max_steps=8, batch_size=4,
             micro_batch_size=4, max_seq_length=L, learning_rate=2e-3, warmup_steps=2, lora_r=8,
             lora_targets="all", eval_interval=1000, eval_iters=1, log_interval=4, eval_samples=0)
    after = ppl(load_model(ckpt, tmp_path / "lora").model)
    print(f"held-out perplexity {before:.2f} -> {after:.2f}")
    assert after < 0.95 * before
