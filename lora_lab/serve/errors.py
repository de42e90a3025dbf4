"""Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}, with the status OpenAI uses.

Every route raises APIError (or lets FastAPI's validation error through, turned into a 400 naming the field); the
`openai` client turns each status into its exception (401 AuthenticationError, 404 NotFoundError, 429
RateLimitError, ...). Shared by every router of the server (lora_lab/serve/app.py).
"""

from __future__ import annotations

from typing import Optional

from fastapi.responses import JSONResponse


class APIError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 kind: str = "invalid_request_error", headers: Optional[dict] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.param, self.code, self.kind, self.headers)


def error_response(status: int, message: str, param=None, code=None, kind="invalid_request_error",
                   headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status,
                        headers=headers)


def not_found(model: str, names=()) -> APIError:
    """OpenAI's 404 for an unknown model, naming the models that exist (the base's name and the adapters')."""
    have = f"; this server has: {', '.join(names)}" if names else ""
    return APIError(404, f"The model `{model}` does not exist{have}", "model", "model_not_found", "NotFoundError")


def rate_limited(message: str, retry_after: int = 1) -> APIError:
    """429 with Retry-After, OpenAI's rate-limit body: the client waits and retries (the openai client does)."""
    return APIError(429, message, None, "rate_limit_exceeded", "requests", {"Retry-After": str(retry_after)})


def unauthorized(missing: bool) -> APIError:
    """401, as OpenAI words it. The key given is never echoed (nor logged)."""
    message = ("You didn't provide an API key. Provide it in an Authorization header using Bearer auth "
               "(Authorization: Bearer YOUR_KEY)." if missing else "Incorrect API key provided.")
    return APIError(401, message, None, None if missing else "invalid_api_key", "invalid_request_error",
                    {"WWW-Authenticate": "Bearer"})
