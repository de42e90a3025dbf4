"""Packing: several tokenized samples per row of max_seq_length, so that a batch is (almost) no padding.

    packed = PackedDataset(train_ds, max_seq_length, seed=42)      # an SFTDataset in, rows of samples out
    row = packed[0]   # {"input_ids": (L,), "labels": (L,), "segment_ids": (L,)} with L <= max_seq_length

A row is samples laid end to end, each with its own segment id (1, 2, 3, ...; padding added by `collate` gets 0).
The model is called with `segment_ids=batch["segment_ids"]` (lora_lab/model.py): each token attends only to the
earlier tokens of its own sample and positions restart at 0 in each, so every sample gets exactly the logits it
gets alone. The label at each sample's first position is set to IGNORE_INDEX: in an unpacked row position 0 is
never a target (the loss predicts labels[t+1] from position t), and in a packed row that position would be
"predicted" from the previous sample's last token. With these two, the packed loss (the mean over all targets
of the micro-batch) equals the token-weighted mean loss of the same samples unpacked (tests/test_packing.py).

Which samples share a row: the samples in a seeded random order, placed first-fit into the open rows (a sample
goes into the first row it still fits in, of the last `window` rows opened), so rows fill up to ~97-99 % for
instruction data. The rows are made once; their order is shuffled every epoch by the usual batch sampler.
What changes for the user: batch_size and micro_batch_size count rows of max_seq_length tokens, not samples.
"""

from __future__ import annotations

import random
from typing import Sequence

import torch
from torch.utils.data import Dataset

from lora_lab.model import IGNORE_INDEX  # noqa: F401  (the label that is never a target)



def pack_indices(lengths: Sequence[int], max_seq_length: int, seed: int = 0, window: int = 64) -> list[list[int]]:
    """Sample indices grouped into rows of at most max_seq_length tokens (first fit over the last `window` open
    rows, in a seeded random order). Every index appears exactly once."""
    order = list(range(len(lengths)))
    random.Random(f"lora_lab-packing-{seed}").shuffle(order)
    rows: list[list[int]] = []
    room: list[int] = []  # free tokens in each row
    for i in order:
        n = lengths[i]
        start = max(0, len(rows) - window)
        for r in range(start, len(rows)):
            if room[r] >= n:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(max_seq_length - n)
    return rows


class PackedDataset(Dataset):
    """Rows of packed samples of a dataset whose items are {"input_ids", "labels"} (an SFTDataset)."""

    def __init__(self, dataset: Dataset, max_seq_length: int, seed: int = 0, ignore_index: int = IGNORE_INDEX) -> None:
        self.dataset, self.ignore_index = dataset, ignore_index
        lengths = getattr(dataset, "lengths", None) or [len(dataset[i]["input_ids"]) for i in range(len(dataset))]
        if max(lengths, default=0) > max_seq_length:
            raise ValueError(f"a sample of {max(lengths)} tokens does not fit a packed row of {max_seq_length}")
        self.packs = pack_indices(lengths, max_seq_length, seed)
        self.lengths = [sum(lengths[i] for i in row) for row in self.packs]
        self.n_samples = len(lengths)

    def __len__(self) -> int:
        return len(self.packs)

    def __getitem__(self, r: int) -> dict:
        input_ids, labels, segment_ids = [], [], []
        for segment, i in enumerate(self.packs[r], start=1):
            s = self.dataset[i]
            sample_labels = s["labels"].clone()  # (L,)
            sample_labels[0] = self.ignore_index  # never a target of the previous sample's last token
            input_ids.append(s["input_ids"])
            labels.append(sample_labels)
            segment_ids.append(torch.full_like(s["input_ids"], segment))
        return {"input_ids": torch.cat(input_ids), "labels": torch.cat(labels), "segment_ids": torch.cat(segment_ids)}
