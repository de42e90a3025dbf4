"""Token log-probabilities of a finished request, in the shapes the OpenAI API and the challenge API return.

The engine records, for a request asked with `logprobs=k`, each generated token's log-probability under the
served model (log softmax of the raw logits: not the temperature- or top-k-shaped distribution it was sampled
from, so that a sum over an answer is the log-likelihood an evaluator gives the same text; tests/
test_challenge_api.py checks it against lora_lab.evaluate's loglikelihood) and its k most likely alternatives.

`answer_tokens` turns those into per-token text. A token's text is what it adds to the decoded answer (decoded with
the token before it, as StreamDecoder does, so a leading space or a multi-byte character comes out right and the
texts concatenate to the answer). The tokens are those of the answer: an end-of-turn token that stopped the request
is not part of the text and not listed, and the tokens after a stop string's start are dropped with it.
"""

from __future__ import annotations

from typing import Optional

from lora_lab.serve.engine import Request


def _piece(tokenizer, prev: list[int], token: int) -> str:
    before = tokenizer.decode(prev) if prev else ""
    text = tokenizer.decode(prev + [token])
    return text[len(before):] if text.startswith(before) else tokenizer.decode([token])


def answer_tokens(tokenizer, req: Request) -> list[dict]:
    """[{"id", "text", "logprob", "top": [(text, logprob), ...]}] for the tokens of req's answer (req finished)."""
    ids = list(req.generated)
    if ids and req.finish_reason == "stop" and ids[-1] in req.stop_ids:
        ids = ids[:-1]  # the end-of-turn token: not part of the answer
    context = list(req.prompt_ids[-1:])
    context_text = tokenizer.decode(context)
    out, decoded = [], ""
    for i, token in enumerate(ids):
        if len(decoded) >= len(req.text):
            break  # a stop string cut the text before this token
        full = tokenizer.decode(context + ids[:i + 1])
        now = full[len(context_text):] if full.startswith(context_text) else tokenizer.decode(ids[:i + 1])
        if i + 1 < len(ids):
            now = now.rstrip("\ufffd")  # an incomplete character: its text goes with the token that completes it
        piece = now[len(decoded):]
        decoded = now if len(now) > len(decoded) else decoded
        logprob, top_ids, top_lps = req.token_logprobs[i]
        prev = (context + ids)[i:i + 1]  # the token before this one
        out.append({"id": token, "text": piece, "logprob": logprob,
                    "top": [(_piece(tokenizer, prev, t), lp) for t, lp in zip(top_ids, top_lps)]})
    return out


def openai_completion_logprobs(tokens: list[dict], k: int) -> dict:
    """The legacy completions API's `logprobs`: parallel lists, top_logprobs as {text: logprob} of k entries."""
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t["text"])
    return {"tokens": [t["text"] for t in tokens], "token_logprobs": [t["logprob"] for t in tokens],
            "top_logprobs": [dict(t["top"][:k]) for t in tokens], "text_offset": offsets}


def openai_chat_logprobs(tokens: list[dict], k: int) -> dict:
    """The chat API's `logprobs`: {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}."""
    def entry(text, logprob):
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [dict(entry(t["text"], t["logprob"]), top_logprobs=[entry(s, lp) for s, lp in t["top"][:k]])
                        for t in tokens], "refusal": None}


def requested(body) -> Optional[int]:
    """How many alternatives an OpenAI request asks for per token (None: no logprobs). Completions: `logprobs`
    (an int); chat: `logprobs` (a bool) with `top_logprobs` (an int)."""
    value = getattr(body, "logprobs", None)
    if isinstance(value, bool):
        return (getattr(body, "top_logprobs", None) or 0) if value else None
    return value


def openai_logprobs(tokenizer, req: Request, body, chat: bool) -> Optional[dict]:
    """A finished request's `logprobs` for its OpenAI choice (None when the request did not ask for them)."""
    k = requested(body)
    if k is None:
        return None
    tokens = answer_tokens(tokenizer, req)
    return openai_chat_logprobs(tokens, k) if chat else openai_completion_logprobs(tokens, k)
