"""The serving engine: continuous batching of requests that use different adapters, on one model.

Each request owns one row of a key/value cache of `max_batch_size` rows (SlotKVCache). The engine thread loops:

    1. drop the requests whose client went away, and let waiting requests join: their prompts are prefilled
       together, right-padded, in the free rows (input_pos = 0 for each; the cache masks each row's own
       positions, lora_lab/model.py), and each gets its first token from its last prompt position;
    2. one decode step for every running row: the batch feeds each row's newest token at its own position
       (input_pos is a (B,) tensor), each row with its own adapter (bank.slots, lora_lab/serve/multi_lora.py),
       its own sampling settings and its own random generator;
    3. rows that finished (end-of-turn token, a stop string, max_tokens, the context) leave; the last running
       row moves into the freed row, so the running rows are always rows 0..n-1 and the batch is the cache's
       first n rows (no gather of the cache).

So requests join and leave the batch at every step and never wait for each other to finish. A row's tokens
depend only on its own prompt and adapter: greedy decoding gives what generate/base.py / generate/lora.py give
for that prompt alone (up to the rounding of batched matmuls; tests/test_serve.py,
test_concurrent_mixed_adapters_match_generate_scripts, checks token for token).

Events go back to the caller through `Request.on_event(kind, payload)`, called from the engine thread:
("text", str) for new text, then ("done", finish_reason) with finish_reason "stop", "length" or "abort", or
("error", message) (then `finish_reason` is "error", or "timeout" for a request past `timeout`).

Bounds, so that a burst cannot make every client wait: `max_queue` requests may wait beyond the running batch
(`submit` raises QueueFull past it: the server answers 429), and a request not finished `timeout` seconds after it
arrived ends with an error and frees its row. Counters for /metrics and the tests: `tokens_generated`, `finished`
{finish_reason: count}; `listeners` are called with each finished request, `gap_listeners` once a step with the
time since each decoded row's previous token (both from the engine thread).
Sampling: each request has its own torch.Generator (seeded with its `seed`, else from the OS), so requests never
touch the global RNG or each other's.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn

from lora_lab.generate import StreamDecoder, sample
from lora_lab.model import KVCache


class QueueFull(RuntimeError):
    """More requests than the running batch plus `max_queue` waiting ones: come back later (HTTP 429)."""


class SlotKVCache(KVCache):
    """A KV cache whose batch row b is cache row `row_offset + b`, written at per-row positions.

    The engine prefills new requests in rows n.. (row_offset = n) and decodes rows 0..n-1 (row_offset = 0).
    `update` returns the rows of this batch up to the furthest position written (a view: no copy); each row's
    positions after its own are masked by the attention (lora_lab.model.attention_mask with per-row starts)."""

    row_offset = 0

    def update(self, start, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, T = k.size(0), k.size(2)
        pos = start.view(-1, 1) + torch.arange(T, device=k.device)  # (B, T)
        end = int(pos.max()) + 1
        if end > self.k.size(2):
            raise ValueError(f"KV cache holds {self.k.size(2)} positions, asked to write up to {end}")
        rows = self.row_offset + torch.arange(B, device=k.device)[:, None]  # (B, 1)
        self.k[rows, :, pos] = k.transpose(1, 2)  # indexed view (B, T, ng, hs)
        self.v[rows, :, pos] = v.transpose(1, 2)
        rows = slice(self.row_offset, self.row_offset + B)
        return self.k[rows, :, :end], self.v[rows, :, :end]  # (B, ng, end, hs)

    def move_row(self, src: int, dst: int, length: int) -> None:
        self.k[dst, :, :length] = self.k[src, :, :length]
        self.v[dst, :, :length] = self.v[src, :, :length]


@dataclass
class Request:
    prompt_ids: list[int]
    max_tokens: int
    on_event: Callable[[str, object], None]
    temperature: float = 0.0
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    seed: Optional[int] = None
    stop_ids: Sequence[int] = ()
    stop: Sequence[str] = ()  # stop strings: the text ends before the first one
    slot: int = 0  # the adapter's slot (0: the base model)
    adapter: Optional[str] = None
    cancelled: bool = False  # set by the caller (client gone): the engine drops the request at its next step
    logprobs: Optional[int] = None  # record each token's log-probability and this many top alternatives
    # filled in by the engine
    generated: list[int] = field(default_factory=list)
    finish_reason: Optional[str] = None
    text: str = ""  # all the text so far (stop strings cut off)
    token_logprobs: list = field(default_factory=list)  # with logprobs: per token (logprob, top ids, top logprobs)
    sent: int = 0  # how much of `text` went out in ("text", ...) events
    first_token_time: Optional[float] = None
    last_token_time: Optional[float] = None
    finish_time: Optional[float] = None
    submit_time: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        self.generator: Optional[torch.Generator] = None
        self.decoder: Optional[StreamDecoder] = None


class Engine:
    def __init__(self, model: nn.Module, tokenizer, store, max_batch_size: int = 16,
                 max_seq_length: Optional[int] = None, max_prefill_tokens: int = 4096,
                 on_release: Optional[Callable[[Request], None]] = None, max_queue: Optional[int] = None,
                 timeout: Optional[float] = None) -> None:
        self.model, self.tokenizer, self.store = model, tokenizer, store
        self.max_batch_size = max_batch_size
        self.max_seq_length = min(max_seq_length or model.config.block_size, model.config.block_size)
        self.max_prefill_tokens = max_prefill_tokens
        self.on_release = on_release
        self.max_queue = max_queue  # None: no bound on the waiting requests
        self.timeout = timeout  # None: requests may take as long as they take
        self.listeners: list[Callable[[Request], None]] = []
        self.gap_listeners: list[Callable[[list[float]], None]] = []
        self.tokens_generated = 0
        self.finished: dict[str, int] = {}  # finish_reason -> requests
        self.device = model.wte.weight.device
        p = model.wte.weight
        with torch.inference_mode():
            self.caches = []
            for block in model.blocks:
                cache = SlotKVCache(model.config, max_batch_size, self.max_seq_length, p.device, p.dtype)
                block.attn.kv_cache = cache
                self.caches.append(cache)
        self.rows: list[Request] = []  # running requests; rows[i] owns cache row i
        self.lengths: list[int] = []  # tokens of rows[i] in the cache
        self.waiting: deque[Request] = deque()
        self.cond = threading.Condition()
        self.stopping = False
        self.drain_deadline: Optional[float] = None  # set by drain(): abort what still runs after it
        self.steps = 0
        self.thread: Optional[threading.Thread] = None

    # ---- the caller's side -----------------------------------------------------------------------------------
    def start(self) -> "Engine":
        self.thread = threading.Thread(target=self._loop, name="lora_lab-engine", daemon=True)
        self.thread.start()
        return self

    def has_room(self) -> bool:
        """Whether one more request would be taken now (the server asks before it loads an adapter for it)."""
        return self.max_queue is None or len(self.rows) + len(self.waiting) < self.max_batch_size + self.max_queue

    def submit(self, req: Request) -> None:
        if not req.prompt_ids:
            raise ValueError("empty prompt")
        if len(req.prompt_ids) >= self.max_seq_length:
            raise ValueError(f"prompt of {len(req.prompt_ids)} tokens; the context holds {self.max_seq_length}")
        with self.cond:
            if self.stopping or self.drain_deadline is not None:
                raise RuntimeError("the server is shutting down")
            if not self.has_room():
                raise QueueFull(f"the server is at capacity ({self.max_batch_size} running and {self.max_queue} "
                                f"waiting requests): retry later")
            self.waiting.append(req)
            self.cond.notify()

    def drain(self, grace: float) -> None:
        """Begin shutting down (Ctrl-C): take no new requests, let the running ones finish for `grace` seconds,
        then abort the rest (("done", "abort")), so that open streams end properly before the server closes."""
        with self.cond:
            if self.drain_deadline is None:
                self.drain_deadline = time.perf_counter() + grace
            self.cond.notify()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Abort the running and waiting requests (each gets ("done", "abort")) and stop the engine thread."""
        with self.cond:
            self.stopping = True
            self.cond.notify()
        if self.thread is not None:
            self.thread.join(timeout)

    def busy(self) -> int:
        return len(self.rows) + len(self.waiting)

    # ---- the engine thread -----------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.stopping and not self.waiting and not self.rows:
                    self.cond.wait()
                if self.stopping:
                    break
            try:
                self.step()
            except Exception as e:  # never leave clients hanging: fail what is running, keep serving
                traceback.print_exc()
                for req in self.rows:
                    self._finish(req, None, error=f"engine error: {type(e).__name__}: {e}")
                self.rows, self.lengths = [], []
                for cache in self.caches:
                    cache.row_offset = 0
        with self.cond:
            pending = list(self.waiting) + self.rows
            self.waiting.clear()
        with self.store.lock:
            for req in pending:
                self._finish(req, "abort")
        self.rows, self.lengths = [], []

    @torch.inference_mode()
    def step(self) -> None:
        """Admit and prefill waiting requests, then one decode step for every running request."""
        with self.store.lock:
            if self.drain_deadline is not None and time.perf_counter() > self.drain_deadline:
                for req in self.rows:
                    req.cancelled = True
            if self.timeout is not None:
                self._time_out(time.perf_counter() - self.timeout)
            self._drop_cancelled()
            admitted = []
            with self.cond:
                while self.waiting and len(self.rows) + len(admitted) < self.max_batch_size:
                    req = self.waiting.popleft()
                    if req.cancelled:
                        self._finish(req, "abort")
                    else:
                        admitted.append(req)
            # prefill in groups of at most max_prefill_tokens padded tokens
            while admitted:
                group, longest = [], 0
                while admitted:
                    longest_if = max(longest, len(admitted[0].prompt_ids))
                    if group and longest_if * (len(group) + 1) > self.max_prefill_tokens:
                        break
                    group.append(admitted.pop(0))
                    longest = longest_if
                self._prefill(group)
            if self.rows:
                self._decode()
            self.steps += 1

    def _set_adapters(self, reqs: list[Request]) -> None:
        slots = [r.slot for r in reqs]
        self.store.bank.slots = torch.tensor(slots, device=self.device) if any(slots) else None

    def _prefill(self, reqs: list[Request]) -> None:
        n, m = len(self.rows), len(reqs)
        T = max(len(r.prompt_ids) for r in reqs)
        idx = torch.zeros(m, T, dtype=torch.long)  # (m, T) right-padded prompts
        for i, r in enumerate(reqs):
            idx[i, :len(r.prompt_ids)] = torch.tensor(r.prompt_ids)
        for cache in self.caches:
            cache.row_offset = n  # these prompts go to rows n..n+m-1
        self._set_adapters(reqs)
        input_pos = torch.zeros(m, dtype=torch.long, device=self.device)  # (m,)
        hidden = final_hidden(self.model, idx.to(self.device), input_pos)  # (m, T, C)
        last = torch.tensor([len(r.prompt_ids) - 1 for r in reqs], device=self.device)  # (m,)
        logits = self.model.logits(hidden[torch.arange(m, device=self.device), last][:, None])[:, -1]  # (m, vocab)
        for cache in self.caches:
            cache.row_offset = 0
        for r in reqs:
            r.generator = torch.Generator(device=self.device)  # this request's own: the global RNG is not touched
            if r.seed is not None:
                r.generator.manual_seed(r.seed)
            else:
                r.generator.seed()  # a seed from the OS, for this generator only
            r.decoder = StreamDecoder(self.tokenizer, context_ids=r.prompt_ids[-1:])
            self.rows.append(r)
            self.lengths.append(len(r.prompt_ids))
        self._sample_and_emit(list(range(n, n + m)), logits)

    def _decode(self) -> None:
        n = len(self.rows)
        idx = torch.tensor([[r.generated[-1]] for r in self.rows], device=self.device)  # (n, 1)
        input_pos = torch.tensor(self.lengths, device=self.device)  # (n,) each row's own position
        self._set_adapters(self.rows)
        logits = self.model(idx, input_pos=input_pos)[:, -1]  # (n, vocab)
        for i in range(n):
            self.lengths[i] += 1  # the fed token is in the cache now
        self._sample_and_emit(list(range(n)), logits)

    def _sample_and_emit(self, rows: list[int], logits: torch.Tensor) -> None:
        greedy = logits.argmax(dim=-1).tolist()  # (B,)
        now = time.perf_counter()
        gaps = []  # seconds since each row's previous token (rows past their first)
        for j, i in enumerate(rows):
            r = self.rows[i]
            if r.temperature == 0.0:
                token = greedy[j]
            else:
                token = int(sample(logits[j:j + 1], r.temperature, r.top_k, r.top_p, r.generator))
            r.generated.append(token)
            self.tokens_generated += 1
            if r.logprobs is not None:  # under the model itself: the raw logits, whatever the sampling settings
                lp = logits[j].float().log_softmax(dim=-1)  # (vocab,)
                top = lp.topk(max(r.logprobs, 1))
                r.token_logprobs.append((float(lp[token]), top.indices.tolist(), top.values.tolist()))
            if r.first_token_time is None:
                r.first_token_time = now
            else:
                gaps.append(now - r.last_token_time)
            r.last_token_time = now
            self._advance(r, token, self.lengths[i])
        for listener in self.gap_listeners if gaps else ():
            try:
                listener(gaps)
            except Exception:  # a metric must never take the engine down
                traceback.print_exc()
        finished = [i for i, r in enumerate(self.rows) if r.finish_reason is not None]
        self._remove_rows(finished)

    def _advance(self, r: Request, token: int, length: int) -> None:
        """Add `token` to r's text; set r.finish_reason when r is done. length: r's tokens in the cache."""
        if token in r.stop_ids:
            return self._finish(r, "stop", flush=True)
        r.text += r.decoder.add(token)
        if r.stop and self._cut_at_stop(r):
            return self._finish(r, "stop")
        # the limit: max_tokens, or the context (the new token needs a cache position when it is fed back)
        if len(r.generated) >= r.max_tokens or length + 1 >= self.max_seq_length:
            return self._finish(r, "length", flush=True)
        self._send(r, hold=max((len(s) - 1 for s in r.stop), default=0))

    def _cut_at_stop(self, r: Request) -> bool:
        hits = [i for i in (r.text.find(s, max(0, r.sent - len(s))) for s in r.stop if s) if i >= 0]
        if not hits:
            return False
        r.text = r.text[:min(hits)]
        return True

    def _send(self, r: Request, hold: int = 0) -> None:
        """Send the text not sent yet, except its last `hold` characters when they may begin a stop string."""
        end = len(r.text)
        if hold:
            tail = r.text[max(r.sent, end - hold):]
            keep = next((len(tail) - k for k in range(len(tail)) if any(s.startswith(tail[k:]) for s in r.stop)), 0)
            end -= keep
        if end > r.sent:
            r.on_event("text", r.text[r.sent:end])
            r.sent = end

    def _finish(self, r: Request, reason: Optional[str], flush: bool = False, error: Optional[str] = None) -> None:
        if r.finish_reason is not None:
            return
        if flush and r.decoder is not None:
            r.text += r.decoder.flush()
            if r.stop:
                self._cut_at_stop(r)
        r.finish_reason = reason or "error"
        r.finish_time = time.perf_counter()
        self.finished[r.finish_reason] = self.finished.get(r.finish_reason, 0) + 1
        if error is None and reason != "abort":
            self._send(r)
        try:
            if error is not None:
                r.on_event("error", error)
            else:
                r.on_event("done", reason)
        finally:
            if self.on_release is not None:
                self.on_release(r)
            for listener in self.listeners:
                try:
                    listener(r)
                except Exception:  # a metric must never take the engine down
                    traceback.print_exc()

    def _time_out(self, arrived_before: float) -> None:
        """End the requests (waiting or running) that arrived before `arrived_before`: an error, their rows freed."""
        message = f"the request did not finish within this server's --timeout of {self.timeout:g} s"
        with self.cond:
            late = [r for r in self.waiting if r.submit_time < arrived_before]
            for r in late:
                self.waiting.remove(r)
        late += [r for r in self.rows if r.submit_time < arrived_before]
        for r in late:
            self._finish(r, "timeout", error=message)
        self._remove_rows([i for i, r in enumerate(self.rows) if r.finish_reason == "timeout"])

    def _drop_cancelled(self) -> None:
        gone = [i for i, r in enumerate(self.rows) if r.cancelled]
        for i in gone:
            self._finish(self.rows[i], "abort")
        self._remove_rows(gone)

    def _remove_rows(self, rows: list[int]) -> None:
        """Remove finished rows; the last running row moves into each freed row (its cache row is copied)."""
        for i in sorted(rows, reverse=True):
            last = len(self.rows) - 1
            if i != last:
                for cache in self.caches:
                    cache.move_row(last, i, self.lengths[last])
                self.rows[i], self.lengths[i] = self.rows[last], self.lengths[last]
            self.rows.pop()
            self.lengths.pop()


def final_hidden(model: nn.Module, idx: torch.Tensor, input_pos) -> torch.Tensor:
    """The model's final normed hidden states (B, T, C), without running lm_head on every prompt position:
    only each prompt's last position needs logits, and a (B, T, vocab) tensor would be most of a prefill's
    memory."""
    return model.hidden_states(idx, input_pos=input_pos)  # (B, T, C)
