"""Our GPT as an lm-evaluation-harness model: a `TemplateLM` subclass, so lm-eval's tasks score it directly.

lm-eval asks a model three kinds of question (its `Instance`s):

  loglikelihood(context, continuation)   log p(continuation | context) = sum over the continuation's tokens of
                                         log softmax(logits)[token], and whether every token is the argmax
                                         (multiple-choice tasks pick the choice with the highest sum)
  loglikelihood_rolling(text)            log p(text), the text cut into windows of at most block_size tokens
                                         that each predict new tokens only (perplexity tasks)
  generate_until(context, {until, ...})  a greedy continuation, cut at the first stop sequence

Batching. Requests that feed the model the same tokens share one row (the one-token answers " A" ... " D" of an
MMLU question all read the question: one forward pass, as lm-eval's hf model does with its logits cache). The rows
are sorted by length, longest first (as lm-eval's own Collator does, so a batch holds
sequences of similar length and the first batch is the largest: an out-of-memory error comes at once), right-padded
to the longest of the batch and run together. Right padding needs no attention mask: with causal attention a
position never sees the positions after it, so the pads cannot change the logits of the real tokens
(tests/test_evaluate.py: batched == one at a time). Only the continuation's positions go through log_softmax,
not the whole (B, T, vocab) tensor.

generate_until decodes one request at a time with the KV cache (lora_lab.generate.generate), greedily, checking
the stop sequences on the decoded text after each token so that it stops as soon as one appears.

Tokenization follows lm-eval's `hf` model, so that the two score the same tokens: `tok_encode` adds BOS exactly
when the model's tokenizer does by default, an empty context becomes the prefix token (BOS, or EOS for models
without one), and a context's trailing spaces move to the continuation (TemplateLM._encode_pair).
"""

from __future__ import annotations

import sys
from typing import Optional

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences, postprocess_generated_text

from lora_lab.generate import generate
from lora_lab.model import GPT
from lora_lab.progress import progress
from lora_lab.tokenizer import Tokenizer


class LoraLabLM(TemplateLM):
    def __init__(self, model: GPT, tokenizer: Tokenizer, batch_size: int = 8, max_gen_toks: int = 256,
                 max_length: Optional[int] = None, progress: bool = True) -> None:
        super().__init__()
        self.model, self.tok = model.eval(), tokenizer
        self.batch_size = batch_size
        self.max_gen_toks = max_gen_toks
        self._max_length = max_length or model.config.block_size
        self.progress = progress
        self.n_requests = 0  # requests answered (a rolling loglikelihood counts once, not per window)
        self._device = model.wte.weight.device

    # ---- tokenization, as lm-eval's hf model does it -------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id if self.tok.bos_id is not None else self.tok.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        bos = False if add_special_tokens is False else None  # None: the tokenizer's default, like HF's
        if add_special_tokens is None and self.tok.bos_id is not None and \
                string.startswith(self.tok.decode([self.tok.bos_id], skip_special_tokens=False)):
            bos = False  # the text already starts with BOS: do not add a second one
        return self.tok.encode(string, bos=bos).tolist()

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        if isinstance(tokens, int):
            tokens = [tokens]
        return self.tok.decode(tokens, skip_special_tokens=skip_special_tokens)

    # ---- loglikelihood ---------------------------------------------------------------------------------------
    @torch.inference_mode()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: [((context, continuation) or None, context_ids, continuation_ids)] -> [(logprob, is_greedy)]."""
        L = self.max_length
        self.n_requests += sum(r[0] is not None for r in requests)
        # the model reads (context + continuation) minus its last token, cut from the left to block_size. Requests
        # that read the same tokens (a multiple-choice question's one-token answers " A", " B", ...: the same
        # context) share one row of the batch: their logits are the same
        rows: dict[tuple, list[int]] = {}
        for i, (_, context, continuation) in enumerate(requests):
            rows.setdefault(tuple((context + continuation)[-(L + 1):][:-1]), []).append(i)
        order = sorted(rows, key=lambda inp: (-len(inp), inp))  # longest first
        results: list = [None] * len(requests)
        starts = range(0, len(order), self.batch_size)
        for start in progress(starts, desc="loglikelihood", unit="batch") if self.progress and not disable_tqdm \
                else starts:
            batch = order[start:start + self.batch_size]
            T = len(batch[0])
            idx = torch.zeros(len(batch), T, dtype=torch.long)  # (B, T) right padding: the pads come after
            # lm_head only where a continuation is scored: from a row's earliest continuation start to its end
            scored = torch.zeros(len(batch), T, dtype=torch.bool)  # (B, T)
            first = []
            for b, inp in enumerate(batch):
                idx[b, :len(inp)] = torch.tensor(inp)
                first.append(min(len(inp) - len(requests[i][2]) for i in rows[inp]))
                scored[b, first[b]:len(inp)] = True
            logits = self.model(idx.to(self._device), logits_at=scored.to(self._device))  # (n, vocab) row-major
            offset = 0
            for b, inp in enumerate(batch):
                row_logits = logits[offset:offset + len(inp) - first[b]]  # positions first[b] .. len(inp) - 1
                offset += len(inp) - first[b]
                for i in rows[inp]:
                    cont = requests[i][2]
                    n, c = len(inp), len(cont)
                    # (c, vocab) the continuation's
                    logprobs = F.log_softmax(row_logits[n - c - first[b]:n - first[b]].float(), dim=-1)
                    target = torch.tensor(cont, device=logprobs.device)  # (c,)
                    logprob = logprobs.gather(-1, target[:, None]).sum().item()
                    greedy = bool((logprobs.argmax(dim=-1) == target).all())
                    results[i] = (logprob, greedy)
                    if requests[i][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        self.n_requests += len(requests)
        for r, req in enumerate(requests):
            (string,) = req.args
            for context, continuation in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owner.append(r)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for r, (logprob, _) in zip(owner, scores):
            totals[r] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ---- generation ------------------------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        self.n_requests += len(requests)
        out = []
        for req in progress(requests, desc="generate_until", unit="request") if self.progress and not disable_tqdm \
                else requests:
            context, gen_kwargs = req.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.pop("until", None)
            until = handle_stop_sequences(list(until) if isinstance(until, list) else until, eos=eos)  # a copy
            max_gen_toks = int(gen_kwargs.pop("max_gen_toks", gen_kwargs.pop("max_new_tokens", self.max_gen_toks)))
            if gen_kwargs.get("do_sample") and gen_kwargs.get("temperature", 0.0) > 0:
                print("note: generate_until decodes greedily (do_sample is ignored)", file=sys.stderr)
            context_ids = self.tok_encode(context)[-(self.max_length - max_gen_toks):]  # left-truncated
            ids: list[int] = []
            for token in generate(self.model, torch.tensor(context_ids), max_gen_toks, temperature=0.0,
                                  eos_ids=[self.eot_token_id]):
                ids.append(token)
                text = self.tok_decode(ids)
                if any(term and term in text for term in until):
                    break  # a stop sequence appeared: the rest would be cut anyway
            text = postprocess_generated_text(self.tok_decode(ids), stop=until, think_end_token=None)
            out.append(text)
            self.cache_hook.add_partial("generate_until", (context, req.args[1]), text)
        return out
