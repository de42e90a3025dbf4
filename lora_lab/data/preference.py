"""Preference data for DPO: a prompt and two answers to it, the chosen (preferred) one and the rejected one.

    train_dl, val_dl, stats = get_preference_dataloaders("pairs.json", tokenizer, style, max_seq_length=256,
                                                         micro_batch_size=4)

Rows (a .json list, {"data": [...]}, .jsonl or .csv, as for instruction data) are either
    {"instruction", "input" (optional), "chosen", "rejected"}    (Alpaca-like; an "output" column is ignored)
    {"prompt", "chosen", "rejected"}                              (TRL's standard text format)
and `columns` renames them like instruction data's, e.g. {"instruction": "question", "chosen": "good"}.

A pair is never trained on, but counted and the first few shown, when it is
    malformed        not an object, a missing or non-text field, an empty prompt or answer;
    identical        the chosen and the rejected answer are the same text (it carries no preference);
    too long         prompt + the longer answer (+ EOS) exceeds max_seq_length: cutting the answers would compare
                     their beginnings only, so the pair is left out instead (raise --max_seq_length to keep it).

Tokens: the prompt is wrapped in the model's prompt style, then each answer follows it with EOS (as in SFT,
lora_lab/data/sft.py). A batch of b pairs is one (2b, T) tensor: the b chosen sequences, then their b rejected
ones (TRL's layout), right-padded; labels are IGNORE_INDEX on the prompt and the padding, so only answer tokens
count. The two answers of a pair always share a batch: the sampler draws pairs, not sequences.

Packing (`packing=True`, finetune/dpo.py --packing): the same b pairs per micro-batch, but their 2b sequences are
laid end to end into as few rows of at most max_seq_length tokens as they fit (first fit: lora_lab/data/packing.py's
pack_indices), with segment_ids (R, T): segment k + 1 is sequence k, so the chosen sequences are segments 1..b and
the rejected ones b+1..2b, and 0 is the padding after a row's last sequence. The model gives each segment the logits
it gets alone and lora_lab.dpo.answer_logps sums each answer over its own segment: the same log-probs, loss and
metrics as unpacked (tests/test_dpo_packing.py), with less padding. batch_size and micro_batch_size still count pairs.
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch.utils.data import DataLoader, Dataset

from lora_lab.data.instructions import (DATA_SUFFIXES, MAX_REPORTED_BAD_ROWS, InstructionData, _iter_records,
                                        split_rows)
from lora_lab.data.packing import pack_indices
from lora_lab.data.sft import IGNORE_INDEX, LengthBucketSampler, ShuffledBatchSampler
from lora_lab.prompts import PromptStyle
from lora_lab.utils import LoraLabError

FIELDS = ("instruction", "input", "chosen", "rejected")
FILE_HELP = ("a .json, .jsonl or .csv file of preference pairs: instruction, input (optional), chosen and rejected "
             "columns (or prompt, chosen, rejected)")


def _column_map(records: list, columns: Optional[dict], where: str) -> dict:
    keys: set = set()
    for r in records:
        if isinstance(r, dict):
            keys.update(r)
    if columns:
        unknown = set(columns) - set(FIELDS)
        if unknown:
            raise LoraLabError(f"columns has unknown key(s) {sorted(unknown)}: map some of {list(FIELDS)} to the "
                               f"file's column names, e.g. {{\"chosen\": \"good\", \"rejected\": \"bad\"}}")
    mapping = {f: f for f in FIELDS}
    if "instruction" not in keys and "prompt" in keys:  # TRL's {prompt, chosen, rejected}
        mapping["instruction"] = "prompt"
    mapping.update(columns or {})
    for f in ("instruction", "chosen", "rejected"):
        if keys and mapping[f] not in keys:
            have = ", ".join(sorted(map(str, keys)))
            raise LoraLabError(f"{where} has no {mapping[f]!r} column (its columns: {have}): preference data needs "
                               f"{FILE_HELP}; or pass columns={{\"{f}\": \"<column name>\"}}")
    return mapping


def _text(record: dict, column: str, optional: bool = False) -> str:
    value = record.get(column)
    if value is None:
        if optional:
            return ""
        raise ValueError(f"no {column!r}")
    if not isinstance(value, str):
        raise ValueError(f"{column!r} is {type(value).__name__}, not text")
    return value


def parse_preference_rows(records: Sequence, where: str, columns: Optional[dict] = None,
                          locations: Optional[Sequence[str]] = None) -> tuple[list[dict], dict[str, list[str]]]:
    """(rows {"instruction", "input", "chosen", "rejected"}, {"malformed": [message, ...], "identical": [...]})."""
    records = list(records)
    locations = list(locations) if locations is not None else [f"index {i}" for i in range(len(records))]
    mapping = _column_map(records, columns, where)
    rows, bad = [], {"malformed": [], "identical": []}
    for loc, record in zip(locations, records):
        try:
            if not isinstance(record, dict):
                raise ValueError(getattr(record, "problem", f"is a JSON {type(record).__name__}, not an object"))
            row = {"instruction": _text(record, mapping["instruction"]),
                   "input": _text(record, mapping["input"], optional=True),
                   "chosen": _text(record, mapping["chosen"]), "rejected": _text(record, mapping["rejected"])}
            for f in ("chosen", "rejected"):
                if not row[f].strip():
                    raise ValueError(f"empty {f} answer")
            if not row["instruction"].strip() and not row["input"].strip():
                raise ValueError("empty prompt")
        except ValueError as e:
            bad["malformed"].append(f"{where} {loc}: {e}")
            continue
        if row["chosen"] == row["rejected"]:
            bad["identical"].append(f"{where} {loc}: chosen and rejected are the same text")
            continue
        rows.append(row)
    return rows, bad


def read_preference_file(path: Union[str, Path], columns: Optional[dict] = None):
    """The rows of a preference file and the messages of the rows left out (see parse_preference_rows)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise LoraLabError(f"Data file {path} does not exist: pass {FILE_HELP}")
    if path.suffix.lower() not in DATA_SUFFIXES:
        raise LoraLabError(f"Data file {path} is not .json, .jsonl or .csv: pass {FILE_HELP}")
    try:
        located = list(_iter_records(path))
    except UnicodeDecodeError as e:
        raise LoraLabError(f"{path} is not UTF-8 text ({e.reason}): save it as UTF-8") from None
    if not located:
        raise LoraLabError(f"{path} has no rows: pass {FILE_HELP}")
    rows, bad = parse_preference_rows([r for _, r in located], str(path), columns, [loc for loc, _ in located])
    if not rows:
        first = (bad["malformed"] + bad["identical"])[0]
        raise LoraLabError(f"{path}: none of its {len(located)} rows is a usable preference pair ({first}): pass "
                           f"{FILE_HELP}")
    return rows, bad


def load_preferences(data: Union[str, Path, Sequence[dict]], val_data: Union[str, Path, Sequence[dict], None] = None,
                     *, columns: Optional[dict] = None, val_split_fraction: float = 0.05, seed: int = 42,
                     n_train: Optional[int] = None, n_val: Optional[int] = None) -> tuple[InstructionData, dict]:
    """(train/val rows, {"malformed": [...], "identical": [...]}) of a file or a list of dicts. The split is
    instruction data's (lora_lab.data.instructions.split_rows): the same held-out pairs for the same seed."""

    def read(source):
        if isinstance(source, (list, tuple)):
            rows, bad = parse_preference_rows(source, "data", columns)
            if not rows:
                raise LoraLabError(f"none of the {len(source)} rows given is a usable preference pair")
            return rows, bad, "rows in memory"
        rows, bad = read_preference_file(source, columns)
        return rows, bad, str(Path(source).expanduser())

    rows, bad, source = read(data)
    n_rows = len(rows) + sum(map(len, bad.values()))
    if val_data is not None:
        val, val_bad, val_source = read(val_data)
        train, source = rows, f"{source} (validation: {val_source})"
        n_rows += len(val) + sum(map(len, val_bad.values()))
        bad = {k: bad[k] + val_bad[k] for k in bad}
    else:
        train, val = split_rows(rows, val_split_fraction, seed)
    train = train if n_train is None else train[:n_train]
    val = val if n_val is None else val[:n_val]
    return InstructionData(train, val, source, n_rows), bad


# ------------------------------------------------------------------------------------------------------------
# Tokens and batches
# ------------------------------------------------------------------------------------------------------------
class PreferenceDataset(Dataset):
    """Pairs tokenized once, up front; pairs longer than max_seq_length are left out (`too_long` messages).

    `ref_logps` (N, 2), once set (lora_lab.dpo.reference_logps), travels with each pair into its batch."""

    def __init__(self, rows: Sequence[dict], tokenizer, prompt_style: Union[PromptStyle, str],
                 max_seq_length: Optional[int] = None, system: Optional[str] = None) -> None:
        if isinstance(prompt_style, str):
            prompt_style = PromptStyle.from_name(prompt_style)
        if tokenizer.eos_id is None:
            raise LoraLabError("The tokenizer has no EOS token, so an answer's end could not be scored: add "
                               "eos_token to the checkpoint's tokenizer_config.json")
        self.rows: list[dict] = []
        self.prompt_ids: list[torch.Tensor] = []
        self.answer_ids: list[tuple[torch.Tensor, torch.Tensor]] = []  # (chosen, rejected), each ending in EOS
        self.too_long: list[str] = []
        self.ref_logps: Optional[torch.Tensor] = None
        for i, row in enumerate(rows):
            prompt = tokenizer.encode(prompt_style.apply(row["instruction"], row.get("input", ""), system=system))
            chosen = tokenizer.encode(row["chosen"], bos=False, eos=True)
            rejected = tokenizer.encode(row["rejected"], bos=False, eos=True)
            n = len(prompt) + max(len(chosen), len(rejected))
            if max_seq_length is not None and n > max_seq_length:
                self.too_long.append(f"pair {i} ({row['instruction'][:40]!r}...): {n} tokens > max_seq_length="
                                     f"{max_seq_length}")
                continue
            self.rows.append(row)
            self.prompt_ids.append(prompt)
            self.answer_ids.append((chosen, rejected))
        # the length of a pair's longer sequence, for batching pairs of similar length together
        self.lengths = [len(p) + max(len(c), len(r)) for p, (c, r) in zip(self.prompt_ids, self.answer_ids)]

    def __len__(self) -> int:
        return len(self.rows)

    def pair(self, i: int) -> dict:
        """{"chosen": {"input_ids", "labels"}, "rejected": {...}, "ref_logps": (2,) or absent} of pair i."""
        prompt = self.prompt_ids[i]
        sample = {}
        for name, answer in zip(("chosen", "rejected"), self.answer_ids[i]):
            input_ids = torch.cat([prompt, answer])  # (T,)
            labels = input_ids.clone()
            labels[:len(prompt)] = IGNORE_INDEX  # the prompt is context, not something to score
            sample[name] = {"input_ids": input_ids, "labels": labels}
        if self.ref_logps is not None:
            sample["ref_logps"] = self.ref_logps[i]  # (2,) [chosen, rejected]
        return sample

    __getitem__ = pair


def collate_pairs(pairs: Sequence[dict], pad_id: int = 0) -> dict:
    """b pairs -> input_ids, labels (2b, T): the b chosen sequences, then the b rejected ones, right-padded
    (labels IGNORE_INDEX there); with reference log-probs, ref_chosen_logps and ref_rejected_logps (b,)."""
    seqs = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
    T = max(len(s["input_ids"]) for s in seqs)
    input_ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)  # (2b, T)
    labels = torch.full((len(seqs), T), IGNORE_INDEX, dtype=torch.long)  # (2b, T)
    for row, s in enumerate(seqs):
        n = len(s["input_ids"])
        input_ids[row, :n] = s["input_ids"]
        labels[row, :n] = s["labels"]
    batch = {"input_ids": input_ids, "labels": labels}
    if all("ref_logps" in p for p in pairs):
        ref = torch.stack([p["ref_logps"] for p in pairs])  # (b, 2)
        batch["ref_chosen_logps"], batch["ref_rejected_logps"] = ref[:, 0], ref[:, 1]
    return batch


def pack_rows(lengths: Sequence[int], max_seq_length: int) -> list[list[int]]:
    """The sequences' indices grouped into rows (first fit, pack_indices) so that the (R, T) batch, T its longest
    row, holds the fewest tokens: rows at most w long, for w = the longest sequence, twice it, ... up to
    max_seq_length. w = the longest sequence alone already never makes more tokens than one sequence per row (R <= n
    rows of at most that length); wider rows help when the lengths differ (a long chosen answer, short rejected ones)."""
    longest = max(lengths)
    best, best_cost = [[i] for i in range(len(lengths))], len(lengths) * longest  # one sequence per row
    for width in sorted({longest * k for k in range(1, max_seq_length // longest + 1)} | {max_seq_length}):
        rows = pack_indices(lengths, width)
        cost = len(rows) * max(sum(lengths[i] for i in row) for row in rows)  # R x T of the batch
        if cost < best_cost:
            best, best_cost = rows, cost
    return best


def collate_packed_pairs(pairs: Sequence[dict], max_seq_length: int, pad_id: int = 0) -> dict:
    """b pairs -> their 2b sequences (the b chosen, then the b rejected) packed into R <= 2b rows of at most
    max_seq_length tokens: input_ids, labels, segment_ids (R, T), segment k + 1 = sequence k, 0 = padding; with
    reference log-probs, ref_chosen_logps and ref_rejected_logps (b,) as collate_pairs gives them."""
    seqs = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
    rows = [sorted(r) for r in pack_rows([len(s["input_ids"]) for s in seqs], max_seq_length)]
    T = max(sum(len(seqs[k]["input_ids"]) for k in row) for row in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)  # (R, T)
    labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)  # (R, T)
    segment_ids = torch.zeros((len(rows), T), dtype=torch.long)  # (R, T)
    for r, row in enumerate(rows):
        start = 0
        for k in row:
            n = len(seqs[k]["input_ids"])
            input_ids[r, start:start + n] = seqs[k]["input_ids"]
            labels[r, start:start + n] = seqs[k]["labels"]
            labels[r, start] = IGNORE_INDEX  # (a prompt token anyway) never a target of the previous sequence
            segment_ids[r, start:start + n] = k + 1
            start += n
    batch = {"input_ids": input_ids, "labels": labels, "segment_ids": segment_ids}
    if all("ref_logps" in p for p in pairs):
        ref = torch.stack([p["ref_logps"] for p in pairs])  # (b, 2)
        batch["ref_chosen_logps"], batch["ref_rejected_logps"] = ref[:, 0], ref[:, 1]
    return batch


def report_left_out(bad: dict[str, list[str]], file=sys.stderr) -> None:
    """Print the first few left-out pairs of each kind and their counts."""
    for kind, messages in bad.items():
        for message in messages[:MAX_REPORTED_BAD_ROWS]:
            print(f"left out ({kind}): {message}", file=file)
        if len(messages) > MAX_REPORTED_BAD_ROWS:
            print(f"... and {len(messages) - MAX_REPORTED_BAD_ROWS} more {kind}", file=file)


def get_preference_dataloaders(data, tokenizer, prompt_style: Union[PromptStyle, str], max_seq_length: int,
                               micro_batch_size: int, seed: int = 42, *, val_data=None,
                               columns: Optional[dict] = None, val_split_fraction: float = 0.05,
                               n_train: Optional[int] = None, n_val: Optional[int] = None,
                               system: Optional[str] = None, pad_id: int = 0,
                               verbose: bool = True, packing: bool = False) -> tuple[DataLoader, Optional[DataLoader], dict]:
    """(train_dl, val_dl, stats): batches of micro_batch_size PAIRS (2 x micro_batch_size sequences); training
    pairs of similar length are batched together (LengthBucketSampler, resumable like SFT's). stats counts the
    rows read, the pairs kept and the ones left out by kind (n_malformed, n_identical, n_too_long). packing: the
    sequences of each micro-batch packed into rows (collate_packed_pairs); still micro_batch_size pairs each."""
    if max_seq_length < 2:
        raise LoraLabError(f"max_seq_length={max_seq_length}: a pair needs at least 2 tokens (a prompt and an answer)")
    rows, bad = load_preferences(data, val_data, columns=columns, val_split_fraction=val_split_fraction, seed=seed,
                                 n_train=n_train, n_val=n_val)
    make = partial(PreferenceDataset, tokenizer=tokenizer, prompt_style=prompt_style, max_seq_length=max_seq_length,
                   system=system)
    train_ds, val_ds = make(rows.train), make(rows.val)
    bad["too long"] = [f"training {m}" for m in train_ds.too_long] + [f"validation {m}" for m in val_ds.too_long]
    if len(train_ds) == 0:
        raise LoraLabError(f"No training pair fits max_seq_length={max_seq_length} (all {len(rows.train)} of "
                           f"{rows.source} are longer): raise --max_seq_length")
    sampler = LengthBucketSampler(train_ds.lengths, micro_batch_size, seed)
    collate = (partial(collate_packed_pairs, max_seq_length=max_seq_length, pad_id=pad_id) if packing
               else partial(collate_pairs, pad_id=pad_id))
    train_dl = DataLoader(train_ds, batch_sampler=sampler, collate_fn=collate)
    val_dl = None
    if len(val_ds):
        val_dl = DataLoader(val_ds, batch_sampler=ShuffledBatchSampler(len(val_ds), micro_batch_size, shuffle=False),
                            collate_fn=collate)
    stats = {"source": rows.source, "n_rows": rows.n_rows, "n_train": len(train_ds), "n_val": len(val_ds),
             "n_malformed": len(bad["malformed"]), "n_identical": len(bad["identical"]),
             "n_too_long": len(bad["too long"]), "left_out": bad,
             "max_length": max(train_ds.lengths), "mean_length": sum(train_ds.lengths) / len(train_ds)}
    if verbose:
        report_left_out(bad)
        print(f"Data: {stats['n_train']} training and {stats['n_val']} validation pairs from {rows.source}; left out: "
              f"{stats['n_malformed']} malformed, {stats['n_identical']} with identical answers, {stats['n_too_long']} "
              f"longer than max_seq_length={max_seq_length}", file=sys.stderr)
    return train_dl, val_dl, stats
