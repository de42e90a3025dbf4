"""The OpenAI API (and vLLM's adapter endpoints) over the ModelServer in `app.state.server`, as one APIRouter.

    POST /v1/completions          {"model", "prompt", "max_tokens", "temperature", "top_p", "seed", "stop", "stream",
                                   "logprobs"}
    POST /v1/chat/completions     {"model", "messages", ...}: messages in the adapter's prompt style
    GET  /v1/models               the base model and every adapter (with "parent": the base)
    POST /v1/load_lora_adapter    {"lora_name", "lora_path"}   (vLLM's run-time adapter loading; off by default)
    POST /v1/unload_lora_adapter  {"lora_name"}

`model` is an adapter's name or the base model's name. Streaming answers are Server-Sent Events
(`data: {chunk}` lines, then `data: [DONE]`). Errors have OpenAI's body (lora_lab/serve/errors.py): unknown model
404, invalid fields or JSON 400 (naming the field), a prompt longer than the context 400 (saying the limit),
max_tokens over --max_tokens_limit 400, a full queue 429 with Retry-After, a request past --timeout 503. A client
that goes away (mid-stream or not) has its request dropped from the batch at the next step, which frees its row.

Other routers reuse the request plumbing: `submit(http, model, ...)` takes the adapter's slot and queues the
request (raising the API's errors), `events(...)` yields what the engine sends back.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Literal, Optional, Union

from fastapi import APIRouter, Request as HTTPRequest
from fastapi.responses import PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from lora_lab.serve.engine import QueueFull, Request
from lora_lab.serve.errors import APIError, not_found, rate_limited
from lora_lab.serve.logprobs import openai_logprobs, requested
from lora_lab.serve.server import ModelServer
from lora_lab.utils import LoraLabError

router = APIRouter()


# ---- request bodies (fields and defaults as in OpenAI's API; unknown fields are ignored, as OpenAI does) -------
class StreamOptions(BaseModel):
    include_usage: bool = False


class Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: int = Field(default=1, ge=1, le=1)  # one choice per request
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens tokens whatever comes (benchmarks)


class CompletionBody(Sampling):
    prompt: Union[str, list[str]]
    max_tokens: Optional[int] = Field(default=16, ge=1)  # OpenAI's default for completions
    logprobs: Optional[int] = Field(default=None, ge=0, le=20)  # per token: its logprob and this many alternatives


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[dict]]


class ChatBody(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=20)


class LoadAdapterBody(BaseModel):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadAdapterBody(BaseModel):
    lora_name: str = Field(min_length=1)
    lora_int_id: Optional[int] = None


def model_server(http: HTTPRequest) -> ModelServer:
    return http.app.state.server


def _text_content(content) -> str:
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if part.get("type") == "text")


def _max_tokens(http: HTTPRequest, asked: Optional[int], param: str = "max_tokens") -> int:
    """`asked` (None: the context), refused over --max_tokens_limit (None: no limit)."""
    limit = http.app.state.options.max_tokens_limit
    if asked is None:
        asked = model_server(http).engine.max_seq_length
        return min(asked, limit) if limit else asked
    if limit and asked > limit:
        raise APIError(400, f"{param} {asked} is more than this server's --max_tokens_limit {limit}", param)
    return asked


# ---- the plumbing every generating route shares ------------------------------------------------------------------
async def submit(http: HTTPRequest, model: str, prompt: Optional[str] = None, messages: Optional[list] = None,
                 **sampling) -> tuple[Request, asyncio.Queue]:
    """Take the adapter's slot, build the request and queue it in the engine; returns (request, event queue).
    Raises APIError: 404 unknown model, 400 bad prompt, 429 full queue, 503 shutting down / no free slot."""
    server = model_server(http)
    if server.knows(model):
        http.state.model = model  # the label of /metrics' request counter (unknown names are not labels)
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def on_event(kind, payload):  # called from the engine thread
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (kind, payload))
        except RuntimeError:  # the event loop is closed (shutting down)
            pass

    try:
        req = await run_in_threadpool(server.request, model, on_event, prompt=prompt, messages=messages, **sampling)
    except KeyError:
        raise not_found(model, [server.name, *server.store.names()]) from None
    except QueueFull as e:
        raise rate_limited(str(e)) from None
    except LoraLabError as e:
        status = getattr(e, "status", 400)
        raise APIError(status, str(e), getattr(e, "param", None) if status == 400 else None,
                       kind="invalid_request_error" if status == 400 else "server_error",
                       headers={"Retry-After": "1"} if status == 503 else None) from None
    try:
        server.engine.submit(req)
    except QueueFull as e:
        server.store.release(req.adapter) if req.adapter else None
        raise rate_limited(str(e)) from None
    except (ValueError, RuntimeError) as e:
        server.store.release(req.adapter) if req.adapter else None
        raise APIError(503, str(e), kind="server_error") from None
    return req, queue


async def events(req: Request, queue: asyncio.Queue, http: HTTPRequest):
    """The request's events as they come; polls for the client going away while waiting."""
    while True:
        try:
            kind, payload = await asyncio.wait_for(queue.get(), timeout=0.5)
        except asyncio.TimeoutError:
            if await http.is_disconnected():
                req.cancelled = True
                return
            continue
        yield kind, payload
        if kind in ("done", "error"):
            return


def engine_error(req: Request, message: str) -> APIError:
    if req.finish_reason == "timeout":
        return APIError(503, message, code="timeout", kind="server_error")
    return APIError(500, message, kind="server_error")


def usage(req: Request) -> dict:
    p, c = len(req.prompt_ids), len(req.generated)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


async def respond(req: Request, queue: asyncio.Queue, http: HTTPRequest, body: Sampling, chat: bool):
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())
    if not body.stream:
        text, reason = [], None
        try:
            async for kind, payload in events(req, queue, http):
                if kind == "text":
                    text.append(payload)
                elif kind == "error":
                    raise engine_error(req, payload)
                else:
                    reason = payload
        finally:
            if reason is None:
                req.cancelled = True
        logprobs = openai_logprobs(model_server(http).tokenizer, req, body, chat)  # lora_lab/serve/logprobs.py
        choice = ({"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                   "logprobs": logprobs, "finish_reason": reason} if chat else
                  {"index": 0, "text": "".join(text), "logprobs": logprobs, "finish_reason": reason})
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": body.model, "choices": [choice], "usage": usage(req)}

    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(delta: Optional[str], reason=None, role=False) -> str:
        if chat:
            d = {"role": "assistant", "content": ""} if role else ({} if delta is None else {"content": delta})
            choice = {"index": 0, "delta": d, "logprobs": None, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": reason}
        return "data: " + json.dumps({"id": rid, "object": obj, "created": created, "model": body.model,
                                      "choices": [choice]}) + "\n\n"

    async def stream():
        done = False
        try:
            if chat:
                yield chunk(None, role=True)
            async for kind, payload in events(req, queue, http):
                if kind == "text":
                    yield chunk(payload)
                elif kind == "error":
                    error = engine_error(req, payload)
                    yield "data: " + json.dumps({"error": {"message": payload, "type": error.kind,
                                                           "code": error.code}}) + "\n\n"
                    done = True
                    break
                else:
                    yield chunk(None, reason=payload)
                    done = True
            if done and body.stream_options and body.stream_options.include_usage:
                yield "data: " + json.dumps({"id": rid, "object": obj, "created": created, "model": body.model,
                                             "choices": [], "usage": usage(req)}) + "\n\n"
            if done:
                yield "data: [DONE]\n\n"
        finally:  # the client went away (the generator is closed or cancelled): free the row
            if not done:
                req.cancelled = True

    return StreamingResponse(stream(), media_type="text/event-stream")


def _sampling(body: Sampling) -> dict:
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if body.stream and requested(body) is not None:
        raise APIError(400, "logprobs: not supported with stream=true (ask without streaming)", "logprobs")
    return dict(temperature=body.temperature, top_p=body.top_p, seed=body.seed, stop=stop, ignore_eos=body.ignore_eos,
                logprobs=requested(body))


# ---- the routes ----------------------------------------------------------------------------------------------------
@router.post("/v1/completions")
async def completions(body: CompletionBody, http: HTTPRequest):
    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise APIError(400, "prompt: give one prompt per request (a string, or a list of one)", "prompt")
        prompt = prompt[0]
    max_tokens = _max_tokens(http, body.max_tokens)
    req, queue = await submit(http, body.model, prompt=prompt, max_tokens=max_tokens, **_sampling(body))
    return await respond(req, queue, http, body, chat=False)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatBody, http: HTTPRequest):
    messages = [{"role": m.role, "content": _text_content(m.content)} for m in body.messages]
    param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
    max_tokens = _max_tokens(http, body.max_completion_tokens or body.max_tokens, param)
    req, queue = await submit(http, body.model, messages=messages, max_tokens=max_tokens, **_sampling(body))
    return await respond(req, queue, http, body, chat=True)


@router.get("/v1/models")
async def models(http: HTTPRequest):
    server = model_server(http)
    data = [{"id": server.name, "object": "model", "created": server.created, "owned_by": "lora_lab",
             "root": server.name, "parent": None}]
    for name in server.store.names():
        data.append({"id": name, "object": "model", "created": server.created, "owned_by": "lora_lab",
                     "root": name, "parent": server.name})
    return {"object": "list", "data": data}


@router.post("/v1/load_lora_adapter")
async def load_adapter(body: LoadAdapterBody, http: HTTPRequest):
    server = model_server(http)
    if server.is_base(body.lora_name):
        raise APIError(400, f"{body.lora_name!r} is the base model's name", "lora_name")
    try:
        await run_in_threadpool(server.store.register_at_run_time, body.lora_name, body.lora_path)
    except LoraLabError as e:
        status = getattr(e, "status", 400)
        raise APIError(status, str(e), "lora_path", kind="permission_error" if status == 403 else
                       "invalid_request_error") from None
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@router.post("/v1/unload_lora_adapter")
async def unload_adapter(body: UnloadAdapterBody, http: HTTPRequest):
    server = model_server(http)
    if not server.store.allow_runtime_loading:
        raise APIError(403, "run-time adapter loading is off: start the server with --allow_runtime_loading",
                       "lora_name", kind="permission_error")
    try:
        await run_in_threadpool(server.store.unregister, body.lora_name)
    except LoraLabError as e:
        raise APIError(404, str(e), "lora_name", "model_not_found", "NotFoundError") from None
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
