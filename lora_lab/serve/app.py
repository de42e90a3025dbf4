"""The HTTP server: one FastAPI app over a ModelServer, its routes in routers, one guard in front of all of them.

    app = create_app(server, ServeOptions(api_keys=("k1",), max_body_bytes=1 << 20, max_tokens_limit=1024))

    lora_lab/serve/openai_api.py   /v1/completions, /v1/chat/completions, /v1/models, adapter (un)loading
    lora_lab/serve/metrics.py      /metrics (Prometheus)
    here                           /health (open: no key, cheap), the guard, the error handlers

What every route shares lives on `app.state`: `server` (the ModelServer), `options` (ServeOptions), `metrics`.
A new router is one more entry in ROUTERS; its routes get the guard with nothing more to do (a route that generates
uses openai_api.submit / events, which raise the API's errors and label the request for /metrics; a page that a
browser opens without a key is listed in `public_paths`). The guard (`Guard`, ASGI middleware, so it sees every path, routers and mounted static files alike):

  1. keys: with `options.api_keys`, every path but `options.public_paths` (/health) needs `Authorization: Bearer
     KEY`; a missing or wrong key gets OpenAI's 401 body. Keys are compared in constant time (hmac.compare_digest
     of SHA-256 digests: the time says nothing about the key, not even its length), and never echoed or logged;
  2. the body: more than `options.max_body_bytes` gets 413 before the route reads it;
  3. /metrics' request counter, by model (what the route put in `request.state.model`) and status.
"""

from __future__ import annotations

import hashlib
import hmac
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Optional

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool

from lora_lab.serve import metrics as metrics_routes, openai_api
from lora_lab.serve.errors import APIError, error_response, unauthorized
from lora_lab.serve.metrics import make_metrics
from lora_lab.serve.server import ModelServer

ROUTERS = [openai_api.router, metrics_routes.router]  # every route of the app but /health

@dataclass
class ServeOptions:
    """What the HTTP layer enforces (the engine's own bounds, --max_queue and --timeout, are on the Engine)."""

    api_keys: tuple[str, ...] = field(default=(), repr=False)  # empty: no key needed
    max_body_bytes: int = 1 << 20  # 1 MiB of JSON is ~250k tokens of prompt: far past any context
    max_tokens_limit: Optional[int] = None  # the largest max_tokens a request may ask for
    public_paths: tuple[str, ...] = ("/health",)  # open without a key; an entry ending in "/" opens all below it

    def __post_init__(self) -> None:
        self.api_keys = tuple(self.api_keys)
        self._digests = [hashlib.sha256(k.encode()).digest() for k in self.api_keys]

    def is_public(self, path: str) -> bool:
        return any(path == p or (p.endswith("/") and path.startswith(p)) for p in self.public_paths)

    def key_ok(self, given: bytes) -> bool:
        """Whether `given` is one of the keys; every key is compared (no early exit), each in constant time."""
        digest = hashlib.sha256(given).digest()
        ok = False
        for d in self._digests:
            ok |= hmac.compare_digest(digest, d)
        return ok


def _bearer(scope) -> Optional[bytes]:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            return token.strip() if scheme.lower() == b"bearer" else b""
    return None


class Guard:
    """ASGI middleware: the key check, the body limit and the request counter, for every route of the app."""

    def __init__(self, app, options: ServeOptions, metrics=None) -> None:
        self.app, self.options, self.metrics = app, options, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] == "websocket" and self.options.api_keys and not self.options.is_public(scope["path"]):
            token = _bearer(scope)
            if not token or not self.options.key_ok(token):
                return await send({"type": "websocket.close", "code": 1008})  # policy violation: no or wrong key
        if scope["type"] != "http":  # lifespan, and websockets with their key
            return await self.app(scope, receive, send)
        status = [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self._guarded(scope, receive, send_status)
        finally:
            if self.metrics is not None:
                self.metrics.count(scope.get("state", {}).get("model", "none"), status[0])

    async def _guarded(self, scope, receive, send):
        options = self.options
        if options.api_keys and not options.is_public(scope["path"]):
            token = _bearer(scope)
            if not token or not options.key_ok(token):
                return await unauthorized(missing=not token).response()(scope, receive, send)
        if scope["method"] in ("POST", "PUT", "PATCH"):
            length = dict(scope.get("headers", ())).get(b"content-length")
            limit = options.max_body_bytes
            if length is not None:
                if not length.isdigit() or int(length) > limit:
                    return await _too_large(limit)(scope, receive, send)
            else:  # chunked: read it here, up to the limit, then hand it on
                messages, size = [], 0
                while True:
                    message = await receive()
                    messages.append(message)
                    size += len(message.get("body", b""))
                    if size > limit:
                        return await _too_large(limit)(scope, receive, send)
                    if message["type"] != "http.request" or not message.get("more_body"):
                        break
                replay = iter(messages)

                async def receive_replayed():
                    return next(replay, None) or await receive()

                return await self.app(scope, receive_replayed, send)
        await self.app(scope, receive, send)


def _too_large(limit: int):
    return error_response(413, f"the request body is larger than this server's limit of {limit} bytes")


async def _invalid(request, exc: RequestValidationError):
    first = exc.errors()[0]
    if first.get("type") == "json_invalid":  # its loc is a character offset, not a field
        where = first.get("loc", ("body", "?"))[-1]
        error = (first.get("ctx") or {}).get("error", "not JSON")
        return error_response(400, f"the request body is not valid JSON ({error} at character {where}): send "
                                   f"a JSON object with Content-Type: application/json")
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid request")
    return error_response(400, f"{param}: {msg}" if param else f"invalid request: {msg}", param=param)


async def _api_error(request, exc: APIError):
    return exc.response()


async def health(http: HTTPRequest):
    """Open and cheap (no key, no lock): for load balancers and orchestrators. With keys, it names no adapters."""
    server = http.app.state.server
    health = {"status": "ok", "running": len(server.engine.rows), "waiting": len(server.engine.waiting)}
    if not http.app.state.options.api_keys:
        health["loaded_adapters"] = list(server.store.loaded)
    return health


def create_app(server: ModelServer, options: Optional[ServeOptions] = None, shutdown_engine: bool = True) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app):
        yield
        if shutdown_engine:  # after uvicorn's graceful shutdown: abort what is still running
            await run_in_threadpool(server.engine.shutdown)

    options = options or ServeOptions()
    app = FastAPI(title="lora_lab server", lifespan=lifespan)
    app.state.server, app.state.options, app.state.metrics = server, options, make_metrics(server)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(APIError, _api_error)
    app.add_middleware(Guard, options=options, metrics=app.state.metrics)
    app.add_api_route("/health", health, methods=["GET"])
    for router in ROUTERS:
        app.include_router(router)
    return app
