"""The NeurIPS 2023 LLM Efficiency Challenge's HTTP API, served beside the OpenAI routes (`--challenge_api`).

The challenge scored each entry with HELM through a small HTTP server the entry shipped; these are its routes,
field names and defaults (the organisers' sample submissions):

    POST /process   {prompt, num_samples=1, max_new_tokens=50, top_k=200, temperature=0.8, seed=null,
                     echo_prompt=false}
                    -> {text, tokens: [{text, logprob, top_logprob: {token_text: logprob}}], logprob, request_time}
    POST /tokenize  {text, truncation=true, max_length=2048} -> {tokens: [int], request_time}
    POST /decode    {tokens: [int]} -> {text, request_time}

/process continues `prompt` as it is (HELM builds the whole prompt, few-shot examples included: no prompt style
is applied), with the model the server was started for (--challenge_model; default: the first --adapters adapter,
else the base), through the same continuous-batching engine as the OpenAI routes, so challenge and OpenAI
requests share the batch. It stops at the tokenizer's end-of-sequence tokens, the adapter's end-of-turn tokens, a
`stop_sequences` string (HELM sends them), or max_new_tokens.

    text          the continuation (with echo_prompt: the prompt, then the continuation)
    tokens        the continuation's tokens: each one's text, its log-probability, and the most likely token there
                  with its log-probability (top_logprob, one entry)
    logprob       the sum of the tokens' log-probabilities: log p(continuation | prompt) under the served model
    request_time  seconds from the request's arrival to its answer

Log-probabilities are the model's own (log softmax of the logits), not the temperature-scaled distribution the
token was sampled from: so `logprob` is the log-likelihood an evaluator gives the same text (lora_lab/serve/
logprobs.py). `temperature` 0 is greedy decoding; so is a temperature below 1e-5 (HELM's client sends 1e-7 for a
greedy request). Extra fields HELM sends are honoured when they mean something here (`stop_sequences`, `top_p`) and
ignored otherwise. Errors are the OpenAI routes' (lora_lab/serve/errors.py): a bad field is a 400 naming it, a full
queue a 429, and the server keeps serving; --api_key, --max_tokens_limit and /metrics apply here too.

/tokenize encodes as the model's tokenizer does (with BOS when the model's tokenizer adds one) and keeps the first
max_length tokens when truncation is on; /decode gives the text back (special tokens such as BOS left out), so
decode(tokenize(text)) == text.
"""

from __future__ import annotations

import time
from typing import Optional

from fastapi import APIRouter, Request as HTTPRequest
from pydantic import BaseModel, ConfigDict, Field

from lora_lab.serve.errors import APIError
from lora_lab.serve.logprobs import answer_tokens
from lora_lab.serve.openai_api import _max_tokens, engine_error, events, submit
from lora_lab.serve.server import ModelServer
from lora_lab.utils import LoraLabError

GREEDY_BELOW = 1e-5  # temperatures under this decode greedily (HELM asks for greedy with 1e-7)


class ProcessRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    prompt: str
    num_samples: int = Field(default=1, ge=1, le=1)  # one sample per request, as the challenge's entries did
    max_new_tokens: int = Field(default=50, ge=1)
    top_k: Optional[int] = Field(default=200, ge=1)
    temperature: float = Field(default=0.8, ge=0.0)
    seed: Optional[int] = None
    echo_prompt: Optional[bool] = False
    # sent by HELM's client, beyond the challenge's own fields
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop_sequences: list[str] = Field(default_factory=list)


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    text: str
    truncation: bool = True
    max_length: int = Field(default=2048, ge=1)


class DecodeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    tokens: list[int]


def challenge_router(server: ModelServer, model: Optional[str] = None) -> APIRouter:
    """The challenge's routes over `server`, answering with `model` (an adapter's name; None: the base)."""
    model = model or server.name
    if not server.is_base(model) and model not in server.store.names():
        raise LoraLabError(f"--challenge_model {model!r}: not the base model or a served adapter "
                           f"({', '.join([server.name] + server.store.names())})")
    router = APIRouter()

    @router.post("/process")
    async def process(body: ProcessRequest, http: HTTPRequest):
        t0 = time.perf_counter()
        temperature = 0.0 if body.temperature < GREEDY_BELOW else body.temperature
        max_tokens = _max_tokens(http, body.max_new_tokens, "max_new_tokens")
        # the OpenAI routes' plumbing: the same batch, queue limits, errors and /metrics labels
        req, queue = await submit(http, model, prompt=body.prompt, max_tokens=max_tokens, temperature=temperature,
                                  top_k=body.top_k, top_p=body.top_p, seed=body.seed,
                                  stop=[s for s in body.stop_sequences if s], logprobs=1)
        reason = None
        try:
            async for kind, payload in events(req, queue, http):
                if kind == "error":
                    raise engine_error(req, payload)
                if kind == "done":
                    reason = payload
        finally:
            if reason is None:  # the client went away: free the row
                req.cancelled = True
        tokens = answer_tokens(server.tokenizer, req)
        return {"text": (body.prompt if body.echo_prompt else "") + req.text,
                "tokens": [{"text": t["text"], "logprob": t["logprob"], "top_logprob": dict(t["top"][:1])}
                           for t in tokens],
                "logprob": sum(t["logprob"] for t in tokens),
                "request_time": time.perf_counter() - t0}

    @router.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        t0 = time.perf_counter()
        ids = server.tokenizer.encode(body.text).tolist()
        if body.truncation:
            ids = ids[:body.max_length]
        return {"tokens": ids, "request_time": time.perf_counter() - t0}

    @router.post("/decode")
    async def decode(body: DecodeRequest):
        t0 = time.perf_counter()
        vocab = server.model.config.vocab_size
        bad = next((i for i, t in enumerate(body.tokens) if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(400, f"tokens.{bad}: {body.tokens[bad]} is not a token id (0 to {vocab - 1})", "tokens")
        return {"text": server.tokenizer.decode(body.tokens), "request_time": time.perf_counter() - t0}

    return router
