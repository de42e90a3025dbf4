"""finetune/classify.py with finetune/lora.py's plumbing: --packing (several texts per row, each read at its own
tokens, the loss and gradients of the same texts unpacked), MFU in the progress and final lines (--peak_flops),
--logger_name's run record, the features method's time and memory line, the cheap argument checks before anything
slow (lora_lab/checks.py), and --compile (the eager losses; slow).

The tiny model, the tiny checkpoint with SmolLM2's tokenizer and the good/bad reviews are tests/test_classify.py's
(as its fixtures make them)."""

from __future__ import annotations

import json

import pytest
import torch

import finetune.classify as ft
from lora_lab.classifier import classify, extract_features, pool_segments
from lora_lab.data.classification import (PackedTexts, classification_dataloaders, collate_packed_texts,
                                          collate_texts, load_classification)
from lora_lab.model import GPT
from lora_lab.tokenizer import Tokenizer
from lora_lab.utils import LoraLabError
from lora_lab.args import call_flat
from test_classify import run, tiny_model, write_reviews

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def reviews(tmp_path_factory):
    return write_reviews(tmp_path_factory.mktemp("data") / "reviews.csv")


class Texts(torch.utils.data.Dataset):
    """Random texts of the given lengths with a class each, as ClassificationDataset holds them."""

    def __init__(self, lengths, num_labels=3, vocab=96, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.samples = [{"input_ids": torch.randint(0, vocab, (n,), generator=g).tolist(),
                         "label": int(torch.randint(0, num_labels, (1,), generator=g))} for n in lengths]
        self.lengths = list(lengths)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i]


# ------------------------------------------------------------------------------------------------------------
# --packing
# ------------------------------------------------------------------------------------------------------------
def test_pool_segments_reads_each_text_at_its_own_tokens():
    x = torch.arange(12.0).view(2, 6, 1)  # (R, T, 1) the value is the position in the flattened rows
    segment_ids = torch.tensor([[1, 1, 2, 2, 2, 0], [1, 2, 2, 2, 3, 3]])
    assert pool_segments(x, segment_ids, "last").flatten().tolist() == [1.0, 4.0, 6.0, 9.0, 11.0]
    assert pool_segments(x, segment_ids, "mean").flatten().tolist() == [0.5, 3.0, 6.0, 8.0, 10.5]


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_packed_loss_equals_unpacked(pooling):
    """Texts packed several to a row (segment_ids) give each text the logits it gets in an unpacked, right-padded
    batch, hence the same loss and gradients (to float tolerance); without segment_ids they would not."""
    texts = Texts([9, 3, 6, 1, 12, 5, 7, 2, 10])
    packed = PackedTexts(texts, max_seq_length=24, seed=0)
    assert sorted(i for row in packed.packs for i in row) == list(range(len(texts)))
    assert len(packed) < len(texts) and max(packed.lengths) <= 24
    packed_batch = collate_packed_texts([packed[r] for r in range(len(packed))])
    order = [i for row in packed.packs for i in row]  # the texts in the packed batch's order
    unpacked_batch = collate_texts([texts[i] for i in order])
    assert torch.equal(packed_batch["labels"], unpacked_batch["labels"])
    assert (packed_batch["segment_ids"].amax(dim=1) > 1).any()  # several texts in a row

    model = tiny_model(num_labels=3).train()

    def loss_and_grads(batch, **kwargs):
        model.zero_grad(set_to_none=True)
        logits = classify(model, batch["input_ids"], batch["attention_mask"], pooling, **kwargs)
        loss = torch.nn.functional.cross_entropy(logits, batch["labels"])
        loss.backward()
        return logits.detach(), loss.detach(), [p.grad.clone() for p in model.parameters()]

    logits_u, loss_u, grads_u = loss_and_grads(unpacked_batch)
    logits_p, loss_p, grads_p = loss_and_grads(packed_batch, segment_ids=packed_batch["segment_ids"])
    assert logits_p.shape == (len(texts), 3)
    torch.testing.assert_close(logits_p, logits_u, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_p, loss_u, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_p, grads_u):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # the comparison can fail: read as one text per row (the attention mask alone), the texts see each other
    with torch.no_grad():
        leaky = classify(model, packed_batch["input_ids"], packed_batch["attention_mask"], pooling)
    assert leaky.shape[0] == len(packed) and not torch.allclose(leaky, logits_u[:len(packed)], atol=1e-3)


def test_dataloaders_pack_training_texts_only(tiny_ckpt, reviews):
    data = load_classification(reviews, labels=["bad", "good"])
    tokenizer = Tokenizer(tiny_ckpt)
    train_dl, val_dl, test_dl, stats = classification_dataloaders(data, tokenizer, max_seq_length=32,
                                                                  micro_batch_size=4, seed=1, packing=True,
                                                                  verbose=False)
    n = len(data.train)
    assert stats["n_samples"] == n and stats["n_train"] == len(train_dl.dataset) < n / 2
    rows = train_dl.dataset
    assert sorted(i for row in rows.packs for i in row) == list(range(n))  # every text in exactly one row
    batch = next(iter(train_dl))
    n_texts = int(sum(int(row.amax()) for row in batch["segment_ids"]))
    assert batch["input_ids"].shape[1] <= 32 and len(batch["labels"]) == n_texts > batch["input_ids"].shape[0]
    assert "segment_ids" not in next(iter(val_dl)) and "segment_ids" not in next(iter(test_dl))
    # the features method reads packed rows as the texts they hold (one feature vector per text)
    model = GPT.from_checkpoint(tiny_ckpt).eval()
    x, y = extract_features(model, train_dl, "last", progress=False)
    assert x.shape == (n, model.config.n_embd) and y.shape == (n,)


def test_script_trains_packed_and_reports_mfu_and_the_run_record(tiny_ckpt, reviews, tmp_path, capsys):
    out = run(tiny_ckpt, reviews, tmp_path / "packed", "lora", packing=True, peak_flops=1e8, max_steps=3,
              eval_interval=3)
    captured = capsys.readouterr()
    assert "texts into" in captured.err and "rows of 32 tokens" in captured.err
    steps = [line for line in captured.out.splitlines() if line.startswith("step ") and "| loss " in line]
    assert len(steps) == 3 and all("| MFU " in line for line in steps)
    summary = next(line for line in captured.out.splitlines() if line.startswith("Trainable parameters"))
    assert "FLOP/s of 100.0 MFLOP/s, --peak_flops)" in summary
    assert (out / "hparams.yaml").is_file() and "packing: true" in (out / "hparams.yaml").read_text()
    assert (out / "loss.png").is_file()
    scores = json.loads((out / ft.SCORES_FILE).read_text())
    assert scores["test"]["n"] == 16  # scoring stays unpacked
    n_texts = 160 - scores["test"]["n"] - scores["validation"]["n"]
    assert scores["data"]["n_samples"] == n_texts > 2 * scores["data"]["n_train"]  # rows of several texts


def test_features_reports_its_time_and_memory(tiny_ckpt, reviews, tmp_path, capsys):
    run(tiny_ckpt, reviews, tmp_path / "features", "features", packing=True)
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("Features of "))
    scores = json.loads((tmp_path / "features" / ft.SCORES_FILE).read_text())
    n_texts = 160 - scores["test"]["n"] - scores["validation"]["n"]
    assert line.startswith(f"Features of {n_texts} texts and the logistic regression in ") and "peak memory" in line
    assert scores["test"]["accuracy"] > 0.6  # packed rows still give each text its own features


# ------------------------------------------------------------------------------------------------------------
# Cheap checks first (lora_lab/checks.py)
# ------------------------------------------------------------------------------------------------------------
def test_arguments_are_checked_before_anything_slow(tiny_ckpt, reviews, tmp_path, monkeypatch):
    def slow(*args, **kwargs):
        raise AssertionError("reached the slow part before the mistake was reported")

    monkeypatch.setattr(GPT, "from_checkpoint", slow)
    monkeypatch.setattr(ft, "load_classification", slow)
    txt = tmp_path / "reviews.txt"
    txt.write_text("a text\n")
    cases = [
        (dict(data=str(txt)), r"--data '.*reviews.txt': give a .csv, .json or .jsonl file"),
        (dict(data="json_extraction"), r"--data 'json_extraction': give a .csv, .json or .jsonl file"),
        (dict(data=str(tmp_path / "missing.csv")), r"--data '.*missing.csv' does not exist"),
        (dict(test_data=str(tmp_path / "missing.jsonl")), r"--test_data '.*missing.jsonl' does not exist"),
        (dict(val_split=1.0), r"--val_split 1.0: use a share in \[0, 1\)"),
        (dict(val_split=0.5, test_split=0.5), r"their sum must be below 1"),
        (dict(method="lasso"), r"--method 'lasso': use one of features, head"),
        (dict(pool="max"), r"--pool 'max': use one of last, mean"),
        (dict(trainable_blocks=0), r"--trainable_blocks 0: use a whole number >= 1"),
        (dict(features_l2=-1.0), r"--features_l2 -1.0: use a number >= 0"),
        (dict(head_learning_rate=0.0), r"--head_learning_rate 0.0: use a number > 0"),
        (dict(labels="good,"), r"--labels 'good,': a label name is empty"),
        (dict(logger_name="tensorbored"), r"--logger_name 'tensorbored'"),
        (dict(batch_size=0), r"--batch_size 0"),
    ]
    for overrides, message in cases:
        args = {"checkpoint_dir": tiny_ckpt, "out_dir": tmp_path / "out", "data": str(reviews), **overrides}
        with pytest.raises(LoraLabError, match=message):
            call_flat(ft.setup, **args)


# ------------------------------------------------------------------------------------------------------------
# --compile: compiling on a CPU takes a minute or more
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_compiled_run_gives_the_eager_losses(tiny_ckpt, reviews, tmp_path, capsys):
    settings = dict(packing=True, max_steps=3, eval_interval=3, peak_flops=1e8)
    run(tiny_ckpt, reviews, tmp_path / "eager", "lora", **settings)
    eager = capsys.readouterr().out
    run(tiny_ckpt, reviews, tmp_path / "compiled", "lora", compile=True, **settings)
    compiled = capsys.readouterr().out

    def losses(out):
        return [float(line.split("| loss ")[1].split()[0]) for line in out.splitlines()
                if line.startswith("step ") and "| loss " in line]

    assert len(losses(compiled)) == 3
    assert losses(compiled) == pytest.approx(losses(eager), rel=1e-4)
