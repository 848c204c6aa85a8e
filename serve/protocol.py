"""OpenAI wire types the gateway reads and writes: error bodies, the request fields it needs, model cards.

The gateway reads only the fields it acts on (model, stream, stream_options, max_tokens, and that messages or
prompt is there); the engine validates the rest and its 4xx answers pass through unchanged. This keeps the
per-request CPU small and the gateway compatible with fields it does not know.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from serve.config import Name

Kind = Literal["chat", "completion"]


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def unauthorized(message: str = "invalid or missing API key: send `Authorization: Bearer KEY`") -> ApiError:
    return ApiError(401, message, type="authentication_error", code="invalid_api_key")


def model_not_found(model: str) -> ApiError:
    # The same answer for a model that does not exist and for another tenant's adapter: no tenant can learn
    # which adapters others have.
    return ApiError(
        404, f"The model {model!r} does not exist or you do not have access to it.", code="model_not_found"
    )


def rate_limited(limit: str, retry_after: str) -> ApiError:
    message = f"rate limit exceeded ({limit}); retry after {retry_after} s"
    return ApiError(
        429, message, type="rate_limit_error", code="rate_limit_exceeded", headers={"Retry-After": retry_after}
    )


def unavailable(message: str, retry_after: int) -> ApiError:
    return ApiError(
        503, message, type="server_error", code="engine_unavailable", headers={"Retry-After": str(retry_after)}
    )


@dataclass
class ProxyRequest:
    """What the gateway needs to know about one completion request, and the body to send upstream."""

    kind: Kind
    model: str
    stream: bool
    client_wants_usage: bool  # stream_options.include_usage was asked for by the client
    max_tokens: int | None
    body: bytes  # what goes to the engine


def _int_field(data: dict, name: str, cap: int) -> int | None:
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise bad_request(f"{name} must be an integer >= 1, got {json.dumps(value)}", param=name)
    if value > cap:
        raise bad_request(f"{name} must be <= {cap} on this gateway, got {value}", param=name)
    return value


def parse_request(raw: bytes, kind: Kind, max_tokens_cap: int) -> ProxyRequest:
    """Check a /v1/chat/completions or /v1/completions body; raise ApiError(400) naming the bad field."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad_request(f"request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request(f"request body must be a JSON object, got {type(data).__name__}", code="invalid_json")
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("model is required and must be a non-empty string", param="model")
    if kind == "chat":
        messages = data.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise bad_request("messages is required: a non-empty list of {role, content} objects", param="messages")
    elif not isinstance(data.get("prompt"), str | list):
        raise bad_request("prompt is required: a string or a list", param="prompt")
    stream = data.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad_request(f"stream must be true or false, got {json.dumps(stream)}", param="stream")
    max_tokens = _int_field(data, "max_tokens", max_tokens_cap)
    max_tokens = _int_field(data, "max_completion_tokens", max_tokens_cap) or max_tokens
    options = data.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad_request("stream_options must be an object", param="stream_options")
    wants_usage = bool(options and options.get("include_usage"))
    body = raw
    if stream and not wants_usage:
        # Metering needs the engine's usage chunk; it is stripped again before the client sees it.
        data["stream_options"] = {**(options or {}), "include_usage": True}
        body = json.dumps(data, separators=(",", ":")).encode()
    return ProxyRequest(kind, model, stream, wants_usage, max_tokens, body)


def model_card(name: str, parent: str | None, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "lorafleet", "parent": parent}


class RegisterAdapter(BaseModel):
    """Body of POST /admin/adapters."""

    model_config = ConfigDict(extra="forbid")
    name: Name = Field(description="the model name clients will send")
    path: str = Field(description="adapter folder, relative to the adapters root (or absolute inside it)")
    base: str = Field(description="served name of the base model")
    tenants: list[str] = Field([], description="tenants that may use it (besides those allowed '*')")
