"""Autoregressive decoding with a KV cache: greedy, or sampled with temperature, top-k and top-p."""

from __future__ import annotations

from typing import Iterator, Optional, Sequence

import torch

from lora_lab.model import GPT


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
           top_p: Optional[float] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """logits (B, vocab) of the last position -> next token ids (B,). temperature 0 is greedy (argmax)."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        # keep the smallest set of tokens whose probabilities add up to at least top_p (the top one always stays)
        sorted_logits, sorted_idx = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= top_p  # mass before this token already >= top_p
        drop = drop_sorted.scatter(-1, sorted_idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(model: GPT, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None, eos_ids: Sequence[int] = (),
             generator: Optional[torch.Generator] = None, use_kv_cache: bool = True) -> Iterator[int]:
    """Yield up to max_new_tokens new token ids after `prompt` (T,), stopping after an EOS id (which is yielded).

    With use_kv_cache the prompt is encoded once and each step feeds only the newest token; without it every
    step re-runs the whole sequence (slow, but it is the reference the cache is tested against).
    """
    T = prompt.size(0)
    max_len = min(T + max_new_tokens, model.config.block_size)
    if T >= model.config.block_size:
        raise ValueError(f"The prompt has {T} tokens; the model's block_size is {model.config.block_size}")
    tokens = prompt.view(1, -1).to(model.lm_head.weight.device)  # (1, T)
    if use_kv_cache:
        model.set_kv_cache(batch_size=1, max_seq_length=max_len)
    try:
        logits = model(tokens, input_pos=0 if use_kv_cache else None)[:, -1]  # (1, vocab)
        for pos in range(T, max_len):
            next_id = sample(logits, temperature, top_k, top_p, generator)  # (1,)
            yield int(next_id)
            if int(next_id) in eos_ids or pos + 1 == max_len:
                return
            if use_kv_cache:
                logits = model(next_id.view(1, 1), input_pos=pos)[:, -1]
            else:
                tokens = torch.cat((tokens, next_id.view(1, 1)), dim=1)
                logits = model(tokens)[:, -1]
    finally:
        if use_kv_cache:
            model.clear_kv_cache()
