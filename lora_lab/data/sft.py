"""Supervised fine-tuning batches: tokenize instruction rows, mask the prompt, pad, and order the batches.

    train_dl, val_dl, stats = get_dataloaders("alpaca", tokenizer, "chatml", max_seq_length=512,
                                              micro_batch_size=8, seed=42)
    for batch in train_dl:                 # {"input_ids": (B, T) long, "labels": (B, T) long}
        logits = model(batch["input_ids"])                                   # (B, T, V)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100)

One sample. The prompt is `prompt_style.apply(instruction, input)`, the text a model sees at inference, and

    input_ids = encode(prompt, bos=<tokenizer's default>) + encode(output, bos=False) + [EOS]
    labels    = input_ids, with the prompt's positions set to -100 (mask_prompt=True)

`labels` is aligned with `input_ids`, NOT shifted: the loss compares the logits at position t with labels[t+1]
(as above). So labels[0] is never a target, and -100 on the prompt means the model learns only to write the
answer and to stop (EOS), not to reproduce prompts.

The prompt and the answer are tokenized SEPARATELY, on purpose: the prompt's tokens are then exactly the
tokens generation feeds the model (`encode(prompt)`), and the prompt/answer boundary falls between two
tokens, so the mask covers the prompt exactly. Tokenizing the joined text instead lets a merge span the
boundary (e.g. a BPE token made of the prompt's last "\\n" and the answer's first characters): the model would
be trained on a prompt it never sees at inference and the mask would cut a token in half. The price is small:
SentencePiece tokenizers (Llama 2) start the separately encoded answer with a word-start piece ("▁Paris"
rather than "Paris" after a newline), which the model simply learns to generate; decoding the answer tokens
still gives the answer's text.

Samples longer than `max_seq_length` are cut at the end (the EOS, and maybe part of the answer, is lost) and
counted. A sample left with no target at all (its prompt alone fills max_seq_length) teaches nothing: it is
dropped and counted, and if every training sample is in that state we stop with an error.

Order and resuming. `train_dl.batch_sampler` (a `ShuffledBatchSampler`, or a `LengthBucketSampler` that
batches samples of similar length to cut padding) draws each epoch's order from (seed, epoch) alone. To resume
at an exact position, save `train_dl.batch_sampler.state_dict()` ({"epoch", "batch"}) with the checkpoint and
call `train_dl.batch_sampler.load_state_dict(state)` after building the loaders again: the next pass over
train_dl starts at that batch of that epoch (skipped batches are never tokenized or collated). The position
is exact with num_workers=0 (the default: the sampler is then asked for a batch only when the loop takes
one); with worker processes the loader reads ahead, so count the batches in the training loop instead and
call `set_epoch(epoch, skip=k)`. After a complete pass the sampler moves on to the next epoch by itself, so
`for batch in train_dl` in a loop (or a cycling iterator) sees a new, reproducible order every epoch.
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch.utils.data import DataLoader, Dataset

# padding, the loss's ignore_index and the batch order live in batches.py (raw text, text.py, batches them too)
from lora_lab.data.batches import IGNORE_INDEX, LengthBucketSampler, ShuffledBatchSampler, collate  # noqa: F401
from lora_lab.data.instructions import load_instructions
from lora_lab.data.text import is_text_data, text_dataloaders
from lora_lab.prompts import PromptStyle
from lora_lab.utils import LoraLabError


def tokenize_sample(sample: dict, tokenizer, prompt_style: PromptStyle, max_seq_length: Optional[int] = None,
                    mask_prompt: bool = True, ignore_index: int = IGNORE_INDEX,
                    system: Optional[str] = None) -> dict:
    """{"input_ids": (T,), "labels": (T,), "n_prompt": prompt tokens, "truncated": bool} for one row."""
    prompt = prompt_style.apply(sample["instruction"], sample.get("input", ""), system=system)
    prompt_ids = tokenizer.encode(prompt)  # (P,) with BOS when the tokenizer adds one by default
    if tokenizer.eos_id is None:
        raise LoraLabError("The tokenizer has no EOS token, so a fine-tuned model could not learn to stop: add "
                           "eos_token to the checkpoint's tokenizer_config.json")
    answer_ids = tokenizer.encode(sample["output"], bos=False, eos=True)  # (A + 1,) the answer, then EOS
    input_ids = torch.cat([prompt_ids, answer_ids])  # (T,)
    truncated = max_seq_length is not None and len(input_ids) > max_seq_length
    if truncated:
        input_ids = input_ids[:max_seq_length]
    labels = input_ids.clone()  # (T,)
    if mask_prompt:
        labels[:len(prompt_ids)] = ignore_index
    return {"input_ids": input_ids, "labels": labels, "n_prompt": len(prompt_ids), "truncated": truncated}


class SFTDataset(Dataset):
    """Rows tokenized once, up front (so lengths are known for bucketing and bad cases are counted before
    training starts). Samples without any target after truncation are left out and counted."""

    def __init__(self, rows: Sequence[dict], tokenizer, prompt_style: Union[PromptStyle, str],
                 max_seq_length: Optional[int] = None, mask_prompt: bool = True,
                 ignore_index: int = IGNORE_INDEX, system: Optional[str] = None) -> None:
        if isinstance(prompt_style, str):
            prompt_style = PromptStyle.from_name(prompt_style)
        self.mask_prompt, self.ignore_index = mask_prompt, ignore_index
        self.rows: list[dict] = []  # the kept rows, for evaluation (their prompts and reference answers)
        self.input_ids: list[torch.Tensor] = []
        self.n_prompt: list[int] = []  # labels are rebuilt from this, which halves the memory held
        self.n_truncated = self.n_no_trainable = 0
        for row in rows:
            s = tokenize_sample(row, tokenizer, prompt_style, max_seq_length, mask_prompt, ignore_index, system)
            self.n_truncated += s["truncated"]
            # the shifted loss never predicts position 0, so a target must sit at position 1 or later
            if not (s["labels"][1:] != ignore_index).any():
                self.n_no_trainable += 1
                continue
            self.rows.append(row)
            self.input_ids.append(s["input_ids"])
            self.n_prompt.append(s["n_prompt"])
        self.lengths = [len(ids) for ids in self.input_ids]

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict:
        input_ids = self.input_ids[i]  # (T,)
        labels = input_ids.clone()  # (T,)
        if self.mask_prompt:
            labels[:self.n_prompt[i]] = self.ignore_index
        return {"input_ids": input_ids, "labels": labels}


def padding_fraction(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """Share of the padded (B, T) batch tensors that is padding."""
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    real = sum(lengths[i] for b in batches for i in b)
    return 1.0 - real / padded if padded else 0.0


# ------------------------------------------------------------------------------------------------------------
# The one call the finetune scripts make
# ------------------------------------------------------------------------------------------------------------
def get_dataloaders(data: Union[str, Path, Sequence[dict]], tokenizer, prompt_style: Union[PromptStyle, str],
                    max_seq_length: int, micro_batch_size: int, seed: int = 42, *,
                    val_data: Union[str, Path, Sequence[dict], None] = None,
                    data_dir: Union[str, Path, None] = None, columns: Optional[dict] = None,
                    val_split_fraction: float = 0.05, on_bad_row: str = "skip",
                    n_train: Optional[int] = None, n_val: Optional[int] = None,
                    mask_prompt: bool = True, ignore_index: int = IGNORE_INDEX, system: Optional[str] = None,
                    bucket_by_length: bool = False, pad_id: int = 0, pad_multiple_of: Optional[int] = None,
                    eval_batch_size: Optional[int] = None, drop_last: bool = False, num_workers: int = 0,
                    verbose: bool = True, packing: bool = False,
                    blank_line_docs: bool = False) -> tuple[DataLoader, Optional[DataLoader], dict]:
    """(train_dl, val_dl, stats) for `data` (a dataset name, a file, or a list of row dicts).

    val_dl is None when there are no validation rows (val_split_fraction=0 and no val_data). stats holds
    n_rows (read), n_skipped (malformed rows), n_train / n_val (samples in the loaders), n_truncated (cut
    to max_seq_length), n_no_trainable (dropped: nothing left to learn after the cut), the train split's token
    counts and lengths, and the padding fraction of epoch 0's batches.
    See the module docstring for the loss convention and for resuming at an exact batch.
    packing: the training samples are packed several to a row of max_seq_length (lora_lab/data/packing.py), and
    micro_batch_size counts those rows; n_train is then the number of rows (n_samples the samples in them) and
    the batches carry segment_ids for the model. Validation stays unpacked (comparable with unpacked runs).

    Raw text (a .txt file or a folder of them) is continued pre-training: text.py packs it into blocks in which every
    token is a target (blank_line_docs: documents are separated by blank lines)."""
    if is_text_data(data):
        if val_data is not None:
            raise LoraLabError(f"--val_data with raw text {data}: the held-out text is the last val_split_fraction "
                               f"of it; leave --val_data out")
        return text_dataloaders(data, tokenizer, max_seq_length, micro_batch_size, seed, val_split_fraction,
                                blank_line_docs, pad_id, eval_batch_size, drop_last, num_workers, n_train, n_val,
                                verbose)
    if isinstance(prompt_style, str):
        prompt_style = PromptStyle.from_name(prompt_style)
    if max_seq_length < 2:
        raise LoraLabError(f"max_seq_length={max_seq_length}: a sample needs at least 2 tokens (a prompt and a target)")
    from lora_lab.data.mix import is_mix_file, load_mix_instructions

    # a mix file: several sources in chosen shares, deduplicated and decontaminated (mix.py)
    load = load_mix_instructions if is_mix_file(data) else load_instructions
    rows = load(data, val_data, data_dir=data_dir, columns=columns,
                             val_split_fraction=val_split_fraction, seed=seed, on_bad_row=on_bad_row,
                             n_train=n_train, n_val=n_val, verbose=verbose)
    make = partial(SFTDataset, tokenizer=tokenizer, prompt_style=prompt_style, max_seq_length=max_seq_length,
                   mask_prompt=mask_prompt, ignore_index=ignore_index, system=system)
    train_ds, val_ds = make(rows.train), make(rows.val)
    if len(train_ds) == 0:
        raise LoraLabError(f"No training sample has trainable tokens: in all {len(rows.train)} samples of "
                           f"{rows.source} the prompt fills max_seq_length={max_seq_length}, leaving no answer "
                           f"token to learn: raise max_seq_length or use shorter prompts")

    n_samples = len(train_ds)
    if packing:
        from lora_lab.data.packing import PackedDataset

        train_ds = PackedDataset(train_ds, max_seq_length, seed, ignore_index)
        bucket_by_length = False  # every row is (nearly) max_seq_length long already
    if bucket_by_length:
        sampler = LengthBucketSampler(train_ds.lengths, micro_batch_size, seed, drop_last=drop_last)
    else:
        sampler = ShuffledBatchSampler(len(train_ds), micro_batch_size, seed, drop_last=drop_last)
    collate_fn = partial(collate, pad_id=pad_id, ignore_index=ignore_index, pad_multiple_of=pad_multiple_of,
                         max_seq_length=max_seq_length)
    train_dl = DataLoader(train_ds, batch_sampler=sampler, collate_fn=collate_fn, num_workers=num_workers)
    val_dl = None
    if len(val_ds):
        val_sampler = ShuffledBatchSampler(len(val_ds), eval_batch_size or micro_batch_size, shuffle=False)
        val_dl = DataLoader(val_ds, batch_sampler=val_sampler, collate_fn=collate_fn, num_workers=num_workers)

    samples = train_ds.dataset if packing else train_ds
    n_trainable = sum(n - p for n, p in zip(samples.lengths, samples.n_prompt)) if mask_prompt else \
        sum(n - 1 for n in samples.lengths)
    stats = {
        "source": rows.source, "n_rows": rows.n_rows, "n_skipped": rows.n_skipped,
        "n_train": len(train_ds), "n_val": len(val_ds), "n_samples": n_samples,
        "n_truncated": samples.n_truncated + val_ds.n_truncated,
        "n_no_trainable": samples.n_no_trainable + val_ds.n_no_trainable,
        "train_tokens": sum(samples.lengths), "train_target_tokens": n_trainable,
        "max_length": max(samples.lengths), "mean_length": sum(samples.lengths) / len(samples),
        "padding_fraction": padding_fraction(train_ds.lengths, sampler.batches(0)),
    }
    if rows.mix is not None:
        stats["mix"] = rows.mix
    if verbose:
        print(f"Data: {stats['n_samples']} training and {stats['n_val']} validation samples from {rows.source}; "
              f"{stats['n_truncated']} cut to max_seq_length={max_seq_length}, {stats['n_no_trainable']} dropped "
              f"with no trainable token left, {stats['n_skipped']} malformed rows skipped; "
              f"{stats['padding_fraction']:.0%} padding"
              + (f"; packed {n_samples} samples into {len(train_ds)} rows of {max_seq_length} tokens"
                 if packing else ""), file=sys.stderr)
    return train_dl, val_dl, stats
