"""Classifiers (lora_lab/classifier.py, finetune/classify.py, generate/classify.py): padding invariance, what each
method trains, save -> load, the NF4 head, the PEFT and Hugging Face round trips (against transformers and peft),
a real-data run and bad input.

Runs are in-process (`call_flat(ft.setup, ...)`) on a tiny random model with SmolLM2's real tokenizer, on a synthetic task
whose label is the text's last word (good / bad words), which even a random tiny model's last hidden state carries."""

from __future__ import annotations

import csv
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import finetune.classify as ft
from conftest import ROOT, THREADS, require_asset
from lora_lab.classifier import (CLASSIFIER_WEIGHTS_FILE, add_classification_head,
                                 classification_scores, classify, load_classifier, pool)
from lora_lab.config import Config
from lora_lab.data.classification import collate_texts, load_classification
from lora_lab.model import GPT
from lora_lab.nf4 import NF4Linear, quantize_nf4
from lora_lab.tokenizer import Tokenizer
from lora_lab.utils import LoraLabError, cli
from lora_lab.args import call_flat

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

LLAMA = dict(n_layer=2, n_embd=32, n_head=4, n_query_groups=2, intermediate_size=48, vocab_size=96, block_size=64)
GOOD, BAD = "good great excellent wonderful superb lovely".split(), "bad awful terrible poor horrible dull".split()
FILLER = "the movie was and it a plot actors story film".split()
RUN = dict(n_train=None, max_steps=12, batch_size=8, micro_batch_size=4, max_seq_length=32, learning_rate=1e-2,
           warmup_steps=2, eval_interval=6, eval_iters=2, save_interval=100, log_interval=1, seed=3,
           labels="bad,good", lora_dropout=0.0)


def write_reviews(path: Path, n: int = 160, seed: int = 0, **labels_of) -> Path:
    """A csv of `n` texts of filler words ending with a good or a bad word, labelled by it."""
    rng = random.Random(seed)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for _ in range(n):
            label = rng.choice(["good", "bad"])
            last = rng.choice(GOOD if label == "good" else BAD)  # the word that decides
            words = [rng.choice(FILLER) for _ in range(rng.randint(2, 8))] + [last]
            writer.writerow([" ".join(words), labels_of.get(label, label)])
    return path


@pytest.fixture(scope="module")
def reviews(tmp_path_factory):
    return write_reviews(tmp_path_factory.mktemp("data") / "reviews.csv")


def tiny_model(seed: int = 0, num_labels: int = 3, **overrides) -> GPT:
    torch.manual_seed(seed)
    model = GPT(Config(**{**LLAMA, **overrides}))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)  # logits far apart
    add_classification_head(model, num_labels)
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 1.0)
    return model.eval()


# ------------------------------------------------------------------------------------------------------------
# The forward: pooling and padding
# ------------------------------------------------------------------------------------------------------------
def test_pool_then_head_is_head_then_pool():
    """With a bias-free linear head, scoring the pooled hidden state = pooling the per-position logits."""
    torch.manual_seed(0)
    hidden = torch.randn(3, 7, 16)  # (B, T, C)
    head = torch.nn.Linear(16, 4, bias=False)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [0] * 2 + [1] * 5])
    for pooling in ("last", "mean"):
        torch.testing.assert_close(head(pool(hidden, mask, pooling)), pool(head(hidden), mask, pooling))
    # last: the rightmost real token, for right and left padding alike
    assert torch.equal(pool(hidden, mask, "last"), hidden[[0, 1, 2], [6, 3, 6]])


@pytest.mark.parametrize("pooling", ["last", "mean"])
@pytest.mark.parametrize("config", [{}, dict(sliding_window=3)], ids=["llama", "sliding_window"])
def test_padding_invariance_left_and_right(pooling, config):
    """A batch padded on the right or on the left gives each text exactly the logits it gets alone."""
    model = tiny_model(**config)
    gen = torch.Generator().manual_seed(1)
    texts = [torch.randint(1, 96, (n,), generator=gen) for n in (9, 3, 6, 1)]
    alone = torch.cat([classify(model, t[None], torch.ones(1, len(t), dtype=torch.long), pooling) for t in texts])
    T = max(len(t) for t in texts)
    for side in ("right", "left"):
        ids = torch.full((len(texts), T), 95, dtype=torch.long)  # (B, T) a pad id that is also a real token
        mask = torch.zeros(len(texts), T, dtype=torch.long)
        for b, t in enumerate(texts):
            span = slice(0, len(t)) if side == "right" else slice(T - len(t), T)
            ids[b, span], mask[b, span] = t, 1
        with torch.no_grad():
            batched = classify(model, ids, mask, pooling)  # (B, num_labels)
        torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5, msg=f"{side} padding")
    # and the mask matters: without it the padded texts get other logits
    with torch.no_grad():
        unmasked = pool(model(ids), mask, pooling)
    assert not torch.allclose(unmasked, alone, atol=1e-3)


def test_scores_accuracy_macro_f1_confusion():
    predictions, targets = torch.tensor([0, 0, 1, 1, 2, 0]), torch.tensor([0, 1, 1, 1, 2, 2])
    s = classification_scores(predictions, targets, 3)
    assert s["accuracy"] == pytest.approx(4 / 6)
    assert s["confusion"] == [[1, 0, 0], [1, 2, 0], [1, 0, 1]]
    # per class F1: 2PR/(P+R) with P = 1/3, 1, 1 and R = 1, 2/3, 1/2
    f1 = [2 * p * r / (p + r) for p, r in ((1 / 3, 1), (1, 2 / 3), (1, 1 / 2))]
    assert s["macro_f1"] == pytest.approx(sum(f1) / 3)


# ------------------------------------------------------------------------------------------------------------
# finetune/classify.py: what trains, loss, save -> load, NF4
# ------------------------------------------------------------------------------------------------------------
def trained_keys(method: str, model) -> set:
    n = model.config.n_layer
    names = [k for k, _ in model.named_parameters()]
    return {"features": {"lm_head.weight", "lm_head.bias"},
            "head": {"lm_head.weight"},
            "blocks": {k for k in names if k.startswith((f"blocks.{n - 1}.", "norm_f.", "lm_head."))},
            "lora": {k for k in names if "lora_" in k} | {"lm_head.weight"},
            "qlora": {k for k in names if "lora_" in k} | {"lm_head.weight"},
            "full": set(names)}[method]


def capture_saves(monkeypatch) -> list:
    """Each save_classifier call of the script: (the model itself, a copy of its state dict at that moment)."""
    calls = []
    original = ft.save_classifier

    def spy(out_dir, model, config, tokenizer_dir=None):
        calls.append((model, {k: v.detach().clone() for k, v in model.state_dict().items()}))
        return original(out_dir, model, config, tokenizer_dir)

    monkeypatch.setattr(ft, "save_classifier", spy)
    return calls


def run(ckpt, data, out_dir, method, **overrides):
    call_flat(ft.setup, checkpoint_dir=ckpt, data=str(data), out_dir=out_dir, method=method,
             **{**RUN, "trainable_blocks": 1, **overrides})
    return out_dir


@pytest.mark.parametrize("method", ["features", "head", "blocks", "lora", "qlora", "full"])
def test_each_method_trains_only_what_it_says_and_reloads_identically(method, tiny_ckpt, reviews, tmp_path,
                                                                      monkeypatch):
    saves = capture_saves(monkeypatch)
    out = run(tiny_ckpt, reviews, tmp_path / method, method)
    model, state = saves[-1]
    # the base as the method builds it, untrained: every parameter or buffer not trained is bit-identical to it
    base = GPT.from_checkpoint(tiny_ckpt)
    if method == "qlora":
        quantize_nf4(base)
    reference = base.state_dict()
    trained = trained_keys(method, model)
    for key, tensor in state.items():
        if key in trained or key.startswith("lm_head."):
            continue
        assert torch.equal(tensor, reference[key]), f"{method}: frozen {key} changed"
    if method != "features":
        changed = [k for k in trained if k in reference and not k.startswith("lm_head.")
                   and not torch.equal(state[k], reference[k])]
        assert changed or method in ("head", "lora", "qlora"), f"{method}: nothing of the model trained"
    if method in ("lora", "qlora"):
        assert any(state[k].abs().sum() > 0 for k in trained if "lora_B" in k), "LoRA B never moved from zero"
    # the file holds exactly the trained tensors (the head as score.*)
    from safetensors.torch import load_file

    saved = set(load_file(str(out / CLASSIFIER_WEIGHTS_FILE)))
    assert saved == {("score" + k[7:]) if k.startswith("lm_head") else k for k in trained}
    # saved -> loaded predicts identically
    loaded, config = load_classifier(out)
    assert config.method == method and config.labels == ["bad", "good"]
    tok = Tokenizer(tiny_ckpt)
    batch = collate_texts([{"input_ids": tok.encode(t)} for t in ("the film was great", "awful", "a plot and dull")])
    model.eval()
    with torch.no_grad():
        assert torch.equal(classify(loaded, batch["input_ids"], batch["attention_mask"]),
                           classify(model, batch["input_ids"], batch["attention_mask"]))
    scores = json.loads((out / ft.SCORES_FILE).read_text())
    assert set(scores) >= {"validation", "test", "train_seconds", "peak_memory_bytes"}
    assert scores["test"]["n"] == 16 and len(scores["test"]["confusion"]) == 2


@pytest.mark.parametrize("method,init", [("qlora", "pissa"), ("lora", "olora")])
def test_lora_init_classifier_reloads_as_trained(method, init, tiny_ckpt, reviews, tmp_path, monkeypatch):
    """--lora_init on a classifier: the base it trains on is W minus the adapter's start (NF4 of it for qlora);
    load_classifier rebuilds it, so the saved classifier predicts as the trained one (qlora: bit for bit; lora:
    through the rank-2r pair converted against the untouched W, to float rounding)."""
    saves = capture_saves(monkeypatch)
    out = run(tiny_ckpt, reviews, tmp_path / method, method, lora_init=init, max_steps=2)
    model, _ = saves[-1]
    loaded, config = load_classifier(out)
    assert config.lora["init"]["method"] == init
    tok = Tokenizer(tiny_ckpt)
    batch = collate_texts([{"input_ids": tok.encode(t)} for t in ("the film was great", "awful", "a plot and dull")])
    model.eval()
    with torch.no_grad():
        ours = classify(loaded, batch["input_ids"], batch["attention_mask"])
        trained = classify(model, batch["input_ids"], batch["attention_mask"])
    if method == "qlora":
        assert torch.equal(ours, trained)
    else:
        torch.testing.assert_close(ours, trained, rtol=1e-4, atol=1e-5)
    plain = load_classifier(run(tiny_ckpt, reviews, tmp_path / "kaiming", method, max_steps=2))[0]
    with torch.no_grad():  # not the kaiming run's: the init did change where training started
        assert not torch.allclose(classify(plain, batch["input_ids"], batch["attention_mask"]), trained, atol=1e-4)


def test_time_budget_stop_then_resume_is_exact(tiny_ckpt, reviews, tmp_path, capsys):
    """--max_time 0 stops after step 1 (saving the resume state); --resume then ends bit for bit where the
    uninterrupted run ends (LoRA dropout 0.1: the saved random state matters)."""
    from safetensors.torch import load_file

    settings = dict(max_steps=6, lora_dropout=0.1)
    reference = run(tiny_ckpt, reviews, tmp_path / "reference", "lora", **settings)
    out = run(tiny_ckpt, reviews, tmp_path / "out", "lora", max_time="0", **settings)
    assert "Time budget of 0:00 spent after step 1: stopping" in capsys.readouterr().out
    run(tiny_ckpt, reviews, out, "lora", resume=True, **settings)
    assert "Resuming from step 1 of 6" in capsys.readouterr().out
    ours, theirs = load_file(str(out / CLASSIFIER_WEIGHTS_FILE)), load_file(str(reference / CLASSIFIER_WEIGHTS_FILE))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_head_stays_float_under_nf4(tiny_ckpt, reviews, tmp_path, monkeypatch):
    saves = capture_saves(monkeypatch)
    run(tiny_ckpt, reviews, tmp_path / "q", "qlora", max_steps=2)
    model, _ = saves[-1]
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight.dtype == torch.float32
    assert model.lm_head.weight.requires_grad
    quantized = [m for m in model.modules() if isinstance(m, NF4Linear) or hasattr(m, "weight_absmax")]
    assert len(quantized) == 7 * model.config.n_layer  # q k v o gate up down of every block


def test_loss_falls_on_a_separable_task(tiny_ckpt, tmp_path):
    data = write_reviews(tmp_path / "reviews.csv", n=400)
    out = run(tiny_ckpt, data, tmp_path / "full", "full", max_steps=40, learning_rate=3e-3)
    with open(out / "metrics.csv") as f:
        losses = [float(r["train_loss"]) for r in csv.DictReader(f)]
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses
    assert json.loads((out / ft.SCORES_FILE).read_text())["test"]["accuracy"] >= 0.9


def test_generate_classify_file_and_text(tiny_ckpt, reviews, tmp_path):
    out = run(tiny_ckpt, reviews, tmp_path / "head", "head", max_steps=2)
    env = {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, str(ROOT / "generate" / "classify.py"), "--model_dir", str(out),
                             "--file", str(reviews), "--out_file", str(tmp_path / "pred.csv")],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    with open(tmp_path / "pred.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 160 and set(rows[0]) == {"text", "label", "p_bad", "p_good"}
    assert all(abs(float(r["p_bad"]) + float(r["p_good"]) - 1) < 1e-5 for r in rows)
    # the file's predictions are the model's, one text at a time
    loaded, _ = load_classifier(out)
    tok = Tokenizer(out)
    for r in rows[:5]:
        ids = tok.encode(r["text"])[None]
        with torch.no_grad():
            p = torch.softmax(classify(loaded, ids, torch.ones_like(ids)), -1)[0]
        assert abs(float(p[1]) - float(r["p_good"])) < 1e-5
    result = subprocess.run([sys.executable, str(ROOT / "generate" / "classify.py"), "--model_dir", str(out),
                             "--text", "the movie was great"], capture_output=True, text=True, env=env)
    assert result.returncode == 0 and result.stdout.split("\t")[0] in ("bad", "good"), result.stderr


# ------------------------------------------------------------------------------------------------------------
# Interop: PEFT (lora) and transformers (*ForSequenceClassification)
# ------------------------------------------------------------------------------------------------------------
def padded_batch(tokenizer, texts, pad_id):
    return collate_texts([{"input_ids": tokenizer.encode(t)} for t in texts], pad_id=pad_id)


TEXTS = ["the film was great", "awful", "a plot and dull story", "lovely"]


def hf_logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def test_lora_classifier_exports_to_peft_seq_cls(tiny_ckpt, reviews, tmp_path):
    pytest.importorskip("peft")
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    out = run(tiny_ckpt, reviews, tmp_path / "lora", "lora", max_steps=4)
    env = {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    for cmd in (["-m", "lora_lab.export_peft", "--adapter_dir", str(out), "--out_dir", str(tmp_path / "peft")],
                ["-m", "lora_lab.convert", "--to", "hf", str(tiny_ckpt), str(tmp_path / "base_hf")]):
        result = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, env=env)
        assert result.returncode == 0, result.stderr
    adapter_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert adapter_config["task_type"] == "SEQ_CLS" and adapter_config["modules_to_save"] == ["score"]
    ours, config = load_classifier(out)
    base = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base_hf", num_labels=2,
                                                              pad_token_id=config.pad_id, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    batch = padded_batch(Tokenizer(out), TEXTS, config.pad_id)
    with torch.no_grad():
        expected = classify(ours, batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(hf_logits(peft_model, batch), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["blocks", "full", "head"])
def test_classifier_exports_to_hf_sequence_classification(method, tiny_ckpt, reviews, tmp_path):
    from transformers import AutoModelForSequenceClassification

    out = run(tiny_ckpt, reviews, tmp_path / method, method, max_steps=3)
    env = {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-m", "lora_lab.convert", "--to", "hf", str(out), str(tmp_path / "hf")],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ours, config = load_classifier(out)
    assert hf.config.id2label == {0: "bad", 1: "good"} and hf.config.pad_token_id == config.pad_id
    assert type(hf).__name__ == "LlamaForSequenceClassification"
    batch = padded_batch(Tokenizer(tmp_path / "hf") if (tmp_path / "hf" / "tokenizer.json").is_file()
                         else Tokenizer(out), TEXTS, config.pad_id)
    with torch.no_grad():
        expected = classify(ours, batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(hf_logits(hf, batch), expected, atol=1e-5, rtol=1e-4)


def test_features_and_lora_refuse_the_hf_export_in_one_line(tiny_ckpt, reviews, tmp_path):
    from lora_lab.classifier import export_hf_classifier

    out = run(tiny_ckpt, reviews, tmp_path / "features", "features")
    with pytest.raises(LoraLabError, match="bias"):
        export_hf_classifier(out, tmp_path / "hf")


# ------------------------------------------------------------------------------------------------------------
# Bad input: one line each
# ------------------------------------------------------------------------------------------------------------
def one_line_error(capsys, tiny_ckpt, out_dir, *args) -> str:
    with pytest.raises(SystemExit) as e:
        cli(ft.setup, ["--checkpoint_dir", str(tiny_ckpt), "--out_dir", str(out_dir), *args])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_bad_input_is_one_line_each(tiny_ckpt, reviews, tmp_path, capsys):
    one_label = write_reviews(tmp_path / "one.csv", bad="x", good="x")
    assert "only one label" in one_line_error(capsys, tiny_ckpt, tmp_path / "o1", "--data", str(one_label))
    test_file = write_reviews(tmp_path / "test.csv", n=20, seed=5, good="great")
    msg = one_line_error(capsys, tiny_ckpt, tmp_path / "o2", "--data", str(reviews), "--test_data", str(test_file))
    assert "'great' is not one of the training labels" in msg
    empty = tmp_path / "empty.csv"
    empty.write_text('text,label\n"a fine film",good\n"",bad\n')
    assert "empty" in one_line_error(capsys, tiny_ckpt, tmp_path / "o3", "--data", str(empty))
    msg = one_line_error(capsys, tiny_ckpt, tmp_path / "o4", "--data", str(reviews), "--label_column", "sentiment")
    assert "no 'sentiment' column" in msg and "--label_column" in msg
    msg = one_line_error(capsys, tiny_ckpt, tmp_path / "o5", "--data", str(reviews), "--labels", "good,meh")
    assert "'meh'" in msg
    msg = one_line_error(capsys, tiny_ckpt, tmp_path / "o6", "--data", str(reviews), "--method", "blocks",
                         "--trainable_blocks", "5")
    assert "--trainable_blocks 5" in msg
    msg = one_line_error(capsys, tiny_ckpt, tmp_path / "o7", "--data", str(reviews), "--strategy", "fsdp",
                         "--method", "features")
    assert "--strategy fsdp with --method features" in msg and not (tmp_path / "o7").exists()


def test_labels_keep_their_order_and_other_labels_are_left_out(tmp_path):
    path = tmp_path / "three.csv"
    path.write_text("text,label\n" + "".join(f"t{i},{lab}\n" for i, lab in enumerate(["b", "a", "plot"] * 10)))
    data = load_classification(path, labels=["b", "a"], val_split=0.1, test_split=0.1)
    assert data.labels == ["b", "a"] and data.n_other_label == 10 and data.other_labels == {"plot": 10}
    assert len(data.train) + len(data.val) + len(data.test) == 20
    assert load_classification(path, val_split=0.0, test_split=0.0).labels == ["a", "b", "plot"]


# ------------------------------------------------------------------------------------------------------------
# Real data: SmolLM2-135M on fresh vs rotten
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_real_reviews_short_run_beats_the_majority_class(tmp_path):
    """Logistic regression on SmolLM2-135M's last-token features of 300 reviews beats always answering the most
    common label on 200 held-out reviews by 8 points or more."""
    gguf = require_asset("models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf")
    data = require_asset("data/rotten_tomatoes_13905.csv")
    from lora_lab.formats.convert import convert

    convert(gguf, tmp_path / "smol")
    with open(data, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["label"] in ("fresh", "rotten")]
    random.Random(0).shuffle(rows)
    for name, part in (("train", rows[:300]), ("test", rows[300:500])):
        with open(tmp_path / f"{name}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["text", "label", "movie"])
            writer.writeheader()
            writer.writerows(part)
    torch.set_num_threads(THREADS)  # this worker's share of the cores (conftest.py)
    call_flat(ft.setup, checkpoint_dir=tmp_path / "smol", data=str(tmp_path / "train.csv"), test_data=str(tmp_path / "test.csv"),
             out_dir=tmp_path / "out", method="features", labels="fresh,rotten", max_seq_length=64, val_split=0.0)
    scores = json.loads((tmp_path / "out" / ft.SCORES_FILE).read_text())["test"]
    majority = max(sum(row) for row in scores["confusion"])  # rows: the true classes
    assert scores["accuracy"] >= majority / scores["n"] + 0.08, scores


def test_n_test_and_columns(tiny_ckpt, tmp_path, capsys):
    """--n_test scores only that many test texts (classify.md's CPU-sized run); --columns renames the text and
    label columns like --text_column / --label_column."""
    data = write_reviews(tmp_path / "reviews.csv", n=60)
    renamed = tmp_path / "renamed.csv"
    renamed.write_text(data.read_text().replace("text,label", "review,sentiment", 1))
    out = run(tiny_ckpt, renamed, tmp_path / "out", "head", max_steps=1, n_test=3,
              columns={"text": "review", "label": "sentiment"})
    confusion = json.loads((out / ft.SCORES_FILE).read_text())["test"]["confusion"]
    assert sum(map(sum, confusion)) == 3 and "3 test texts" in capsys.readouterr().err
    msg = one_line_error(capsys, tiny_ckpt, tmp_path / "o", "--data", str(renamed), "--columns", '{"txt": "review"}')
    assert "--columns: unknown field txt: map some of text, label" in msg
