"""The one place domain errors become HTTP responses ``{"code", "message"}``."""

from __future__ import annotations

import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from remotecli.errors import RemotecliError
from remotecli.logging import get_logger

log = get_logger("api")

_HTTP_CODES = {
    400: "bad_request",
    401: "authentication_required",
    403: "permission_denied",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    415: "unsupported_media_type",
    429: "limit_exceeded",
}


def _describe_validation(exc: RequestValidationError) -> tuple[str, str]:
    errors = exc.errors()
    for error in errors:
        if error.get("type") == "json_invalid":
            return "malformed_json", "The request body is not valid JSON."
        if (tuple(error.get("loc", ())) == ("body", "vm_type") and error.get("type") == "literal_error"
                and error.get("input") not in ("cli", "browser")):
            return "unknown_vm_type", "Unknown VM type; use 'cli' or 'browser'."
    parts = []
    for error in errors[:5]:
        location = ".".join(str(item) for item in error.get("loc", ()) if item != "body")
        parts.append(f"{location or 'body'}: {error.get('msg', 'invalid')}")
    return "invalid_input", "The request is not valid: " + "; ".join(parts)


def _allowed_methods(app: FastAPI, path: str) -> set[str]:
    """Every method the API documents for ``path`` (from the OpenAPI paths, which span all routers)."""
    paths = app.openapi().get("paths", {})
    if path in paths:  # a literal path wins over templates (/vms/ensure is not /vms/{vm_id})
        return {method.upper() for method in paths[path]}
    methods: set[str] = set()
    for template, operations in paths.items():
        pattern = "^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template)) + "$"
        if re.match(pattern, path):
            methods |= {method.upper() for method in operations}
    return methods


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RemotecliError)
    async def _domain(request: Request, exc: RemotecliError) -> JSONResponse:
        level = log.error if exc.http_status >= 500 else log.info
        level("%s %s -> %s %s%s", request.method, request.url.path, exc.http_status, exc.code,
              f" ({exc.log_detail})" if exc.log_detail else "")
        headers = {"Retry-After": str(exc.retry_after_s)} if exc.retry_after_s is not None else None
        return JSONResponse(exc.to_dict(), status_code=exc.http_status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        code, message = _describe_validation(exc)
        return JSONResponse({"code": code, "message": message}, status_code=400 if code == "malformed_json" else 422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        message = exc.detail if isinstance(exc.detail, str) else code
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 404 and message == "Not Found":
            message = "There is nothing at this address."
        if exc.status_code == 405:
            # Starlette's Allow names only the first route matching the path; list every method.
            allowed = _allowed_methods(app, request.url.path)
            if allowed:
                headers["Allow"] = ", ".join(sorted(allowed))
                message = f"Use one of: {headers['Allow']}."
        return JSONResponse({"code": code, "message": message}, status_code=exc.status_code,
                            headers=headers or None)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(
            {"code": "internal_error",
             "message": "Something went wrong inside remotecli; the operator can see details in the log."},
            status_code=500,
        )
