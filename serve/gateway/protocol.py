"""OpenAI wire types the gateway reads and writes: error bodies, the request fields it needs, model cards.

The gateway reads only the fields it acts on (model, stream, stream_options, max_tokens, and that messages or
prompt is there); the engine validates the rest and its 4xx answers pass through unchanged. This keeps the
per-request CPU small and the gateway compatible with fields it does not know.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError
from pydantic.json_schema import models_json_schema

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


def invalid_body(e: ValidationError, prefix: str = "") -> ApiError:
    """A body that failed its model's validation: 400 naming the first bad field (under `prefix`, if nested)."""
    err = e.errors()[0]
    field = ".".join([*(prefix.split(".") if prefix else []), *(str(p) for p in err["loc"])]) or None
    return bad_request(f"{field or 'body'}: {err['msg']}", param=field)


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


def over_budget(message: str, retry_after: str) -> ApiError:
    """A tenant's $ budget is spent: 429 with the type and code OpenAI uses for an exhausted quota."""
    return ApiError(
        429, message, type="insufficient_quota", code="insufficient_quota", headers={"Retry-After": retry_after}
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
    n: int = 1  # choices per prompt
    client_wants_running_usage: bool = False  # ... and stream_options.continuous_usage_stats
    user: str | None = None  # OpenAI's end-user id: keeps a user on one side of a canary split

    def for_engine(self, name: str) -> bytes:
        """The body with `model` replaced by what the engine knows it as (an alias's version)."""
        data = json.loads(self.body)
        data["model"] = name
        return json.dumps(data, separators=(",", ":")).encode()


def _int_field(data: dict, name: str, cap: int) -> int | None:
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise bad_request(f"{name} must be an integer >= 1, got {json.dumps(value)}", param=name)
    if value > cap:
        raise bad_request(f"{name} must be <= {cap} on this gateway, got {value}", param=name)
    return value


def _bool_field(data: dict, name: str, param: str) -> bool | None:
    """A boolean the gateway acts on: JSON true/false (or null/absent), never a string that merely looks like one.
    `"false"` would be truthy here and false to the engine's pydantic model: the two must never disagree."""
    value = data.get(name)
    if value is not None and not isinstance(value, bool):
        raise bad_request(f"{param} must be true or false, got {json.dumps(value)[:50]}", param=param)
    return value


def _prompts(prompt: Any) -> int:
    """How many prompts a /v1/completions `prompt` holds: a string or a list of token ids is one; a list of
    strings or of token-id lists is one each."""
    if isinstance(prompt, list) and prompt and not all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
        return len(prompt)
    return 1


def parse_request(raw: bytes, kind: Kind, max_tokens_cap: int, max_n: int | None = None) -> ProxyRequest:
    """Check a /v1/chat/completions or /v1/completions body; raise ApiError(400) naming the bad field.

    A chat request always gets a `max_tokens` (the cap when the client sent none; completions default to 16, as on
    OpenAI) and, when streaming, the usage options metering needs (tests/serve/test_attacks.py: no request is
    generated unbounded or unbilled)."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as e:  # ValueError: bad JSON or UTF-8, or an int of > 4300 digits
        raise bad_request(f"request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request(f"request body must be a JSON object, got {type(data).__name__}", code="invalid_json")
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("model is required and must be a non-empty string", param="model")
    prompts = 1
    if kind == "chat":
        messages = data.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise bad_request("messages is required: a non-empty list of {role, content} objects", param="messages")
    elif not isinstance(data.get("prompt"), str | list):
        raise bad_request("prompt is required: a string or a list", param="prompt")
    else:
        prompts = _prompts(data["prompt"])
    stream = bool(_bool_field(data, "stream", "stream"))
    max_tokens = _int_field(data, "max_tokens", max_tokens_cap)
    max_tokens = _int_field(data, "max_completion_tokens", max_tokens_cap) or max_tokens
    # n choices of each prompt cost n x prompts times the engine: unbounded, one request could starve every tenant
    cap_n = max_n if max_n is not None else 1 << 31
    n = _int_field(data, "n", cap_n) or 1
    if n * prompts > cap_n:
        raise bad_request(f"prompt: {prompts} prompts x n={n} is {n * prompts} generations; at most {cap_n} a request "
                          "on this gateway", param="prompt")  # fmt: skip
    options = data.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad_request("stream_options must be an object", param="stream_options")
    options = options or {}
    wants_usage = bool(_bool_field(options, "include_usage", "stream_options.include_usage"))
    running = _bool_field(options, "continuous_usage_stats", "stream_options.continuous_usage_stats")
    wants_running = wants_usage and bool(running)
    user = data.get("user")
    if user is not None and not isinstance(user, str):
        raise bad_request(f"user must be a string, got {json.dumps(user)[:50]}", param="user")
    changed = False
    if max_tokens is None and kind == "chat":  # else vLLM's chat default: the whole context, past every cap
        data["max_tokens"], max_tokens, changed = max_tokens_cap, max_tokens_cap, True  # vLLM clamps to the context
    if stream and not wants_running:
        # Metering needs the engine's usage on every chunk (an aborted stream is charged what it got) and its final
        # usage chunk, whatever the client asked: both are stripped again unless the client asked for them.
        data["stream_options"] = {**options, "include_usage": True, "continuous_usage_stats": True}
        changed = True
    body = json.dumps(data, separators=(",", ":")).encode() if changed else raw
    return ProxyRequest(kind, model, stream, wants_usage, max_tokens, body, n, wants_running, user)


def model_card(name: str, parent: str | None, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "lorafleet", "parent": parent}


class CreateVersion(BaseModel):
    """Body of POST /admin/versions."""

    model_config = ConfigDict(extra="forbid")
    adapter: Name = Field(description="the adapter this is a version of")
    path: str = Field(description="adapter folder, relative to the adapters root (or absolute inside it)")
    base: str = Field(description="served name of the base model")
    owner: str | None = Field(None, description="the tenant it belongs to; none: any tenant's alias may use it")


class Target(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: str
    weight: float = Field(1.0, gt=0, le=1)


class PointAlias(BaseModel):
    """Body of PUT /admin/aliases/{name}."""

    model_config = ConfigDict(extra="forbid")
    targets: list[Target] = Field(min_length=1, description="one version, or a weighted split summing to 1")
    tenants: list[str] = Field(
        [],
        description="the tenants that may send this alias as `model` (the whole list); empty: every tenant allowed '*'",
    )


class RegisterAdapter(BaseModel):
    """Body of POST /admin/adapters."""

    model_config = ConfigDict(extra="forbid")
    name: Name = Field(description="the model name clients will send")
    path: str = Field(description="adapter folder, relative to the adapters root (or absolute inside it)")
    base: str = Field(description="served name of the base model")
    tenants: list[str] = Field([], description="tenants that may use it; empty: every tenant allowed '*'")


class SetReplicas(BaseModel):
    """Body of PUT /admin/engines/{name}/replicas."""

    model_config = ConfigDict(extra="forbid")
    urls: list[Annotated[str, StringConstraints(pattern=r"^https?://[^/\s]+$")]] = Field(
        min_length=1, max_length=64, description="engine roots like http://10.0.0.7:8000 (no path)"
    )


# -- request bodies as the OpenAPI schema documents them (GET /openapi.json)
#
# parse_request above checks only what the gateway acts on and the engine validates the rest, so these models
# are documentation: they give clients (and schemathesis) the shape of a request, and are not run per request.


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = Field(None, description="text, or a list of content parts")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = Field(False, description="end the stream with a usage chunk (choices == [])")
    continuous_usage_stats: bool = Field(False, description="with include_usage: running usage on every chunk")


class _Generation(BaseModel):
    # Other sampling fields are the engine's to check: vLLM's own 4xx passes through unchanged.
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1, description="a base model, an adapter or a merged adapter the key may use")
    max_tokens: int | None = Field(None, ge=1, description="at most gateway.max_tokens_cap (else 400)")
    n: int | None = Field(None, ge=1, description="choices to generate; at most gateway.max_n (else 400)")
    stream: bool | None = Field(False, description="answer with server-sent events")
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None


class ChatCompletionRequest(_Generation):
    """Body of POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="same as max_tokens; wins if both are set")


class CompletionRequest(_Generation):
    """Body of POST /v1/completions."""

    prompt: str | list[str] | list[int] | list[list[int]] = Field(description="text, texts or token ids")


REQUEST_BODIES: dict[str, type[BaseModel]] = {}  # every body a route documents, filled as the routes are defined


def openapi_body(model: type[BaseModel], media: str = "application/json") -> dict:
    """`openapi_extra` of a route whose body the gateway reads itself (FastAPI cannot see it): the same pydantic
    model that validates the body documents it, so schemathesis fuzzes every route (tests/serve/test_hostile.py)."""
    REQUEST_BODIES[model.__name__] = model
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {media: {"schema": ref}}}}


class FileUpload(BaseModel):
    """Body of POST /v1/files (multipart/form-data)."""

    file: bytes = Field(description="JSONL: one chat or prompt/completion example per line")
    purpose: Literal["fine-tune"]


def openapi_components() -> dict:
    """The schemas `openapi_body` refers to, for the OpenAPI document's components."""
    models = [(m, "validation") for m in REQUEST_BODIES.values()]
    _, schema = models_json_schema(models, ref_template="#/components/schemas/{model}")
    return schema["$defs"]
