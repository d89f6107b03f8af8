"""The HTTP side of `flowspec serve`: an aiohttp application on the head's own event loop (uvloop where installed).

    POST /v1/chat/completions   chat, streamed as server-sent events (ending `data: [DONE]`) or whole
    POST /v1/completions        raw text completion, likewise
    GET  /v1/models             the one model served
    GET  /v1/stats/last         the last answer's pipeline statistics (the chat page's strip)
    GET  /health                every stage reachable? 200, else 503 naming the stages that are not
    GET  /metrics               Prometheus text (flowspec/serve/metrics.py)
    GET  /                      the chat page

The handlers are thin: read the JSON body (within the size limit), parse it (protocol.py), hand it to the serving
logic (serving.py), and write what comes back as JSON or as server-sent events. Every ApiError, and every HTTP
error aiohttp raises itself, becomes OpenAI's error body in one place (the `_errors` middleware). Past
`max_concurrent` requests answered at once, one more gets a 429 with Retry-After at once. A client that goes
away cancels its request, which closes it on every stage. With an API key, /v1/* requires
`Authorization: Bearer KEY` (compared in constant time); /, /health and /metrics stay open, as in vLLM.

`Server.drain` shuts down gently: every new request gets a 503, those in flight get a grace period, and the rest
are then ended, each with an error naming the shutdown (a stream: an error event, then `data: [DONE]`).
"""

from __future__ import annotations

import asyncio
import hmac
import importlib.resources
import json
import time
from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web

from flowspec.api import Cluster
from flowspec.serve.metrics import CONTENT_TYPE
from flowspec.serve.protocol import SSE_DONE, ApiError, Limits, parse_chat, parse_completion, shutting_down, sse
from flowspec.serve.serving import RETRY_AFTER_S, Job, ServeConfig, Serving

__all__ = ["ServeConfig", "Server"]

log = structlog.get_logger("flowspec.serve")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class Server:
    def __init__(self, cluster: Cluster, config: ServeConfig) -> None:
        self.config = config
        self.serving = Serving(cluster, config)
        self._page = importlib.resources.files("flowspec.serve").joinpath("static/index.html").read_bytes()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.config.limits.max_body_bytes,
                              middlewares=[self._access_log, self._errors, self._refuse_draining, self._auth])
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/stats/last", self.last_stats)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.prometheus)
        app.router.add_get("/", self.index)
        return app

    async def drain(self, grace: float, now: asyncio.Event) -> None:
        """Shut down gently (see `Serving.drain`): new requests get a 503, those in flight `grace` seconds."""
        await self.serving.drain(grace, now)

    # -- middlewares (outermost first) ---------------------------------------------------------------------
    @web.middleware
    async def _access_log(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        start = time.monotonic()
        status = 499  # the client went away before an answer
        try:
            response = await handler(request)
            status = response.status
            return response
        finally:
            log.info("http.request", method=request.method, path=request.path, status=status,
                     duration_ms=round((time.monotonic() - start) * 1000, 1), client=request.remote,
                     request_id=request.get("request_id"))

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as exc:
            error = exc
        except web.HTTPException as exc:  # no such route or method, a body past client_max_size
            if exc.status < 400:
                raise
            error = _http_error(exc, self.config.limits)
        if error.status < 500:
            self.serving.metrics.reject(error.status)
        headers = {"Retry-After": str(RETRY_AFTER_S)} if error.status == 429 else None
        return web.json_response(error.body(), status=error.status, headers=headers)

    @web.middleware
    async def _refuse_draining(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self.serving.draining:
            raise shutting_down()
        return await handler(request)

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        key = self.config.api_key
        if key is not None and request.path.startswith("/v1/"):
            given = request.headers.get("Authorization", "")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
                raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                               code="invalid_api_key")
        return await handler(request)

    # -- small endpoints --------------------------------------------------------------------------------------
    async def index(self, request: web.Request) -> web.Response:
        return web.Response(body=self._page, content_type="text/html", charset="utf-8")

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response(self.serving.models())

    async def last_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.serving.last_stats())

    async def health(self, request: web.Request) -> web.Response:
        body = self.serving.health()
        return web.json_response(body, status=503 if body["down"] else 200)

    async def prometheus(self, request: web.Request) -> web.Response:
        return web.Response(body=self.serving.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    # -- generation -------------------------------------------------------------------------------------------
    async def chat(self, request: web.Request) -> web.StreamResponse:
        limits = self.config.limits
        gen = parse_chat(await _json(request, limits.max_body_bytes), limits)
        return await self._answer(request, self.serving.chat(gen))

    async def completions(self, request: web.Request) -> web.StreamResponse:
        limits = self.config.limits
        gen = parse_completion(await _json(request, limits.max_body_bytes), limits,
                               vocab_size=self.serving.vocab_size)
        return await self._answer(request, self.serving.completion(gen))

    async def _answer(self, request: web.Request, job: Job) -> web.StreamResponse:
        request["request_id"] = job.rid
        with self.serving.admission():
            if not job.gen.stream:
                return web.json_response(await self.serving.whole(job))
            response = web.StreamResponse(headers=_SSE_HEADERS)
            await response.prepare(request)
            try:
                await self.serving.stream(job, lambda obj: response.write(sse(obj)))
                await response.write(SSE_DONE)
                await response.write_eof()
            except ConnectionError:  # the client went away (aiohttp cancels the handler first, when it can)
                pass
            return response


async def _json(request: web.Request, limit: int) -> object:
    size = request.content_length
    if size is not None and size > limit:  # refuse what is announced too big before reading any of it
        raise ApiError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
    raw = await request.read()  # aiohttp stops past `client_max_size` (413) when no length was announced
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
    except RecursionError:  # a few thousand nested [ or {: no OpenAI request nests past a handful of levels
        raise ApiError(400, "the request body is nested too deeply") from None


def _http_error(exc: web.HTTPException, limits: Limits) -> ApiError:
    if exc.status == 413:
        return ApiError(413, f"the request body is larger than {limits.max_body_bytes} bytes",
                        code="request_too_large")
    if exc.status == 404:
        return ApiError(404, f"no such endpoint: {exc.reason}", code="not_found")
    return ApiError(exc.status, exc.reason or f"HTTP {exc.status}")
