"""Raw text for continued pre-training: documents -> one token stream -> blocks in which every token is a target.

    train_dl, val_dl, stats = get_dataloaders("notes/", tokenizer, style, max_seq_length=512, micro_batch_size=8)
    # a .txt file or a folder of .txt files: get_dataloaders sends them here (text_dataloaders)

Documents. A .txt file is one document; a folder gives one document per .txt file in it (sorted by name, so the
order is the same everywhere). With `blank_line_docs=True` every file is cut at blank lines instead (a line holding
only whitespace ends a document), the usual layout of a corpus of short texts in one file.

The stream. Each document is tokenized on its own, without BOS, and followed by EOS:

    stream = doc_1 EOS doc_2 EOS ... doc_n EOS

so the model learns where a document ends, and no token is predicted from the previous document's text without an
EOS in between. The stream is not shuffled: the last `val_split_fraction` of it (at least one block) is held out
for validation, a contiguous stretch of text the model never trains on.

Packing. The stream is cut into blocks of max_seq_length tokens that overlap by one token:

    block k = stream[k (L - 1) : k (L - 1) + L]            L = max_seq_length

With labels = input_ids (no prompt to mask) and the loss convention of sft.py (position t predicts labels[t + 1];
labels[0] is never a target), block k predicts stream[k (L - 1) + 1 .. k (L - 1) + L - 1]: every token of the
stream but the first is a target exactly once, and no block is padded except the last, shorter one
(tests/test_text_data.py checks both).
"""

from __future__ import annotations

import math
import sys
from functools import partial
from pathlib import Path
from typing import Sequence, Union

import torch
from torch.utils.data import DataLoader, Dataset

from lora_lab.data.batches import IGNORE_INDEX, ShuffledBatchSampler, collate
from lora_lab.utils import LoraLabError

TEXT_SUFFIX = ".txt"


def is_text_data(data) -> bool:
    """True for a .txt file or a folder (the raw-text inputs of continued pre-training)."""
    if not isinstance(data, (str, Path)):
        return False
    path = Path(data).expanduser()
    return (path.suffix.lower() == TEXT_SUFFIX and path.is_file()) or path.is_dir()


def read_documents(data: Union[str, Path], blank_line_docs: bool = False) -> list[str]:
    """The documents of a .txt file or of a folder of .txt files (see the module docstring)."""
    path = Path(data).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob(f"*{TEXT_SUFFIX}") if p.is_file())
        if not files:
            raise LoraLabError(f"{path} holds no {TEXT_SUFFIX} files: continued pre-training reads a .txt file or a "
                               f"folder of .txt files (one document each)")
    elif path.is_file():
        files = [path]
    else:
        raise LoraLabError(f"{path} does not exist: pass a .txt file or a folder of .txt files")
    docs = []
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise LoraLabError(f"{f} is not UTF-8 text ({e.reason} at byte {e.start})") from None
        if blank_line_docs:
            docs += split_blank_lines(text)
        elif text.strip():
            docs.append(text)
    if not docs:
        raise LoraLabError(f"{path} holds no text")
    return docs


def split_blank_lines(text: str) -> list[str]:
    """Documents separated by one or more blank (whitespace-only) lines; each keeps its own line breaks."""
    docs, current = [], []
    for line in text.splitlines():
        if line.strip():
            current.append(line)
        elif current:
            docs.append("\n".join(current))
            current = []
    if current:
        docs.append("\n".join(current))
    return docs


def token_stream(docs: Sequence[str], tokenizer) -> torch.Tensor:
    """doc_1 EOS doc_2 EOS ... doc_n EOS as one (N,) long tensor."""
    if tokenizer.eos_id is None:
        raise LoraLabError("The tokenizer has no EOS token to separate documents: add eos_token to the checkpoint's "
                           "tokenizer_config.json")
    eos = torch.tensor([tokenizer.eos_id])
    parts = []
    for doc in docs:
        parts += [tokenizer.encode(doc, bos=False), eos]
    return torch.cat(parts)  # (N,)


def pack(stream: torch.Tensor, block_size: int) -> list[torch.Tensor]:
    """Blocks of block_size tokens overlapping by one (the last may be shorter, at least 2 tokens)."""
    if block_size < 2:
        raise LoraLabError(f"max_seq_length={block_size}: a block needs at least 2 tokens (an input and a target)")
    step = block_size - 1
    n_blocks = max(1, math.ceil((len(stream) - 1) / step))
    return [stream[k * step:k * step + block_size] for k in range(n_blocks)]


class TextBlocks(Dataset):
    """Packed blocks; every token of a block is a target (labels = input_ids)."""

    def __init__(self, blocks: list[torch.Tensor]) -> None:
        self.blocks = blocks
        self.lengths = [len(b) for b in blocks]
        self.rows: list[dict] = []  # no instruction rows (the scripts' JSON evaluation then does nothing)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i].clone()}


def split_stream(stream: torch.Tensor, block_size: int, val_split_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) streams: the last share of the stream (at least one block when the fraction is > 0) is val."""
    if not 0.0 <= val_split_fraction < 1.0:
        raise LoraLabError(f"val_split_fraction={val_split_fraction}: use a number in [0, 1)")
    if val_split_fraction == 0:
        return stream, stream[:0]
    n_val = max(block_size, round(val_split_fraction * len(stream)))
    if n_val >= len(stream) - 1:
        raise LoraLabError(f"The text has {len(stream)} tokens: too few to hold out {n_val} for validation and train "
                           f"on the rest; use more text or a smaller max_seq_length")
    return stream[:-n_val], stream[-n_val:]


def text_dataloaders(data: Union[str, Path], tokenizer, max_seq_length: int, micro_batch_size: int, seed: int = 42,
                     val_split_fraction: float = 0.05, blank_line_docs: bool = False, pad_id: int = 0,
                     eval_batch_size=None, drop_last: bool = False, num_workers: int = 0, n_train=None, n_val=None,
                     verbose: bool = True) -> tuple[DataLoader, DataLoader, dict]:
    """(train_dl, val_dl, stats), the shape get_dataloaders returns, for raw text. n_train / n_val cap the blocks."""
    docs = read_documents(data, blank_line_docs)
    stream = token_stream(docs, tokenizer)  # (N,)
    train_stream, val_stream = split_stream(stream, max_seq_length, val_split_fraction)
    train_blocks = pack(train_stream, max_seq_length)[:n_train]
    val_blocks = pack(val_stream, max_seq_length)[:n_val] if len(val_stream) > 1 else []
    train_ds, val_ds = TextBlocks(train_blocks), TextBlocks(val_blocks)
    collate_fn = partial(collate, pad_id=pad_id, ignore_index=IGNORE_INDEX)
    sampler = ShuffledBatchSampler(len(train_ds), micro_batch_size, seed, drop_last=drop_last)
    train_dl = DataLoader(train_ds, batch_sampler=sampler, collate_fn=collate_fn, num_workers=num_workers)
    val_dl = None
    if len(val_ds):
        val_sampler = ShuffledBatchSampler(len(val_ds), eval_batch_size or micro_batch_size, shuffle=False)
        val_dl = DataLoader(val_ds, batch_sampler=val_sampler, collate_fn=collate_fn, num_workers=num_workers)
    stats = {"source": str(data), "n_rows": len(docs), "n_skipped": 0, "n_train": len(train_ds), "n_val": len(val_ds),
             "n_truncated": 0, "n_no_trainable": 0, "train_tokens": sum(train_ds.lengths),
             "train_target_tokens": sum(n - 1 for n in train_ds.lengths), "max_length": max(train_ds.lengths),
             "mean_length": sum(train_ds.lengths) / len(train_ds), "padding_fraction": 0.0,
             "documents": len(docs), "stream_tokens": len(stream), "val_tokens": len(val_stream)}
    if verbose:
        print(f"Data: raw text, {len(docs)} document(s) from {data}: {len(stream):,} tokens (EOS after each document) "
              f"packed into {len(train_ds)} training and {len(val_ds)} validation blocks of up to {max_seq_length} "
              f"tokens, every token a target", file=sys.stderr)
    return train_dl, val_dl, stats
