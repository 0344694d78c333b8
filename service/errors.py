"""The service's error hierarchy and the handlers that turn every error into `{"error": "..."}`.

    ServiceError (500 unless a subclass says otherwise; `.status_code`, `.message`, `.headers`)
    ├── BadRequest (400)            client sent something we cannot use; the message names it
    ├── Unauthorized (401)          missing or wrong API key
    ├── Forbidden (403)             the operation is disabled by configuration
    ├── ModelNotFound (404)         unknown model or version
    ├── RequestTimeout (408)        the client took longer than request_read_timeout_s to send its body
    ├── PayloadTooLarge (413)       body over the byte limit (checked before parsing)
    ├── ModelLoadError (400)        a model package failed to load (corrupt ONNX, invalid manifest)
    │   └── ProviderUnavailable     execution_providers=cuda, and the session came up on CPU
    ├── ModelUnavailable (503)      model exists but is not serving (unloading, not yet warm)
    ├── QueueFull (503)             batch queue full; carries `Retry-After`
    ├── DeadlineExceeded (504)      the request waited past its deadline and was never run
    ├── ClientDisconnected (499)    the client went away before its answer was ready
    └── ModelRunError (500)         ONNX Runtime failed on a batch (the server stays up)

FastAPI's own errors (validation, malformed JSON, unknown routes, wrong methods) go through the
same JSON shape, so a client sees one error format everywhere.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response

from service.responses import OrjsonResponse

if TYPE_CHECKING:
    from fastapi import FastAPI

logger = logging.getLogger(__name__)


class ServiceError(Exception):
    """Base class: an error with an HTTP status and a message safe to show to the client."""

    status_code: int = 500

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers: dict[str, str] = dict(headers or {})


class BadRequest(ServiceError):
    status_code = 400


class Unauthorized(ServiceError):
    status_code = 401

    def __init__(self, message: str = "missing or invalid API key") -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class Forbidden(ServiceError):
    status_code = 403


class ModelNotFound(ServiceError):
    status_code = 404


class RequestTimeout(ServiceError):
    status_code = 408


class PayloadTooLarge(ServiceError):
    status_code = 413


class ModelLoadError(ServiceError):
    """`reason`: the label of `hydra_model_load_failures_total` — manifest, missing_file, onnx,
    provider or warmup (the default: the graph loaded but failed its contract or warm-up run)."""

    # Triton answers a failed repository load with 400; we follow it.
    status_code = 400

    def __init__(self, message: str, *, reason: str = "warmup") -> None:
        super().__init__(message)
        self.reason = reason


class ProviderUnavailable(ModelLoadError):
    """The required execution provider did not come up (counted as load failure reason `provider`)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, reason="provider")


class ModelUnavailable(ServiceError):
    status_code = 503


class QueueFull(ServiceError):
    status_code = 503

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        self.retry_after_s = max(1, retry_after_s)
        super().__init__(message, headers={"Retry-After": str(self.retry_after_s)})


class DeadlineExceeded(ServiceError):
    status_code = 504


class ClientDisconnected(ServiceError):
    # nginx's "client closed request"; nobody reads it, but logs and metrics do.
    status_code = 499


class ModelRunError(ServiceError):
    status_code = 500


def error_response(status_code: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return OrjsonResponse({"error": message}, status_code=status_code, headers=headers)


def describe_validation_errors(errors: Sequence[Mapping[str, Any]], *, subject: str = "") -> str:
    """pydantic's errors as one message, `where: what` for the first five joined by "; " — the one
    formatter of request bodies (V1's, FastAPI's), manifests and settings. `where`: the field's
    dotted path (FastAPI's leading "body" left out), else `subject` (e.g. "manifest")."""
    parts = []
    for err in errors[:5]:
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or subject
        what = _what_is_wrong(err, where)
        parts.append(f"{where}: {what}" if where else what)
    return "; ".join(parts) or "invalid request"


def _what_is_wrong(err: Mapping[str, Any], where: str) -> str:
    kind, context = err.get("type", ""), err.get("ctx") or {}
    if kind == "json_invalid":
        return f"malformed JSON body ({context.get('error', 'not JSON')})"
    if kind in ("model_type", "model_attributes_type", "dict_type") and not where:
        return "expected a JSON object"
    if kind == "too_short" and context.get("actual_length") == 0:
        return f"must not be empty (empty {where or 'input'})"
    return str(err.get("msg", "invalid value"))


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers that make every error a JSON `{"error": ...}` with the right status."""
    # imported here: `python -m service` formats its settings errors with this module, and a
    # supervisor of workers never imports FastAPI
    from fastapi.exceptions import RequestValidationError

    async def on_service_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, ServiceError)
        if exc.status_code >= 500:
            logger.warning("%s: %s", type(exc).__name__, exc.message)
        return error_response(exc.status_code, exc.message, exc.headers)

    async def on_validation_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return error_response(400, describe_validation_errors(exc.errors()))

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        message = str(exc.detail)
        if exc.status_code in (404, 405):  # Starlette's bare "Not Found" does not say what was not found
            message = f"{message}: {request.method} {request.url.path}"
        return error_response(exc.status_code, message, dict(exc.headers or {}))

    async def on_unexpected(_: Request, exc: Exception) -> Response:
        logger.exception("unhandled error", exc_info=exc)
        return error_response(500, f"internal server error ({type(exc).__name__})")

    app.add_exception_handler(ServiceError, on_service_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)
