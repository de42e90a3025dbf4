"""finetune/dpo.py --packing: the chosen and rejected sequences of a micro-batch's pairs laid end to end in rows of
max_seq_length (lora_lab/data/preference.py collate_packed_pairs, first fit by lora_lab/data/packing.py's
pack_indices), each attending only to itself, each answer's log-prob summed over its own segment
(lora_lab/dpo.py answer_logps): the log-probs, the DPO loss, its gradients and the logged metrics equal the unpacked
ones to float tolerance, and a packed run logs the unpacked run's numbers. Tiny random model, SmolLM2's tokenizer."""

from __future__ import annotations

import csv
import json

import pytest
import torch

import finetune.dpo as dpo_script
from lora_lab.data.preference import (PreferenceDataset, collate_packed_pairs, collate_pairs,
                                      get_preference_dataloaders)
from lora_lab.dpo import answer_logps, pair_metrics, preference_loss
from lora_lab.lora import inject_lora, lora_modules, mark_only_lora_trainable
from lora_lab.model import IGNORE_INDEX, GPT
from lora_lab.prompts import PromptStyle
from lora_lab.tokenizer import Tokenizer
from lora_lab.args import call_flat
from test_dpo import PAIRS, RUN

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def dataset(tiny_ckpt):
    ds = PreferenceDataset(PAIRS, Tokenizer(tiny_ckpt), PromptStyle.from_name("chatml"))
    ds.ref_logps = -torch.rand(len(ds), 2, generator=torch.Generator().manual_seed(0)) * 40  # (N, 2)
    return ds


def policy(ckpt) -> GPT:
    """The tiny model with LoRA everywhere and B != 0 (so the adapter changes the log-probs and A gets gradients)."""
    torch.manual_seed(0)
    model = GPT.from_checkpoint(ckpt)
    inject_lora(model, r=4, alpha=8.0, dropout=0.0, targets="all")
    mark_only_lora_trainable(model)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_B.normal_(std=0.2)
    return model.train()


def test_packed_rows_hold_every_sequence_once_in_order(dataset):
    pairs = [dataset[i] for i in range(6)]
    unpacked = collate_pairs(pairs, pad_id=0)
    packed = collate_packed_pairs(pairs, max_seq_length=128, pad_id=0)
    assert packed["segment_ids"].shape == packed["input_ids"].shape == packed["labels"].shape
    assert packed["input_ids"].shape[1] <= 128
    assert packed["input_ids"].shape[0] < unpacked["input_ids"].shape[0]  # fewer rows: the point of packing
    assert packed["input_ids"].numel() <= unpacked["input_ids"].numel()  # never more tokens (pack_rows)
    for k in range(12):  # segment k + 1 is sequence k: the 6 chosen, then the 6 rejected
        where = packed["segment_ids"] == k + 1
        assert where.any(dim=1).sum() == 1  # in one row, contiguous
        n = int(where.sum())
        assert packed["input_ids"][where].tolist() == unpacked["input_ids"][k, :n].tolist()
        labels = unpacked["labels"][k, :n].clone()
        labels[0] = IGNORE_INDEX
        assert packed["labels"][where].tolist() == labels.tolist()
    assert (packed["labels"][packed["segment_ids"] == 0] == IGNORE_INDEX).all()  # padding: never a target
    assert torch.equal(packed["ref_chosen_logps"], unpacked["ref_chosen_logps"])
    assert torch.equal(packed["ref_rejected_logps"], unpacked["ref_rejected_logps"])


@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_packed_logps_loss_gradients_and_metrics_equal_unpacked(tiny_ckpt, dataset, loss):
    model = policy(tiny_ckpt)
    pairs = [dataset[i] for i in range(5)]

    def step(batch):
        model.zero_grad(set_to_none=True)
        logps, n_tokens = answer_logps(model, batch["input_ids"], batch["labels"], batch.get("segment_ids"))
        chosen, rejected = logps.chunk(2)
        out = preference_loss(chosen, rejected, batch["ref_chosen_logps"], batch["ref_rejected_logps"], 0.1, loss,
                              *n_tokens.chunk(2))
        out["losses"].mean().backward()
        return (logps.detach(), n_tokens, pair_metrics(out, chosen, rejected),
                [p.grad.clone() for p in model.parameters() if p.requires_grad])

    logps, n_tokens, metrics, grads = step(collate_pairs(pairs))
    packed = collate_packed_pairs(pairs, max_seq_length=128)
    assert packed["input_ids"].shape[0] < 10  # really packed
    p_logps, p_n_tokens, p_metrics, p_grads = step(packed)
    assert torch.equal(p_n_tokens, n_tokens)
    torch.testing.assert_close(p_logps, logps, rtol=1e-5, atol=1e-4)
    assert p_metrics.keys() == metrics.keys()
    for k in metrics:
        assert p_metrics[k] == pytest.approx(metrics[k], rel=1e-5, abs=1e-5), k
    for a, b in zip(p_grads, grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # the comparison can fail: the same per-segment sums from a model that ignores the segments (each sequence
    # then reads the ones before it in its row, and its positions do not restart) differ
    with torch.no_grad():
        leaked, _ = answer_logps(lambda ids, segment_ids=None, **kwargs: model(ids, **kwargs), packed["input_ids"],
                                 packed["labels"], packed["segment_ids"])
    assert leaked.shape == logps.shape and not torch.allclose(leaked, logps, atol=1e-2)


def test_dataloaders_pack_each_micro_batch_of_pairs(tiny_ckpt, tmp_path):
    data = tmp_path / "pairs.json"
    data.write_text(json.dumps(PAIRS))
    common = dict(tokenizer=Tokenizer(tiny_ckpt), prompt_style="chatml", max_seq_length=128, micro_batch_size=4,
                  seed=3, verbose=False)
    plain, _, stats = get_preference_dataloaders(str(data), **common)
    packed, _, packed_stats = get_preference_dataloaders(str(data), packing=True, **common)
    assert stats == packed_stats  # the same pairs kept; batch_size and micro_batch_size still count pairs
    for a, b in zip(plain, packed):  # the same pairs in the same micro-batches, fewer rows
        assert "segment_ids" in b and "segment_ids" not in a
        assert int(b["segment_ids"].max()) == a["input_ids"].shape[0]  # 2 x the pairs (8; fewer in the last)
        assert b["input_ids"].shape[0] <= a["input_ids"].shape[0] and b["input_ids"].numel() <= a["input_ids"].numel()
        assert (b["labels"] != IGNORE_INDEX).sum() == (a["labels"] != IGNORE_INDEX).sum()


def test_packed_run_logs_the_unpacked_runs_numbers(tiny_ckpt, tmp_path, capsys):
    """Without dropout (its masks depend on the tensors' shapes) a packed run trains exactly as the unpacked one:
    the same losses, rewards and held-out metrics at every step, and its progress lines report MFU."""
    data = tmp_path / "pairs.json"
    data.write_text(json.dumps(PAIRS[:16]))
    (tmp_path / "val.json").write_text(json.dumps(PAIRS[16:]))
    runs = {}
    for packing in (False, True):
        out = tmp_path / f"packing_{packing}"
        call_flat(dpo_script.setup, checkpoint_dir=tiny_ckpt, data=str(data), val_data=str(tmp_path / "val.json"), out_dir=out,
                         **{**RUN, "lora_dropout": 0.0, "max_steps": 3, "eval_interval": 3, "packing": packing})
        with open(out / "metrics.csv", newline="") as f:
            runs[packing] = list(csv.DictReader(f))
        printed = capsys.readouterr().out
        assert "| MFU " in printed and "Reference log-probs of 20 pairs scored in" in printed
    assert len(runs[True]) == len(runs[False]) == 3
    for plain, packed in zip(runs[False], runs[True]):
        for k, v in plain.items():
            if k in ("tokens", "tokens_per_sec") or v == "":  # (packed rows carry less padding)
                continue
            if k == "rewards/accuracies" and plain["step"] == "1":
                # step 1: policy == reference, every margin is 0 up to rounding, and on which side of 0 the
                # packed kernels' rounding falls is arbitrary (the margins themselves agree, below)
                assert float(packed["rewards/margins"]) == pytest.approx(0, abs=1e-5)
                continue
            assert float(packed[k]) == pytest.approx(float(v), rel=1e-4, abs=1e-5), k
    assert int(runs[True][-1]["tokens"]) < int(runs[False][-1]["tokens"])
