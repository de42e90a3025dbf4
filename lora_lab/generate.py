"""Autoregressive decoding with a KV cache: greedy, or sampled with temperature, top-k and top-p.

Also the plumbing the generate/*.py scripts share: device and precision choice, decoding a stream of token
ids into text as they arrive, and the speed / peak-memory report.
"""

from __future__ import annotations

import os
import resource
import sys
from typing import Iterator, Optional, Sequence, Union

import torch

from lora_lab.model import GPT


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
           top_p: Optional[float] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """logits (B, vocab) of the last position -> next token ids (B,). temperature 0 is greedy (argmax)."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        logits = top_k_filter(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def top_k_filter(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Set every logit below the k-th largest of its row to -inf. logits (B, vocab)."""
    kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probabilities add up to at least top_p (the top one always stays);
    the others get -inf. logits (B, vocab)."""
    sorted_logits, sorted_idx = torch.sort(logits, descending=True, dim=-1)  # (B, vocab) each
    probs = sorted_logits.softmax(dim=-1)
    drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p  # the mass before this token already reaches top_p
    drop = drop_sorted.scatter(-1, sorted_idx, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


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
    tokens = prompt.view(1, -1).to(model.wte.weight.device)  # (1, T)
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


@torch.inference_mode()
def generate_batch(model: GPT, prompts: Sequence[torch.Tensor], max_new_tokens: int, temperature: float = 1.0,
                   top_k: Optional[int] = None, top_p: Optional[float] = None, eos_ids: Sequence[int] = (),
                   generator: Optional[torch.Generator] = None, pad_id: int = 0) -> list[list[int]]:
    """A completion (token ids, up to and including the first EOS id) for each prompt, all rows decoded together
    with one KV cache (GRPO's num_generations samples of a prompt and of several prompts in one batch).

    The prompts are right-padded and prefilled at once (per-row start 0: a row's padding comes after its prompt,
    so causal attention never reads it); then each step feeds every row its newest token at its own position
    (input_pos a (B,) tensor), which overwrites the padding's cache entries before any query can see them. A
    finished row keeps decoding (its tokens are dropped) so that the batch stays rectangular."""
    B, device = len(prompts), model.wte.weight.device
    lengths = torch.tensor([len(p) for p in prompts], device=device)  # (B,)
    T = int(lengths.max())
    max_new_tokens = min(max_new_tokens, model.config.block_size - T)
    if max_new_tokens < 1:
        raise ValueError(f"A prompt has {T} tokens; the model's block_size is {model.config.block_size}")
    idx = torch.full((B, T), pad_id, dtype=torch.long, device=device)  # (B, T)
    for b, p in enumerate(prompts):
        idx[b, :len(p)] = p.to(device)
    last = torch.arange(T, device=device) == (lengths - 1)[:, None]  # (B, T): each row's last prompt token
    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    stop = set(int(i) for i in eos_ids)
    model.set_kv_cache(batch_size=B, max_seq_length=T + max_new_tokens)
    try:
        logits = model(idx, input_pos=torch.zeros(B, dtype=torch.long, device=device), logits_at=last)  # (B, V)
        pos = lengths.clone()  # (B,) where each row's next token goes
        for step in range(max_new_tokens):
            next_ids = sample(logits, temperature, top_k, top_p, generator)  # (B,)
            for b, token in enumerate(next_ids.tolist()):
                if not done[b]:
                    out[b].append(token)
                    done[b] = token in stop
            if all(done) or step + 1 == max_new_tokens:
                break
            logits = model(next_ids.view(B, 1), input_pos=pos)[:, -1]  # (B, V)
            pos = pos + 1
    finally:
        model.clear_kv_cache()
    return out


# ------------------------------------------------------------------------------------------------------------
# Streaming text out as tokens arrive
# ------------------------------------------------------------------------------------------------------------
class StreamDecoder:
    """Turns token ids, fed one at a time, into the text to print so far.

    Decoding each token alone is wrong in two ways: SentencePiece drops the leading space of the first piece
    it decodes ("▁world" -> "world"), and a character split over byte-fallback / byte-level tokens decodes
    to U+FFFD until its last byte arrives. So we decode the whole list of ids each time and print what was
    not printed before, holding back a trailing U+FFFD (its bytes may still be completed).

    `context_ids`: token ids that precede the generated ones (the last prompt token), decoded with them so
    that the first generated word keeps its leading space; they are not printed.
    """

    def __init__(self, tokenizer, context_ids: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.context_ids = list(context_ids)
        self.context_text = tokenizer.decode(self.context_ids) if self.context_ids else ""
        self.ids: list[int] = []
        self.printed = ""  # the text handed out so far

    def _text(self) -> str:
        if not self.context_ids:
            return self.tokenizer.decode(self.ids)
        text = self.tokenizer.decode(self.context_ids + self.ids)
        if text.startswith(self.context_text):
            return text[len(self.context_text):]
        return self.tokenizer.decode(self.ids)  # the context did not decode to a prefix: do without it

    def add(self, token_id: int) -> str:
        """Add one token id; return the new text that is safe to print (maybe "")."""
        self.ids.append(int(token_id))
        text = self._text().rstrip("\ufffd")
        return self._emit(text)

    def flush(self) -> str:
        """The rest of the text, including a trailing U+FFFD that was never completed."""
        return self._emit(self._text())

    def _emit(self, text: str) -> str:
        # normally `text` extends what was printed. If the decoder rewrote earlier text (rare: whitespace
        # clean-up), what was printed cannot be taken back, so carry on after as many characters
        if len(text) <= len(self.printed):
            return ""
        new = text[len(self.printed):]
        self.printed = text
        return new


# ------------------------------------------------------------------------------------------------------------
# Device, precision and the speed / memory report
# ------------------------------------------------------------------------------------------------------------
PRECISIONS = {
    "32-true": torch.float32, "float32": torch.float32, "fp32": torch.float32,
    "bf16-true": torch.bfloat16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "16-true": torch.float16, "float16": torch.float16, "fp16": torch.float16,
}


def select_device(device: str = "auto") -> torch.device:
    """"auto": the GPU when there is one, else the CPU. Otherwise any torch device string ("cuda:1", "mps")."""
    from lora_lab.utils import LoraLabError

    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise LoraLabError(f"Unknown device {device!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LoraLabError(f"--device {device}: no CUDA GPU is available to PyTorch; use --device cpu")
    return dev


def select_dtype(precision: Optional[str], device: Union[str, torch.device]) -> torch.dtype:
    """The weights' dtype: `precision` ("bf16-true", "bfloat16", "32-true", ...) or, when None, bfloat16 on a
    GPU that supports it, else float32 (CPU matmuls in 16 bits are slow and gain nothing here)."""
    from lora_lab.utils import LoraLabError

    if precision is None:
        if torch.device(device).type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if precision not in PRECISIONS:
        raise LoraLabError(f"Unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    return PRECISIONS[precision]


def reset_peak_memory(device: Union[str, torch.device]) -> None:
    """Start counting the peak from now. On Linux CPUs: reset the process's peak resident set size (VmHWM) to its
    current size, so that e.g. the float32 model QLoRA loads before quantizing it is not counted as training's."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif os.path.exists("/proc/self/clear_refs"):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # 5: reset the peak RSS (Linux >= 4.0)
        except OSError:  # not allowed here (some sandboxes): the peak then counts from the start of the process
            pass


def peak_memory_bytes(device: Union[str, torch.device]) -> int:
    """CUDA: the most memory tensors held (since the last reset). Otherwise: the process's peak resident set
    size (since the last reset on Linux; since it started elsewhere), which includes Python and PyTorch."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    if os.path.exists("/proc/self/status"):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB, macOS bytes


def synchronize(device: Union[str, torch.device]) -> None:
    """Wait for queued GPU work, so that timings measure the work and not just its launch."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def generation_stats(n_tokens: int, seconds: float, device: Union[str, torch.device]) -> str:
    """One line: tokens generated, time, tokens/s and peak memory."""
    device = torch.device(device)
    what = "peak memory allocated" if device.type == "cuda" else "peak RSS"
    return (f"{n_tokens} tokens in {seconds:.2f} s: {n_tokens / max(seconds, 1e-9):.2f} tokens/s; "
            f"{what} {peak_memory_bytes(device) / 2**30:.2f} GiB")
