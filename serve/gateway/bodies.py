"""Request bodies read with a cap: counted while they stream in and cut at the cap, never read whole first.

Every route that reads a body reads it through here (tests/serve/test_attacks.py sends each one too much), so no
key can make the gateway hold or spool more than its cap.
"""

from __future__ import annotations

from fastapi import Request
from starlette.datastructures import FormData
from starlette.requests import ClientDisconnect

from serve.gateway.protocol import ApiError

CLIENT_CLOSED = 499  # the code nginx uses for "the client closed the connection before the answer ended"
FORM_FIELD_BYTES = 4096  # a multipart text field (`purpose`) is a word: anything longer is not one


def too_large(cap: int) -> ApiError:
    return ApiError(413, f"request body exceeds {cap} bytes", code="request_too_large")


def _check_length(request: Request, cap: int) -> None:
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > cap:
        raise too_large(cap)


async def read_body(request: Request, cap: int) -> bytes:
    """The request body, refusing (413) more than `cap` bytes without reading them all."""
    _check_length(request, cap)
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > cap:
                raise too_large(cap)
            chunks.append(chunk)
    except ClientDisconnect:
        raise ApiError(CLIENT_CLOSED, "the client closed the connection while sending the request") from None
    return b"".join(chunks)


async def read_form(request: Request, cap: int) -> FormData:
    """A multipart form of one file and a few short fields, cut off (413) once more than `cap` bytes came in."""
    _check_length(request, cap)
    size, receive = 0, request.receive

    async def counted() -> dict:
        nonlocal size
        message = await receive()
        size += len(message.get("body", b""))
        if size > cap:
            raise too_large(cap)
        return message

    capped = Request(request.scope, counted)
    try:
        return await capped.form(max_files=1, max_fields=8, max_part_size=FORM_FIELD_BYTES)
    except ApiError:
        raise
    except ClientDisconnect:
        raise ApiError(CLIENT_CLOSED, "the client closed the connection while sending the request") from None
    except Exception as e:  # not multipart, too many parts, a field over FORM_FIELD_BYTES
        raise ApiError(400, f"expected multipart/form-data with `file` and `purpose`: {e}", param="file") from None
