"""Text classification data: labelled texts from a .csv / .json / .jsonl file, their tokens and their batches.

    data = load_classification("reviews.csv", text_column="text", label_column="label", labels=["fresh", "rotten"])
    train_dl, val_dl, test_dl, stats = classification_dataloaders(data, tokenizer, max_seq_length=256,
                                                                  micro_batch_size=16, seed=42)
    for batch in train_dl:   # {"input_ids": (B, T), "attention_mask": (B, T) 1 real / 0 pad, "labels": (B,)}
        ...

Labels. The classes are names (strings, as in the file: `fresh`, `rotten`, or `0`, `1` for numeric labels), in a
fixed order that is saved with the classifier: the order of --labels when it is given (rows with any other label are
left out in every split, and counted: `--labels fresh,rotten` drops the `plot` rows of the Rotten Tomatoes set),
else the sorted names found in the training rows. Class i is the i-th name; the head's output i scores it.

Splits: --val_data / --test_data files, or shares of --data held out at random (val_split / test_split, drawn with
the seed, so every method of an experiment sees the same split).

Bad input stops before any slow work, with one line each: a column that does not exist, an empty text, fewer than
two classes in the training rows, a validation or test label the training rows do not have (without --labels).

Each text is encoded as the tokenizer does by default (no prompt template: a classifier reads the text alone) and
cut to max_seq_length tokens, keeping its start (as Hugging Face's truncation does); cut texts are counted.
Batches are right-padded; the attention mask tells the model which tokens are real (the model reads it as
segment_ids, so each text gets exactly the logits it gets alone, see lora_lab/classifier.py).
With packing (--packing), training rows hold several texts each (grouped by lora_lab/data/packing.py's
pack_indices); their segment_ids number the texts of a row 1, 2, ... so that each attends only to itself, and
labels lists the texts' classes row by row (collate_packed_texts).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch.utils.data import DataLoader, Dataset

from lora_lab.data.instructions import _iter_records, _Unreadable, split_rows
from lora_lab.data.packing import pack_indices
from lora_lab.data.sft import LengthBucketSampler, ShuffledBatchSampler
from lora_lab.utils import LoraLabError

SUFFIXES = (".csv", ".json", ".jsonl")


@dataclass
class ClassificationData:
    """Rows {"text", "label"} of each split, the class names in their fixed order, and what was left out."""

    labels: list[str]
    train: list[dict]
    val: list[dict]
    test: list[dict]
    source: str
    n_rows: int = 0
    n_other_label: int = 0  # rows whose label is not one of --labels (left out)
    other_labels: dict = field(default_factory=dict)  # label -> count of those rows


def read_labelled_file(path: Union[str, Path], text_column: str = "text", label_column: str = "label") -> list[dict]:
    """Rows {"text", "label", "where"} of a .csv / .json (a list of objects) / .jsonl file; labels as strings."""
    path = Path(path)
    if not path.is_file():
        raise LoraLabError(f"{path} does not exist: give a .csv, .json or .jsonl file of labelled texts")
    if path.suffix.lower() not in SUFFIXES:
        raise LoraLabError(f"{path}: use a .csv, .json or .jsonl file (one row per text, a text and a label column)")
    rows, columns = [], set()
    for where, record in _iter_records(path):
        if isinstance(record, _Unreadable):
            raise LoraLabError(f"{path} {where}: {record.problem}")
        if not isinstance(record, dict):
            raise LoraLabError(f"{path} {where}: a row must be an object with {text_column!r} and {label_column!r}")
        columns.update(record)
        for column in (text_column, label_column):
            if column not in record:
                known = sorted(columns | set(record))
                raise LoraLabError(f"{path} has no {column!r} column (its columns: {', '.join(map(str, known))}): "
                                   f"pass --{'text' if column == text_column else 'label'}_column <name>")
        text, label = record[text_column], record[label_column]
        if not isinstance(text, str) or not text.strip():
            raise LoraLabError(f"{path} {where}: the text ({text_column!r}) is empty: fill it or remove the row")
        if label is None or str(label).strip() == "":
            raise LoraLabError(f"{path} {where}: the label ({label_column!r}) is empty: fill it or remove the row")
        rows.append({"text": text, "label": str(label).strip(), "where": f"{path} {where}"})
    if not rows:
        raise LoraLabError(f"{path} has no rows")
    return rows


def load_classification(data: Union[str, Path], text_column: str = "text", label_column: str = "label",
                        labels: Optional[Sequence[str]] = None, val_data: Union[str, Path, None] = None,
                        test_data: Union[str, Path, None] = None, val_split: float = 0.1, test_split: float = 0.1,
                        seed: int = 42, n_train: Optional[int] = None, n_val: Optional[int] = None,
                        n_test: Optional[int] = None) -> ClassificationData:
    """The train / val / test rows and the class names in their fixed order (see the module docstring)."""
    read = partial(read_labelled_file, text_column=text_column, label_column=label_column)
    rows = read(data)
    n_rows = len(rows)
    wanted = [str(name).strip() for name in labels] if labels else None
    if wanted is not None and len(set(wanted)) != len(wanted):
        raise LoraLabError(f"--labels {','.join(wanted)}: a label is listed twice")
    other: dict[str, int] = {}

    def keep(split_rows_: list[dict]) -> list[dict]:
        if wanted is None:
            return split_rows_
        kept = []
        for r in split_rows_:
            if r["label"] in wanted:
                kept.append(r)
            else:
                other[r["label"]] = other.get(r["label"], 0) + 1
        return kept

    rows = keep(rows)
    val = keep(read(val_data)) if val_data is not None else None
    test = keep(read(test_data)) if test_data is not None else None
    # held-out shares: first the test rows, then the validation rows of what is left (both drawn with the seed)
    if test is None:
        rows, test = split_rows(rows, test_split, seed + 1) if test_split > 0 else (rows, [])
    if val is None:
        rows, val = split_rows(rows, val_split, seed) if val_split > 0 else (rows, [])
    train = rows[:n_train] if n_train is not None else rows
    val = val[:n_val] if n_val is not None else val
    test = test[:n_test] if n_test is not None else test

    found = sorted({r["label"] for r in train})
    if wanted is not None:
        missing = [name for name in wanted if name not in found]
        if missing:
            raise LoraLabError(f"--labels: no training row has the label {missing[0]!r} (the training labels: "
                               f"{', '.join(found) or 'none'})")
        names = wanted
    else:
        names = found
    if len(names) < 2:
        raise LoraLabError(f"the training rows have only one label ({names[0] if names else 'none'}): a "
                           f"classifier needs at least two; check --label_column {label_column} and --labels")
    for split_name, split in (("validation", val), ("test", test)):
        for r in split:
            if r["label"] not in names:
                raise LoraLabError(f"{r['where']}: the {split_name} label {r['label']!r} is not one of the "
                                   f"training labels ({', '.join(names)}): fix the row, or pass --labels to keep "
                                   f"only some labels")
    return ClassificationData(names, train, val, test, str(data), n_rows, sum(other.values()), other)


# ------------------------------------------------------------------------------------------------------------
# Tokens and batches
# ------------------------------------------------------------------------------------------------------------
class ClassificationDataset(Dataset):
    """Token ids of each text (cut to max_seq_length, counted) and its class index."""

    def __init__(self, rows: Sequence[dict], tokenizer, labels: Sequence[str], max_seq_length: int) -> None:
        index = {name: i for i, name in enumerate(labels)}
        self.samples, self.n_truncated = [], 0
        for r in rows:
            ids = tokenizer.encode(r["text"])
            if len(ids) > max_seq_length:
                ids, self.n_truncated = ids[:max_seq_length], self.n_truncated + 1
            self.samples.append({"input_ids": ids, "label": index[r["label"]]})
        self.lengths = [len(s["input_ids"]) for s in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        return self.samples[i]


def collate_texts(samples: Sequence[dict], pad_id: int = 0) -> dict:
    """Right-pad to the longest text: input_ids (B, T), attention_mask (B, T) (1 real, 0 pad), labels (B,)."""
    T = max(len(s["input_ids"]) for s in samples)
    input_ids = torch.full((len(samples), T), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(samples), T), dtype=torch.long)  # (B, T)
    for b, s in enumerate(samples):
        n = len(s["input_ids"])
        input_ids[b, :n] = torch.as_tensor(s["input_ids"])
        attention_mask[b, :n] = 1
    labels = torch.tensor([s.get("label", -1) for s in samples], dtype=torch.long)  # (B,)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class PackedTexts(Dataset):
    """Rows of several texts of a ClassificationDataset, at most max_seq_length tokens each (grouped by
    lora_lab/data/packing.py's pack_indices, as --packing groups instruction samples); an item is its texts."""

    def __init__(self, dataset: ClassificationDataset, max_seq_length: int, seed: int = 0) -> None:
        self.dataset = dataset
        self.packs = pack_indices(dataset.lengths, max_seq_length, seed)
        self.lengths = [sum(dataset.lengths[i] for i in row) for row in self.packs]

    def __len__(self) -> int:
        return len(self.packs)

    def __getitem__(self, r: int) -> list[dict]:
        return [self.dataset[i] for i in self.packs[r]]


def collate_packed_texts(rows: Sequence[Sequence[dict]], pad_id: int = 0) -> dict:
    """Packed rows, right-padded to the longest: input_ids (R, T); segment_ids (R, T) numbering each row's texts
    1, 2, ... (0 for padding: each text attends only to itself, lora_lab/classifier.py pool_segments reads it);
    attention_mask (R, T) 1 real / 0 pad; labels (N,) of the N texts, row by row, left to right."""
    T = max(sum(len(s["input_ids"]) for s in row) for row in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)  # (R, T)
    segment_ids = torch.zeros((len(rows), T), dtype=torch.long)  # (R, T)
    labels = []
    for r, row in enumerate(rows):
        start = 0
        for segment, s in enumerate(row, start=1):
            n = len(s["input_ids"])
            input_ids[r, start:start + n] = torch.as_tensor(s["input_ids"])
            segment_ids[r, start:start + n] = segment
            labels.append(s.get("label", -1))
            start += n
    return {"input_ids": input_ids, "attention_mask": (segment_ids > 0).long(), "segment_ids": segment_ids,
            "labels": torch.tensor(labels, dtype=torch.long)}  # labels (N,)


def classification_dataloaders(data: ClassificationData, tokenizer, max_seq_length: int, micro_batch_size: int,
                               seed: int = 42, pad_id: int = 0, eval_batch_size: Optional[int] = None,
                               verbose: bool = True, packing: bool = False) -> tuple[DataLoader, Optional[DataLoader],
                                                                                     Optional[DataLoader], dict]:
    """(train_dl, val_dl, test_dl, stats). Training batches group texts of similar length (less padding) in an
    order drawn from (seed, epoch): `train_dl.batch_sampler.state_dict()` resumes at the exact batch, as in
    lora_lab/data/sft.py. val_dl / test_dl are None when the split is empty.
    packing: the training texts are packed several to a row of max_seq_length (PackedTexts) and micro_batch_size
    counts rows; n_train is then the number of rows (n_samples the texts in them). Validation and test stay
    unpacked."""
    if max_seq_length < 1:
        raise LoraLabError(f"--max_seq_length {max_seq_length}: use 1 or more")
    make = partial(ClassificationDataset, tokenizer=tokenizer, labels=data.labels, max_seq_length=max_seq_length)
    train_ds, val_ds, test_ds = make(data.train), make(data.val), make(data.test)
    collate_fn = partial(collate_texts, pad_id=pad_id)
    if packing:  # rows are (nearly) max_seq_length long already: no length buckets
        train_rows = PackedTexts(train_ds, max_seq_length, seed)
        sampler = ShuffledBatchSampler(len(train_rows), micro_batch_size, seed)
        train_dl = DataLoader(train_rows, batch_sampler=sampler,
                              collate_fn=partial(collate_packed_texts, pad_id=pad_id))
    else:
        sampler = LengthBucketSampler(train_ds.lengths, micro_batch_size, seed)
        train_dl = DataLoader(train_ds, batch_sampler=sampler, collate_fn=collate_fn)

    def eval_loader(ds):
        if not len(ds):
            return None
        return DataLoader(ds, batch_sampler=ShuffledBatchSampler(len(ds), eval_batch_size or micro_batch_size,
                                                                 shuffle=False), collate_fn=collate_fn)

    counts = [0] * len(data.labels)
    for s in train_ds.samples:
        counts[s["label"]] += 1
    stats = {"source": data.source, "labels": list(data.labels), "n_rows": data.n_rows,
             "n_other_label": data.n_other_label, "n_train": len(train_dl.dataset), "n_samples": len(train_ds),
             "n_val": len(val_ds),
             "n_test": len(test_ds), "train_counts": counts,
             "n_truncated": train_ds.n_truncated + val_ds.n_truncated + test_ds.n_truncated,
             "mean_length": sum(train_ds.lengths) / len(train_ds)}
    if verbose:
        other = (f"; {data.n_other_label} rows with other labels left out "
                 f"({', '.join(f'{k}: {v}' for k, v in sorted(data.other_labels.items()))})"
                 if data.n_other_label else "")
        print(f"Data: {len(train_ds)} training, {len(val_ds)} validation, {len(test_ds)} test texts from "
              f"{data.source}; classes {', '.join(f'{n} ({c})' for n, c in zip(data.labels, counts))} in training"
              f"{other}; {stats['n_truncated']} cut to max_seq_length={max_seq_length}; "
              f"{stats['mean_length']:.0f} tokens per text on average"
              + (f"; packed {len(train_ds)} texts into {len(train_dl.dataset)} rows of {max_seq_length} tokens"
                 if packing else ""), file=sys.stderr)
    return train_dl, eval_loader(val_ds), eval_loader(test_ds), stats
