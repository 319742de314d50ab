"""The HTTP face of `tk serve` (FastAPI): routes, the upload limit, the API key, the page.

Routes (JSON unless said):

- ``GET /health``: ``{"status": "ok"}`` (no API key needed: for load balancers);
- ``GET /v1/model``: name, classes, task, preprocessing, runtime, tk version, batching;
- ``GET /v1/stats``: request / image / batch counters (:class:`toolkit.serve.batcher.Stats`);
- ``POST /v1/predict?topk=K``: images as ``multipart/form-data`` files (any field name, up
  to :data:`MAX_FILES`) or one raw image body (``image/*`` or ``application/octet-stream``,
  ``?name=`` for its path); answers the rows of ``tk infer --format json`` (a JSON array,
  ``path`` = the uploaded file name): 200 when at least one image was predicted, else 422
  with ``{"error": <the row's error>, "rows": [...]}``;
- ``GET /``: an HTML form (no JavaScript); ``POST /`` answers the same page with the top-k.

Every refusal is JSON ``{"error": "one line"}``: 400 (bad query, no image, too many
parts, malformed multipart), 401 (API key), 413 (body over the limit: refused from
``Content-Length`` before reading, and counted while streaming for chunked bodies), 415
(content type), 422 (no image could be decoded: the message of the `tk infer` row), 500 (a
model failure; the service goes on). (Beyond uvicorn's connection limit uvicorn itself
answers a plain-text 503.) A request never names a server-side file: only uploaded bytes
are read.
"""

# no ``from __future__ import annotations``: FastAPI reads the route functions' annotations
# (``Request``), which are imported inside :func:`create_app`
import hmac
import html
import json
from collections.abc import Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from toolkit.serve.batcher import Batcher

MAX_FILES = 64
"""Most files (and, separately, other form fields) one multipart request may hold."""

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


@dataclass
class AppConfig:
    name: str
    classes: list[str]
    meta: dict[str, Any]
    runtime: str
    preprocessing: dict[str, Any]
    max_upload_bytes: int
    max_batch: int
    max_wait_ms: float
    api_key: str | None = None
    on_ready: Callable[[], None] | None = None


async def _send_json(send: Send, status: int, body: dict[str, Any],
                     headers: list[tuple[bytes, bytes]] | None = None) -> None:
    data = json.dumps(body, separators=(",", ":")).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(data)).encode()),
                            (b"connection", b"close"), *(headers or [])]})
    await send({"type": "http.response.body", "body": data})


class _TooLarge(Exception):
    pass


DRAIN_BYTES = 32 * 2**20
"""Most bytes of an unread request body dropped before an answer (see :class:`Linger`)."""


class Linger:
    """Before answering a request whose body the application did not read to the end (a
    refusal: 413, 401, 415, a malformed multipart...), read and drop the rest of the body,
    up to :data:`DRAIN_BYTES` (never kept): the client, still sending, then reads the
    answer instead of a connection reset. A longer body is cut off; a client that sent
    ``Expect: 100-continue`` never sent its body, so nothing is read."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        finished = any(k == b"expect" for k, _ in scope.get("headers", ()))

        async def tracked() -> Message:
            nonlocal finished
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                finished = True
            return message

        async def lingering(message: Message) -> None:
            nonlocal finished
            if message["type"] == "http.response.start" and not finished:
                finished = True
                dropped = 0
                while dropped < DRAIN_BYTES:
                    rest = await receive()
                    if rest["type"] != "http.request":
                        break
                    dropped += len(rest.get("body", b""))
                    if not rest.get("more_body", False):
                        break
            await send(message)

        await self.app(scope, tracked, lingering)


class BodyLimit:
    """413 for a request body over ``limit`` bytes: from ``Content-Length`` before reading
    anything, else counted chunk by chunk as the application reads it (chunked uploads).
    Nothing beyond the limit is kept."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app = app
        self.limit = int(limit)

    def _error(self) -> dict[str, str]:
        mb = self.limit / 2**20
        return {"error": f"request body too large: over the limit of {mb:g} MB "
                         "(--max-upload-mb)"}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for key, value in scope.get("headers", ()):
            if key == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await _send_json(send, 400, {"error": "malformed Content-Length"})
                    return
                if declared > self.limit:
                    await _send_json(send, 413, self._error())
                    return
        seen = 0
        started = False

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge
            return message

        async def tracked(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except _TooLarge:
            if not started:
                await _send_json(send, 413, self._error())


class ApiKey:
    """401 unless ``Authorization: Bearer <key>`` (compared in constant time); ``/health``
    is open."""

    def __init__(self, app: ASGIApp, key: str):
        self.app = app
        self.expected = f"Bearer {key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") == "/health":
            await self.app(scope, receive, send)
            return
        given = b""
        for key, value in scope.get("headers", ()):
            if key == b"authorization":
                given = value
        if not hmac.compare_digest(given, self.expected):
            await _send_json(send, 401, {"error": "missing or wrong API key: send "
                                                  "'Authorization: Bearer <key>'"},
                             [(b"www-authenticate", b"Bearer")])
            return
        await self.app(scope, receive, send)


# -- the application ------------------------------------------------------------------------

class RequestError(Exception):
    def __init__(self, status: int, message: str):
        self.status = status
        self.message = " ".join(message.split())
        super().__init__(self.message)


def _topk(raw: str | None, n_classes: int) -> int:
    if raw is None or raw == "":
        return 1
    try:
        k = int(raw)
    except ValueError:
        raise RequestError(400, f"topk must be a whole number of 1 or more, got {raw!r}"
                           ) from None
    if k < 1:
        raise RequestError(400, f"topk must be 1 or more, got {k}")
    return min(k, n_classes)


UNSUPPORTED = ("send the images as multipart/form-data files, or one raw image body "
               "(Content-Type image/* or application/octet-stream)")


async def read_images(request: Any) -> list[tuple[str, bytes]]:
    """``(name, bytes)`` of the images of a request (multipart files or a raw body)."""
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException

    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        try:
            form = await request.form(max_files=MAX_FILES, max_fields=MAX_FILES)
        except HTTPException as exc:  # starlette's multipart limits and parse errors
            detail = str(exc.detail)
            if "Too many files" in detail:
                detail = f"too many files in one request (the limit is {MAX_FILES})"
            elif "Too many fields" in detail:
                detail = f"too many form fields in one request (the limit is {MAX_FILES})"
            raise RequestError(400, f"malformed multipart body: {detail}"
                               if "limit" not in detail else detail) from None
        try:
            images = []
            for _key, value in form.multi_items():
                if isinstance(value, UploadFile):
                    images.append((value.filename or "upload", await value.read()))
        finally:
            await form.close()
        if not images:
            raise RequestError(400, "no image file in the request: " + UNSUPPORTED)
        return images
    if ctype.startswith("image/") or ctype == "application/octet-stream":
        name = request.query_params.get("name") or "upload"
        return [(name, await request.body())]
    shown = ctype or "none"
    raise RequestError(415, f"unsupported content type {shown}: " + UNSUPPORTED)


def create_app(config: AppConfig, batcher: "Batcher") -> Any:
    """The ASGI application (FastAPI with the limit and key middlewares)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse
    from starlette.exceptions import HTTPException

    from toolkit.predict.writers import row_dict
    from toolkit.version import __version__

    @asynccontextmanager
    async def lifespan(_app: Any):
        await batcher.start()
        if config.on_ready:
            config.on_ready()
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(title="tk serve", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)

    def error(status: int, message: str, **extra: Any) -> JSONResponse:
        return JSONResponse({"error": message, **extra}, status_code=status)

    @app.exception_handler(RequestError)
    async def _request_error(_r: Request, exc: RequestError) -> JSONResponse:
        return error(exc.status, exc.message)

    @app.exception_handler(HTTPException)
    async def _http_error(_r: Request, exc: HTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_r: Request, exc: RequestValidationError) -> JSONResponse:
        return error(400, "bad request: " + "; ".join(str(e.get("msg")) for e in exc.errors()))

    @app.exception_handler(Exception)
    async def _bug(_r: Request, exc: Exception) -> JSONResponse:  # logged by uvicorn too
        return error(500, f"internal error: {type(exc).__name__}: {' '.join(str(exc).split())}")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/model")
    async def model() -> dict[str, Any]:
        return {"name": config.name, "classes": config.classes,
                "task": config.meta.get("task", "single-label"),
                "preprocessing": config.preprocessing, "runtime": config.runtime,
                "tk_version": __version__,
                "batching": {"max_batch": config.max_batch, "max_wait_ms": config.max_wait_ms},
                "max_upload_bytes": config.max_upload_bytes}

    @app.get("/v1/stats")
    async def stats() -> dict[str, int]:
        return batcher.stats.to_dict()

    async def predict_request(request: Request) -> "tuple[list[Any], int]":
        k = _topk(request.query_params.get("topk"), len(config.classes))
        images = await read_images(request)
        return await batcher.predict(images, k), k

    @app.post("/v1/predict")
    async def predict(request: Request) -> JSONResponse:
        rows, _k = await predict_request(request)
        body = [row_dict(r) for r in rows]
        if all(r.error is not None for r in rows):
            return error(422, rows[0].error, rows=body)
        return JSONResponse(body)

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return _page(config, None, None)

    @app.post("/", response_class=HTMLResponse)
    async def page_predict(request: Request) -> HTMLResponse:
        try:
            rows, _k = await predict_request(request)
        except RequestError as exc:
            return _page(config, None, exc.message, exc.status)
        status = 422 if all(r.error is not None for r in rows) else 200
        return _page(config, rows, None, status)

    app.add_middleware(BodyLimit, limit=config.max_upload_bytes)
    if config.api_key:
        app.add_middleware(ApiKey, key=config.api_key)  # before the body is parsed
    app.add_middleware(Linger)  # outermost: every refusal is read by the client
    return app


_CSP = ("default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'")


def _page(config: AppConfig, rows: list[Any] | None, message: str | None,
          status: int = 200) -> Any:
    """The upload page: a plain form; results and errors below it (all text escaped)."""
    from fastapi.responses import HTMLResponse

    e = html.escape
    parts = []
    if message:
        parts.append(f'<p class="error" id="error">{e(message)}</p>')
    for row in rows or []:
        parts.append(f"<h2>{e(row.path or '')}</h2>")
        if row.error is not None:
            parts.append(f'<p class="error">{e(row.error)}</p>')
            continue
        cells = "".join(f"<tr><td>{e(label)}</td><td>{score:.4f}</td></tr>"
                        for label, score in row.topk)
        parts.append('<table class="topk"><tr><th>class</th><th>score</th></tr>'
                     f"{cells}</table>")
    k = min(5, len(config.classes))
    body = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>tk serve: {e(config.name)}</title>
<style>body{{font-family:sans-serif;max-width:40em;margin:2em auto}}
.error{{color:#b00}} td,th{{padding:.2em 1em;text-align:left}}</style></head>
<body><h1>{e(config.name)}</h1>
<p>{len(config.classes)} classes; runtime {e(config.runtime)}.</p>
<form method="post" action="/?topk={k}" enctype="multipart/form-data">
<input type="file" name="file" accept="image/*" multiple required>
<button type="submit">Predict</button></form>
{''.join(parts)}
</body></html>"""
    return HTMLResponse(body, status_code=status,
                        headers={"Content-Security-Policy": _CSP,
                                 "X-Content-Type-Options": "nosniff"})
