"""Batches of token samples, for every kind of training data (instruction rows: sft.py; raw text: text.py).

    collate(samples, pad_id, ignore_index)      right-pad {"input_ids", "labels"[, "segment_ids"]} into (B, T)
    ShuffledBatchSampler(n, batch_size, seed)   each epoch's order from (seed, epoch) alone; resumable at a batch
    LengthBucketSampler(lengths, batch_size)    the same, batching samples of similar length to cut padding

IGNORE_INDEX (-100) marks a label that is never a target (the prompt, the padding). See sft.py's docstring for
the loss convention and for resuming at an exact batch; tested in tests/test_data.py.
"""

from __future__ import annotations

import math
import random
from typing import Iterator, Optional, Sequence

import torch

from lora_lab.model import IGNORE_INDEX  # noqa: F401  (the label that is never a target)
from lora_lab.utils import LoraLabError



def collate(samples: Sequence[dict], pad_id: int = 0, ignore_index: int = IGNORE_INDEX,
            pad_multiple_of: Optional[int] = None, max_seq_length: Optional[int] = None) -> dict:
    """Right-pad to the longest sample: input_ids with pad_id, labels with ignore_index (never a target).

    pad_multiple_of rounds the length up (tensor-core friendly shapes) but never past max_seq_length.
    Right padding is harmless for a causal model: real tokens never attend to the pads after them."""
    T = max(len(s["input_ids"]) for s in samples)
    if pad_multiple_of:
        T = math.ceil(T / pad_multiple_of) * pad_multiple_of
        if max_seq_length is not None:
            T = max(min(T, max_seq_length), max(len(s["input_ids"]) for s in samples))
    input_ids = torch.full((len(samples), T), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(samples), T), ignore_index, dtype=torch.long)  # (B, T)
    for b, s in enumerate(samples):
        n = len(s["input_ids"])
        input_ids[b, :n] = s["input_ids"]
        labels[b, :n] = s["labels"]
    batch = {"input_ids": input_ids, "labels": labels}
    if "segment_ids" in samples[0]:  # packed rows (lora_lab/data/packing.py): the padding is a segment of its own, 0
        batch["segment_ids"] = torch.zeros((len(samples), T), dtype=torch.long)  # (B, T)
        for b, s in enumerate(samples):
            batch["segment_ids"][b, :len(s["segment_ids"])] = s["segment_ids"]
    return batch


# ------------------------------------------------------------------------------------------------------------
# Batch samplers: each epoch's order depends only on (seed, epoch)
# ------------------------------------------------------------------------------------------------------------
class ShuffledBatchSampler:
    """Batches of dataset indices: a fresh permutation every epoch (or the dataset's order with shuffle=False).

    Iterating yields the batches of `self.epoch` from batch `skip` on, then moves to the next epoch."""

    def __init__(self, n: int, batch_size: int, seed: int = 0, shuffle: bool = True, drop_last: bool = False) -> None:
        if batch_size < 1:
            raise LoraLabError(f"batch size {batch_size}: use 1 or more")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.shuffle, self.drop_last = shuffle, drop_last
        self.epoch, self.skip = 0, 0
        self.position = 0  # batches of the current epoch handed out so far (skipped ones included)

    def _rng(self, epoch: int) -> random.Random:
        return random.Random(f"lora_lab-batches-{self.seed}-{epoch}")  # a string seed is hashed the same everywhere

    def _chunk(self, order: list[int]) -> list[list[int]]:
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        return batches

    def batches(self, epoch: int) -> list[list[int]]:
        """All batches of `epoch`, in order."""
        order = list(range(self.n))
        if self.shuffle:
            self._rng(epoch).shuffle(order)
        return self._chunk(order)

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """The next pass yields epoch `epoch`, starting at its batch `skip`."""
        self.epoch, self.skip, self.position = epoch, skip, skip

    def state_dict(self) -> dict:
        epoch, batch = self.epoch, self.position
        if batch >= len(self):  # the epoch is used up: resume at the start of the next one
            epoch, batch = epoch + 1, 0
        return {"epoch": epoch, "batch": batch}

    def load_state_dict(self, state: dict) -> None:
        self.set_epoch(int(state["epoch"]), skip=int(state["batch"]))

    def __iter__(self) -> Iterator[list[int]]:
        self.position = self.skip
        for batch in self.batches(self.epoch)[self.skip:]:
            self.position += 1
            yield batch
        self.epoch, self.skip, self.position = self.epoch + 1, 0, 0

    def __len__(self) -> int:
        """Batches in a whole epoch (a pass started with skip=k yields k fewer)."""
        return self.n // self.batch_size if self.drop_last else math.ceil(self.n / self.batch_size)


class LengthBucketSampler(ShuffledBatchSampler):
    """Batches of samples of similar length, so that little of each batch is padding.

    Each epoch: shuffle all indices, cut them into buckets of `bucket_batches` batches, sort each bucket by
    length, cut it into batches, and shuffle the order of the batches. Which samples share a batch still
    changes every epoch (the buckets are drawn at random), and a batch of long samples is as likely to come
    early as late."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0, bucket_batches: int = 64,
                 drop_last: bool = False) -> None:
        super().__init__(len(lengths), batch_size, seed, shuffle=True, drop_last=drop_last)
        self.lengths = list(lengths)
        self.bucket_batches = bucket_batches

    def batches(self, epoch: int) -> list[list[int]]:
        rng = self._rng(epoch)
        order = list(range(self.n))
        rng.shuffle(order)
        bucket = self.batch_size * self.bucket_batches  # a multiple of batch_size: no batch spans two buckets
        by_length = []
        for start in range(0, self.n, bucket):
            by_length += sorted(order[start:start + bucket], key=lambda i: self.lengths[i])
        batches = self._chunk(by_length)
        rng.shuffle(batches)
        return batches
