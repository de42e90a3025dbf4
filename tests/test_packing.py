"""--packing (lora_lab/data/packing.py): several samples per row, each attending only to itself, and the loss
(and its gradient) identical to the same samples unpacked, batch for batch."""

from __future__ import annotations

import pytest
import torch

from conftest import require_asset
from lora_lab import GPT
from lora_lab.data import get_dataloaders
from lora_lab.data.packing import PackedDataset, pack_indices
from lora_lab.data.sft import collate
from lora_lab.lora import inject_lora, mark_only_lora_trainable
from lora_lab.model import IGNORE_INDEX
from lora_lab.args import call_flat
from tiny_checkpoint import SMOL_TOKENIZER, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


class Samples(torch.utils.data.Dataset):
    """Random samples: a prompt of `p` masked tokens, then an answer of targets; some with every token a
    target (mask_prompt=False), so that a sample's first label would be a target if packing did not mask it."""

    def __init__(self, lengths, prompt_lengths, vocab=256, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for n, p in zip(lengths, prompt_lengths):
            ids = torch.randint(0, vocab, (n,), generator=g)
            labels = ids.clone()
            labels[:p] = IGNORE_INDEX
            self.items.append({"input_ids": ids, "labels": labels})
        self.lengths = list(lengths)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def lora_model():
    torch.manual_seed(0)
    model = GPT(tiny_config(n_layer=2, vocab_size=256))
    inject_lora(model, r=4, alpha=8.0, targets=["query", "value"])
    mark_only_lora_trainable(model)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)  # B = 0 would give the LoRA matrices A no gradient to compare
    return model


def loss_and_grads(model, batch, **kwargs):
    model.zero_grad(set_to_none=True)
    loss = model(batch["input_ids"], labels=batch["labels"], **kwargs)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


def test_pack_indices_uses_every_sample_once_and_fills_rows():
    lengths = [int(x) for x in torch.randint(5, 120, (300,), generator=torch.Generator().manual_seed(1))]
    rows = pack_indices(lengths, 256, seed=3)
    assert sorted(i for row in rows for i in row) == list(range(300))
    fills = [sum(lengths[i] for i in row) for row in rows]
    assert max(fills) <= 256
    assert sum(fills) / (256 * len(rows)) > 0.95  # rows are nearly full
    assert rows == pack_indices(lengths, 256, seed=3) != pack_indices(lengths, 256, seed=4)


def test_packed_loss_and_gradients_equal_the_unpacked_ones():
    """The samples of a micro-batch packed into 2 rows give the loss (mean over all their targets, i.e. the
    token-weighted mean) and the gradient of the same samples right-padded one per row."""
    data = Samples(lengths=[9, 14, 5, 20, 7, 11], prompt_lengths=[3, 0, 2, 0, 4, 5])
    packed = PackedDataset(data, max_seq_length=40, seed=0)
    rows = [packed[r] for r in range(len(packed))]
    assert len(rows) == 2 and sorted(i for p in packed.packs for i in p) == list(range(6))
    packed_batch = collate(rows, pad_id=0)
    assert packed_batch["segment_ids"].shape == packed_batch["input_ids"].shape
    unpacked_batch = collate([data[i] for i in range(6)], pad_id=0)

    model = lora_model()
    loss_unpacked, grads_unpacked = loss_and_grads(model, unpacked_batch)
    loss_packed, grads_packed = loss_and_grads(model, packed_batch, segment_ids=packed_batch["segment_ids"])
    torch.testing.assert_close(loss_packed, loss_unpacked, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_packed, grads_unpacked):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)

    # the comparison can fail: without segment_ids the samples read each other, and with the first labels
    # left as targets the loss counts a next-token prediction across two samples
    loss_leaky, _ = loss_and_grads(model, packed_batch)
    assert not torch.allclose(loss_leaky, loss_unpacked, rtol=1e-3)
    leaky_labels = torch.cat([data[i]["labels"] for p in packed.packs for i in p])
    assert (leaky_labels != IGNORE_INDEX).sum() > (torch.cat([r["labels"] for r in rows]) != IGNORE_INDEX).sum()


def test_get_dataloaders_packing_gives_rows_with_segment_ids():
    from lora_lab.tokenizer import Tokenizer

    tokenizer = Tokenizer(require_asset(SMOL_TOKENIZER))
    train_dl, val_dl, stats = get_dataloaders("json_extraction", tokenizer, "chatml", max_seq_length=512,
                                              micro_batch_size=2, n_train=40, n_val=4, packing=True,
                                              pad_id=tokenizer.eos_id, verbose=False)
    assert stats["n_samples"] == 40 and stats["n_train"] == len(train_dl.dataset) < 40
    assert stats["padding_fraction"] < 0.1
    batch = next(iter(train_dl))
    assert batch["input_ids"].shape[1] <= 512 and "segment_ids" in batch
    assert (batch["segment_ids"] > 1).any()  # several samples in a row
    assert "segment_ids" not in next(iter(val_dl))  # validation stays unpacked
    # every sample's tokens are in exactly one row
    n_tokens = sum(len(train_dl.dataset.dataset[i]["input_ids"]) for i in range(40))
    assert sum(train_dl.dataset.lengths) == n_tokens == stats["train_tokens"]


@pytest.mark.parametrize("script", ["lora", "qlora", "full", "adapter"])
def test_every_finetune_script_trains_packed_and_reports_mfu(script, tmp_path, capsys):
    import importlib

    from tiny_checkpoint import write_tiny_checkpoint

    ft = importlib.import_module(f"finetune.{script}")
    ckpt = write_tiny_checkpoint(tmp_path / "ckpt", require_asset(SMOL_TOKENIZER),
                                 **({"n_layer": 3} if script == "adapter" else {}))
    extra = {"adapter_start_layer": 1} if script == "adapter" else {}
    call_flat(ft.setup, checkpoint_dir=ckpt, out_dir=tmp_path / "out", data="json_extraction", n_train=24, n_val=4,
             eval_samples=0, max_steps=2, batch_size=2, micro_batch_size=1, max_seq_length=512, warmup_steps=1,
             eval_interval=2, eval_iters=1, packing=True, peak_flops=1e8, **extra)
    captured = capsys.readouterr()
    assert "packed 24 samples into" in captured.err
    steps = [line for line in captured.out.splitlines() if line.startswith("step ") and "| loss " in line]
    assert len(steps) == 2 and all("| MFU " in line for line in steps)
    summary = next(line for line in captured.out.splitlines() if line.startswith("Trainable parameters"))
    assert "FLOP/s of 100.0 MFLOP/s, --peak_flops)" in summary
