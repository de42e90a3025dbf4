"""The HTTP layer: the OpenAI API (and vLLM's adapter endpoints) over a ModelServer, with FastAPI.

    POST /v1/completions          {"model", "prompt", "max_tokens", "temperature", "top_p", "seed", "stop", "stream"}
    POST /v1/chat/completions     {"model", "messages", ...}: messages in the adapter's prompt style
    GET  /v1/models               the base model and every adapter (with "parent": the base)
    POST /v1/load_lora_adapter    {"lora_name", "lora_path"}   (vLLM's run-time adapter loading)
    POST /v1/unload_lora_adapter  {"lora_name"}
    GET  /health
    GET  /                        the playground, a web page that compares models side by side (playground.py)

`model` is an adapter's name or the base model's name. Streaming answers are Server-Sent Events
(`data: {chunk}` lines, then `data: [DONE]`). Errors have OpenAI's body, {"error": {"message", "type", "param",
"code"}}: unknown model 404, invalid fields or JSON 400 (naming the field), a prompt longer than the context 400
(saying the limit). A client that goes away (mid-stream or not) has its request dropped from the batch at the
next step, which frees its cache row.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager
from typing import Literal, Optional, Union

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from lora_lab.serve import playground
from lora_lab.serve.server import ModelServer
from lora_lab.utils import LoraLabError


# ---- request bodies (fields and defaults as in OpenAI's API; unknown fields are ignored, as OpenAI does) -------
class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
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


class CompletionBody(_Sampling):
    prompt: Union[str, list[str]]
    max_tokens: Optional[int] = Field(default=16, ge=1)  # OpenAI's default for completions


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[dict]]


class ChatBody(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)


class LoadAdapterBody(BaseModel):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadAdapterBody(BaseModel):
    lora_name: str = Field(min_length=1)
    lora_int_id: Optional[int] = None


class APIError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


def error_response(status: int, message: str, param=None, code=None, kind="invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)


def _text_content(content) -> str:
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if part.get("type") == "text")


def create_app(server: ModelServer, shutdown_engine: bool = True) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app):
        yield
        if shutdown_engine:  # after uvicorn's graceful shutdown: abort what is still running
            await run_in_threadpool(server.engine.shutdown)

    app = FastAPI(title="lora_lab server", lifespan=lifespan)
    app.include_router(playground.router)  # the web page at / (lora_lab/serve/playground.py)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        first = exc.errors()[0]
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        msg = first.get("msg", "invalid request")
        return error_response(400, f"{param}: {msg}" if param else f"invalid request: {msg}", param=param)

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.kind)

    @app.get("/health")
    async def health():
        return {"status": "ok", "running": len(server.engine.rows), "waiting": len(server.engine.waiting),
                "loaded_adapters": list(server.store.loaded)}

    @app.get("/v1/models")
    async def models():
        data = [{"id": server.name, "object": "model", "created": server.created, "owned_by": "lora_lab",
                 "root": str(server.checkpoint_dir), "parent": None}]
        for name in server.store.names():
            data.append({"id": name, "object": "model", "created": server.created, "owned_by": "lora_lab",
                         "root": str(server.store.path_of(name)), "parent": server.name})
        return {"object": "list", "data": data}

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(body: LoadAdapterBody):
        if server.is_base(body.lora_name):
            raise APIError(400, f"{body.lora_name!r} is the base model's name", "lora_name")
        try:
            await run_in_threadpool(server.store.register, body.lora_name, body.lora_path)
        except LoraLabError as e:
            raise APIError(400, str(e), "lora_path") from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(body: UnloadAdapterBody):
        try:
            await run_in_threadpool(server.store.unregister, body.lora_name)
        except LoraLabError as e:
            raise APIError(404, str(e), "lora_name", "model_not_found", "NotFoundError") from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    async def start(body: _Sampling, http: HTTPRequest, prompt=None, messages=None, max_tokens=None):
        """Take the adapter's slot, build the request and submit it; returns (request, event queue)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def on_event(kind, payload):  # called from the engine thread
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (kind, payload))
            except RuntimeError:  # the event loop is closed (shutting down)
                pass

        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        try:
            req = await run_in_threadpool(
                server.request, body.model, on_event, prompt=prompt, messages=messages,
                max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, seed=body.seed, stop=stop)
        except KeyError:
            raise APIError(404, f"The model `{body.model}` does not exist.", "model", "model_not_found",
                           "NotFoundError") from None
        except LoraLabError as e:
            param = "messages" if "messages" in str(e) else ("model" if "adapter" in str(e) else
                                                              ("messages" if messages else "prompt"))
            raise APIError(400, str(e), param) from None
        try:
            server.engine.submit(req)
        except (ValueError, RuntimeError) as e:
            server.store.release(req.adapter) if req.adapter else None
            raise APIError(503, str(e), kind="server_error") from None
        return req, queue

    def usage(req) -> dict:
        p, c = len(req.prompt_ids), len(req.generated)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    async def events(req, queue, http: HTTPRequest):
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

    async def respond(req, queue, http, body, chat: bool):
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        if not body.stream:
            text, reason = [], None
            try:
                async for kind, payload in events(req, queue, http):
                    if kind == "text":
                        text.append(payload)
                    elif kind == "error":
                        raise APIError(500, payload, kind="server_error")
                    else:
                        reason = payload
            finally:
                if reason is None:
                    req.cancelled = True
            choice = ({"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                       "logprobs": None, "finish_reason": reason} if chat else
                      {"index": 0, "text": "".join(text), "logprobs": None, "finish_reason": reason})
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
                        yield "data: " + json.dumps({"error": {"message": payload, "type": "server_error"}}) + "\n\n"
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

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, http: HTTPRequest):
        prompt = body.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise APIError(400, "prompt: give one prompt per request (a string, or a list of one)", "prompt")
            prompt = prompt[0]
        req, queue = await start(body, http, prompt=prompt, max_tokens=body.max_tokens)
        return await respond(req, queue, http, body, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, http: HTTPRequest):
        messages = [{"role": m.role, "content": _text_content(m.content)} for m in body.messages]
        max_tokens = body.max_completion_tokens or body.max_tokens or server.engine.max_seq_length
        req, queue = await start(body, http, messages=messages, max_tokens=max_tokens)
        return await respond(req, queue, http, body, chat=True)

    return app
