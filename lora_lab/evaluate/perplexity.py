"""Perplexity: how well the model predicts text it is given, exp of the mean negative log-likelihood per token.

    ppl = exp( sum_i -log p(x_i | x_<i) / N )          over the N predicted tokens

Text longer than the model's window is scored with Hugging Face's sliding window ("Perplexity of fixed-length
models", transformers docs): windows of `max_length` tokens start every `stride` tokens, and each window scores
only the tokens the previous window did not (the ones after prev_end), with up to max_length - stride tokens of
context before them. stride = max_length gives disjoint windows (fast, little context at each window's start);
a smaller stride gives every token more context, at (max_length / stride) times the compute. The mean is
weighted by tokens: the summed NLL over all windows divided by the number of scored tokens (tests/test_evaluate.py
checks it against the same computation with transformers on our Hugging Face export).

On instruction data (rows with a prompt and an answer) the perplexity is that of the answers only: each row is
tokenized as fine-tuning does (prompt in the prompt style, then answer and EOS; lora_lab/data/sft.py) and only the
answer's tokens (and the EOS) are scored, given their prompt.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from lora_lab.model import GPT
from lora_lab.progress import progress


@torch.inference_mode()
def sliding_window_nll(model: GPT, ids: torch.Tensor, max_length: int, stride: int) -> tuple[float, int]:
    """(summed NLL, tokens scored) of the token stream ids (N,) with Hugging Face's sliding window."""
    if not 0 < stride <= max_length:
        from lora_lab.utils import LoraLabError

        raise LoraLabError(f"--stride {stride}: use a number in [1, max_length={max_length}]")
    device = model.wte.weight.device
    ids = ids.to(device)
    N = ids.numel()
    nll, count, prev_end = 0.0, 0, 0
    n_windows = max(1, math.ceil(max(N - max_length, 0) / stride) + 1)
    for begin in progress(range(0, N, stride), total=n_windows, desc="perplexity", unit="window"):
        end = min(begin + max_length, N)
        new = end - prev_end  # the tokens no earlier window scored: the last `new` of this window
        window = ids[begin:end][None]  # (1, T)
        first = max(window.size(1) - new, 1)  # the first scored position (position 0 has nothing to predict it)
        scored = torch.zeros_like(window, dtype=torch.bool)  # (1, T) position t predicts token t + 1
        scored[0, first - 1:-1] = True
        logits = model(window, logits_at=scored)  # (T - first, vocab): lm_head only where a token is scored
        targets = window[0, first:]  # (T - first,)
        nll += F.cross_entropy(logits.float(), targets, reduction="sum").item()
        count += targets.numel()
        prev_end = end
        if end == N:
            break
    return nll, count


@torch.inference_mode()
def answers_nll(model: GPT, samples: Sequence[dict], batch_size: int = 8) -> tuple[float, int]:
    """(summed NLL, tokens scored) of the target tokens of tokenized samples ({"input_ids", "labels"}, sft.py)."""
    from lora_lab.data.sft import IGNORE_INDEX, collate

    device = model.wte.weight.device
    nll, count = 0.0, 0
    starts = range(0, len(samples), batch_size)
    for start in progress(starts, desc="perplexity", unit="batch"):
        batch = collate(samples[start:start + batch_size])  # right-padded; pads are never targets
        labels = batch["labels"][:, 1:].to(device)  # (B, T - 1) position t predicts labels[t + 1]
        mask = labels != IGNORE_INDEX  # (B, T - 1)
        scored = F.pad(mask, (0, 1))  # (B, T): lm_head only at positions whose next token is a target
        logits = model(batch["input_ids"].to(device), logits_at=scored)  # (n, vocab) row-major, as labels[mask]
        nll += F.cross_entropy(logits.float(), labels[mask], reduction="sum").item()
        count += int(mask.sum())
    return nll, count


def perplexity(model: GPT, tokenizer, data: str, prompt_style=None, max_length: Optional[int] = None,
               stride: Optional[int] = None, blank_line_docs: bool = False, limit: Optional[int] = None,
               batch_size: int = 8) -> dict:
    """{"perplexity", "nll_per_token", "tokens", ...} of `data`: raw text (a .txt file or folder: the stream of
    lora_lab/data/text.py, documents separated by EOS) or instruction rows (a file or dataset name: answers only)."""
    from lora_lab.data.text import is_text_data, read_documents, token_stream

    max_length = min(max_length or model.config.block_size, model.config.block_size)
    if is_text_data(data):
        ids = token_stream(read_documents(data, blank_line_docs), tokenizer)  # (N,)
        if limit is not None:
            ids = ids[:int(limit)]  # --limit counts tokens here
        stride = stride or max_length // 2
        nll, count = sliding_window_nll(model, ids, max_length, stride)
        out = {"kind": "text", "max_length": max_length, "stride": stride}
    else:
        from lora_lab.data.instructions import load_instructions
        from lora_lab.data.sft import tokenize_sample

        rows = load_instructions(data, val_split_fraction=0.0)
        rows = rows.train[:int(limit)] if limit is not None else rows.train
        samples = [tokenize_sample(r, tokenizer, prompt_style, max_length) for r in rows]
        nll, count = answers_nll(model, samples, batch_size)
        out = {"kind": "answers", "rows": len(samples), "max_length": max_length}
    if count == 0:
        from lora_lab.utils import LoraLabError

        raise LoraLabError(f"{data}: no token to score (the text is shorter than 2 tokens)")
    return {"perplexity": math.exp(nll / count), "nll_per_token": nll / count, "tokens": count, **out}
