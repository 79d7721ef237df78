"""OpenAI-shaped errors: {"error": {"message", "type", "param", "code"}}, with vLLM's type names.

Bad input is always a 4xx: pydantic's RequestValidationError (wrong types, malformed JSON) is a 400
here, not FastAPI's 422; ValueErrors from SamplingParams and the Processor become 400s in the
serving code. Only a dead engine or a bug is a 500.
"""

from __future__ import annotations

from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tokenmill.engine.core_client import EngineDeadError
from tokenmill.entrypoints.openai.protocol import ErrorInfo, ErrorResponse

_ERROR_TYPES = {
    HTTPStatus.BAD_REQUEST: "BadRequestError",
    HTTPStatus.UNAUTHORIZED: "AuthenticationError",
    HTTPStatus.NOT_FOUND: "NotFoundError",
    HTTPStatus.METHOD_NOT_ALLOWED: "MethodNotAllowedError",
    HTTPStatus.INTERNAL_SERVER_ERROR: "InternalServerError",
    HTTPStatus.SERVICE_UNAVAILABLE: "ServiceUnavailableError",
}


class OpenAIError(Exception):
    """Raised by serving code to answer with an error body."""

    def __init__(self, message: str, status: int = HTTPStatus.BAD_REQUEST, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = int(status)
        self.param = param


def error_type(status: int) -> str:
    """vLLM's names ("BadRequestError"), else the status phrase in the same style."""
    try:
        status = HTTPStatus(status)
    except ValueError:
        return "Error"
    return _ERROR_TYPES.get(status) or status.phrase.title().replace(" ", "").replace("-", "") + "Error"


def error_body(message: str, status: int = HTTPStatus.BAD_REQUEST, param: str | None = None) -> ErrorResponse:
    return ErrorResponse(error=ErrorInfo(message=message, type=error_type(status), param=param, code=int(status)))


def error_response(message: str, status: int = HTTPStatus.BAD_REQUEST, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, status, param).model_dump(), status_code=int(status))


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    parts, param = [], None
    for error in exc.errors():
        # "body" and union members' tags (class names, as in /tokenize's body) are not fields
        loc = [str(x) for x in error.get("loc", ()) if x != "body" and not str(x)[:1].isupper()]
        if error.get("type") == "json_invalid":
            return f"malformed JSON body: {error.get('ctx', {}).get('error', error.get('msg'))}", None
        message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
        if loc:
            param = param or loc[0]
            parts.append(f"{'.'.join(loc)}: {message}")
        else:
            parts.append(message)
    return "; ".join(dict.fromkeys(parts)) or "invalid request", param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def _openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
        return error_response(exc.message, exc.status, exc.param)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        content_type = request.headers.get("content-type", "")
        media_type = content_type.split(";")[0].strip().lower()
        if content_type and media_type != "application/json" and not media_type.endswith("+json"):
            # FastAPI reads no JSON from a body of another type (curl -d without -H sends a form)
            return error_response(f"the request body must be JSON, sent with the header Content-Type: "
                                  f"application/json (it came as {content_type!r})", HTTPStatus.BAD_REQUEST)
        message, param = _validation_message(exc)
        return error_response(message, HTTPStatus.BAD_REQUEST, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc.__cause__, RecursionError):  # FastAPI's body parsing hit Python's recursion limit
            return error_response("malformed JSON body: lists or objects are nested too deeply", exc.status_code)
        return error_response(str(exc.detail), exc.status_code)

    @app.exception_handler(EngineDeadError)
    async def _engine_dead(_: Request, exc: EngineDeadError) -> JSONResponse:
        return error_response(f"the engine is dead: {exc}", HTTPStatus.INTERNAL_SERVER_ERROR)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        # Starlette logs the traceback after this handler answers.
        return error_response(f"internal error: {type(exc).__name__}: {exc}", HTTPStatus.INTERNAL_SERVER_ERROR)
