"""OpenAI's error shape for every failure: ``{"error": {"message", "type", "param", "code"}}``.

A client's mistake is a 4xx in this shape, never FastAPI's own validation body and never a 500:

    400  invalid values or combinations (SamplingParams.validate, context_length_exceeded, bad JSON)
    401  missing or wrong API key                      404  unknown model or route
    413  body over the size limit                      422  body of the wrong shape (wrong types, missing fields)
    429  the waiting queue is full                     503  shutting down (draining)

`install_error_handlers` routes FastAPI's and Starlette's exceptions, `APIError`, and the
user errors of `chatforge.errors` into that shape.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from chatforge.errors import ChatforgeError, RequestError

log = logging.getLogger("chatforge.serve")

INVALID = "invalid_request_error"
_TYPE_BY_STATUS = {401: INVALID, 429: "rate_limit_error", 500: "server_error", 503: "server_error"}
_MAP_FIELDS = {"logit_bias"}  # their keys are data, not field names
_UNION_LABELS = {"str", "int", "float", "bool", "list", "dict", "none", "tagged-union"}


class APIError(Exception):
    """An HTTP error in OpenAI's shape; raised anywhere in a route."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _TYPE_BY_STATUS.get(status, INVALID)
        self.headers = headers

    def payload(self) -> dict[str, Any]:
        return error_payload(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.payload(), status_code=self.status, headers=self.headers)


def error_payload(message: str, type: str = INVALID, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(status: int, message: str, **kwargs: Any) -> JSONResponse:
    return APIError(status, message, **kwargs).response()


def from_user_error(e: ChatforgeError, param: str | None = None) -> APIError:
    """A RequestError (its own param and code) or another user error (DataError …) as a 400."""
    if isinstance(e, RequestError):
        return APIError(400, str(e), param=e.param or param, code=e.code)
    return APIError(400, str(e), param=param)


def server_error(message: str = "the server failed while generating; the request can be retried") -> APIError:
    return APIError(500, message)


_UNION_FORMS = {"prompt": "a string, a list of strings, a list of token ids or a list of token-id lists",
                "stop": "a string or a list of at most 4 strings",
                "content": "a string or a list of text parts ({'type': 'text', 'text': ...})",
                "input": "a string or a list of strings",
                "key": "a string or a positive integer"}


def _in_union(loc: tuple | list) -> bool:
    return any(isinstance(p, str) and (p in _UNION_LABELS or "[" in p or "-" in p) for p in loc[1:])


def param_of(loc: tuple | list) -> str | None:
    """A pydantic error location as OpenAI's `param`: ('body', 'messages', 1, 'content') -> 'messages[1].content'.

    Union members (pydantic's 'str', 'list[int]' …) end the path: the union is the parameter.
    """
    parts = list(loc[1:] if loc and loc[0] == "body" else loc)
    out = ""
    for p in parts:
        if isinstance(p, int):
            if not out:
                break
            out += f"[{p}]"
        elif isinstance(p, str):
            if p in _UNION_LABELS or "[" in p or "-" in p or out in _MAP_FIELDS:
                break
            out += f".{p}" if out else p
    return out or None


def validation_error(exc: RequestValidationError) -> APIError:
    errors = list(exc.errors())
    if not errors:
        return APIError(422, "the request body is not valid")
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "invalid JSON")
        position = first["loc"][1] if len(first.get("loc", ())) > 1 else "?"
        return APIError(400, f"could not parse the JSON body of the request ({detail} at position {position})",
                        code="invalid_json")
    param = param_of(first.get("loc", ()))
    kind = first.get("type", "")
    if kind == "missing" and param is None:
        return APIError(422, "the request needs a JSON object body", code="missing_body")
    if kind == "missing":
        return APIError(422, f"missing required parameter '{param}'", param=param, code="missing_required_parameter")
    if kind in ("model_attributes_type", "model_type", "dict_type") and param is None:
        return APIError(422, "the request body must be a JSON object", code="invalid_type")
    got = type(first.get("input")).__name__ if "input" in first else None
    got = {"NoneType": "null", "dict": "object", "list": "array", "str": "string", "int": "integer",
           "float": "number", "bool": "boolean"}.get(got, got)
    where = f"'{param}'" if param else "the request body"
    form = _UNION_FORMS.get((param or "").rpartition(".")[2])
    if form and _in_union(first.get("loc", ())):
        return APIError(422, f"invalid value for {where}: expected {form}", param=param, code="invalid_type")
    message = f"invalid value for {where}: {first.get('msg', 'invalid')}" + (f" (got {got})" if got else "")
    return APIError(422, message, param=param, code="invalid_type" if kind.endswith("_type") else "invalid_value")


def install_error_handlers(app: FastAPI) -> None:
    async def on_api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response()

    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404 and exc.detail not in (None, "Not Found"):  # a route's own "no such thing"
            return error_response(404, str(exc.detail), code="not_found")
        if exc.status_code == 404:
            return error_response(404, f"unknown URL: {request.method} {request.url.path}", code="unknown_url")
        if exc.status_code == 405:
            return error_response(405, f"method {request.method} is not allowed on {request.url.path}",
                                  code="method_not_allowed")
        return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    async def on_user_error(request: Request, exc: ChatforgeError) -> JSONResponse:
        return from_user_error(exc).response()

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return server_error("internal server error").response()

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(ChatforgeError, on_user_error)
    app.add_exception_handler(Exception, on_unexpected)
