"""The OpenAI-compatible HTTP API on the head's own event loop (aiohttp.web; uvloop where installed).

    POST /v1/chat/completions   chat, streamed as server-sent events (ending `data: [DONE]`) or whole
    POST /v1/completions        raw text completion, likewise
    GET  /v1/models             the one model served
    GET  /v1/stats/last         the last answer's pipeline statistics (the chat page's strip)
    GET  /health                every stage reachable? 200, else 503 naming the stages that are not
    GET  /metrics               Prometheus text (flowspec/serve/metrics.py)
    GET  /                      the chat page

Requests run concurrently through the one head (each with its own scheduler and drafting state; their
segments interleave on the stages) up to `max_concurrent`; one more is answered 429 with Retry-After at once.
A client that goes away cancels its request, which closes it on every stage. With an API key, /v1/* requires
`Authorization: Bearer KEY` (compared in constant time); /, /health and /metrics stay open, as in vLLM.

`Server.drain` shuts down gently: every new request gets a 503, those in flight get a grace period, and the rest
are then ended, each with an error naming the shutdown (a stream: an error event, then `data: [DONE]`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import importlib.resources
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog
from aiohttp import web

from flowspec.api import Cluster, Request
from flowspec.errors import FlowSpecError, RequestRejected
from flowspec.node.head import GenerationResult
from flowspec.sched import BudgetOverrides
from flowspec.serve.metrics import CONTENT_TYPE, Finished, ServeMetrics
from flowspec.serve.schema import ApiError, Generation, Limits, parse_chat, parse_completion
from flowspec.text import TextStream

__all__ = ["ServeConfig", "Server"]

log = structlog.get_logger("flowspec.serve")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Emit = Callable[[str, list[int]], Awaitable[None]]

RETRY_AFTER_S = 1  # what a 429 asks the client to wait: answers take seconds, a place frees up often

T = TypeVar("T")


@dataclass(frozen=True)
class ServeConfig:
    model: str  # the served model's name: requests must name it
    mode: str = "flowspec"
    api_key: str | None = None
    max_concurrent: int = 4  # requests generated at once (a stage serves at most 8); more get a 429
    limits: Limits = Limits()
    budget: BudgetOverrides = BudgetOverrides()  # tree budget fields set, as `flowspec run`'s flags


class Server:
    def __init__(self, cluster: Cluster, config: ServeConfig) -> None:
        self.cluster, self.config = cluster, config
        self.running = 0
        self.metrics = ServeMetrics(cluster.head, config.model, lambda: self.running)
        self.last: dict[str, Any] | None = None  # the last answer's statistics
        self.draining = False  # shutting down: new requests get a 503
        self._generations: set[asyncio.Task[Any]] = set()  # those in flight, which a drain may end
        self.created = int(time.time())
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
            self.metrics.reject(error.status)
        headers = {"Retry-After": str(RETRY_AFTER_S)} if error.status == 429 else None
        return web.json_response(error.body(), status=error.status, headers=headers)

    @web.middleware
    async def _refuse_draining(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self.draining:
            raise _shutting_down()
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
        return web.json_response({"object": "list", "data": [
            {"id": self.config.model, "object": "model", "created": self.created, "owned_by": "flowspec"}]})

    async def last_stats(self, request: web.Request) -> web.Response:
        if self.last is None:
            raise ApiError(404, "no answer yet", code="not_found")
        return web.json_response(self.last)

    async def health(self, request: web.Request) -> web.Response:
        links = self.cluster.head.links
        stages = []
        for k, (host, port) in enumerate(links.addresses, start=1):
            link = links.links[k - 1] if k <= len(links.links) else None
            error = "not connected" if link is None else None if link.error is None else str(link.error)
            stages.append({"stage": k, "address": f"{host}:{port}", "up": error is None, "error": error})
        down = [s["stage"] for s in stages if not s["up"]]
        body = {"status": "ok" if not down else "degraded", "model": self.config.model, "mode": self.config.mode,
                "stages": stages, "down": down, "running": self.running,
                "max_concurrent": self.config.max_concurrent, "open_requests": links.open_requests,
                "recoveries": links.generation}
        return web.json_response(body, status=200 if not down else 503)

    async def prometheus(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    # -- generation -------------------------------------------------------------------------------------------
    async def chat(self, request: web.Request) -> web.StreamResponse:
        gen = parse_chat(await _json(request, self.config.limits.max_body_bytes), self.config.limits)
        self._check_model(gen)
        prompt = self.cluster.encode_messages([{"role": role, "content": text} for role, text in gen.messages])
        return await self._answer(request, gen, prompt, _Chat())

    async def completions(self, request: web.Request) -> web.StreamResponse:
        gen = parse_completion(await _json(request, self.config.limits.max_body_bytes), self.config.limits,
                               vocab_size=self.cluster.dep.config.vocab_size)
        self._check_model(gen)
        prompt = self.cluster.encode(gen.prompt, chat=False) if isinstance(gen.prompt, str) else list(gen.prompt)
        return await self._answer(request, gen, prompt, _Completion())

    def _check_model(self, gen: Generation) -> None:
        if gen.model != self.config.model:
            raise ApiError(404, f"the model {gen.model!r} does not exist here; this server serves "
                           f"{self.config.model!r}", param="model", code="model_not_found")

    async def _answer(self, request: web.Request, gen: Generation, prompt: list[int],
                      kind: _Kind) -> web.StreamResponse:
        context = self.cluster.dep.config.max_position_embeddings
        if len(prompt) + gen.max_tokens + 1 > context:
            raise ApiError(400, f"this model's context is {context} tokens; the prompt has {len(prompt)} and "
                           f"max_tokens asks for {gen.max_tokens} more", param="max_tokens",
                           code="context_length_exceeded")
        try:
            self.cluster.head.check_request(len(prompt), gen.max_tokens)  # the head's own rules, before a byte
        except RequestRejected as exc:
            raise ApiError(400, str(exc), param="max_tokens") from None
        request["request_id"] = rid = f"{kind.prefix}-{uuid.uuid4().hex}"
        with self._admitted():
            if gen.stream:
                return await self._stream(request, gen, prompt, kind, rid)
            return await self._whole(gen, prompt, kind, rid)

    @contextlib.contextmanager
    def _admitted(self) -> Iterator[None]:
        if self.draining:  # it came in before the drain began, and has only now read its body
            raise _shutting_down()
        if self.running >= self.config.max_concurrent:
            raise ApiError(429, f"{self.running} requests are being answered, the most this server takes at once; "
                           f"try again in {RETRY_AFTER_S} s", type="requests", code="rate_limit_exceeded")
        self.running += 1
        try:
            yield
        finally:
            self.running -= 1

    async def _whole(self, gen: Generation, prompt: list[int], kind: _Kind, rid: str) -> web.Response:
        async def keep(delta: str, tokens: list[int]) -> None:
            pass

        try:
            done, text = await self._endable(self._generate(gen, prompt, keep))
        except FlowSpecError as exc:
            raise _pipeline_failed(exc) from exc
        body = kind.whole(rid, self.created_now(), self.config.model, text.text, done.finish_reason)
        body["usage"] = _usage(done)
        return web.json_response(body)

    async def _stream(self, request: web.Request, gen: Generation, prompt: list[int], kind: _Kind,
                      rid: str) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                               "X-Accel-Buffering": "no"})
        await response.prepare(request)
        created, model = self.created_now(), self.config.model
        accepted: list[int] = []  # tokens committed per verification since the last chunk

        async def send(obj: dict[str, Any]) -> None:
            if gen.include_usage and "usage" not in obj and "error" not in obj:
                obj["usage"] = None
            await response.write(b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n")

        async def emit(delta: str, tokens: list[int]) -> None:
            if tokens:
                accepted.append(len(tokens))
            if delta:
                chunk = kind.chunk(rid, created, model, delta, None)
                if gen.stats:
                    chunk["flowspec"] = {"accepted": accepted[:]}
                    accepted.clear()
                await send(chunk)

        try:
            opening = kind.opening(rid, created, model)
            if opening is not None:
                await send(opening)
            try:
                done, _ = await self._endable(self._generate(gen, prompt, emit))
            except FlowSpecError as exc:
                await send(_pipeline_failed(exc).body())
            except ApiError as exc:  # the server is shutting down
                await send(exc.body())
            else:
                final = kind.chunk(rid, created, model, "", done.finish_reason)
                if gen.stats:
                    final["flowspec"] = {"accepted": accepted, "last": self.last}
                await send(final)
                if gen.include_usage:
                    await send({"id": rid, "object": kind.chunk_object, "created": created, "model": model,
                                "choices": [], "usage": _usage(done)})
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except ConnectionError:  # the client went away (aiohttp cancels the handler first, when it can)
            pass
        return response

    async def _endable(self, work: Awaitable[T]) -> T:
        """Await `work` (a generation) as a task a drain may end: ApiError 503 (shutting down) then. A handler
        cancelled meanwhile (its client went away) cancels the task and waits for its close on every stage."""
        task = asyncio.ensure_future(work)
        self._generations.add(task)
        task.add_done_callback(self._generations.discard)
        try:
            await asyncio.wait([task])
        except asyncio.CancelledError:
            task.cancel()
            await asyncio.wait([task])
            raise
        if task.cancelled():  # only a drain cancels it
            raise _shutting_down("it ended this answer before it was finished")
        return task.result()

    async def drain(self, grace: float, now: asyncio.Event) -> None:
        """Shut down gently: from now on every new request gets a 503; the generations in flight get `grace`
        seconds to finish (less if `now` is set meanwhile: a second Ctrl-C), then the rest are ended, each
        answered with an error naming the shutdown once its request is closed on every stage."""
        self.draining = True
        loop = asyncio.get_running_loop()
        log.info("serve.draining", running=len(self._generations), grace_s=grace)
        deadline = loop.time() + grace
        hurry = asyncio.ensure_future(now.wait())
        try:
            while self._generations and not hurry.done() and (left := deadline - loop.time()) > 0:
                await asyncio.wait([*self._generations, hurry], timeout=left, return_when=asyncio.FIRST_COMPLETED)
        finally:
            hurry.cancel()
        ended = list(self._generations)
        for task in ended:
            task.cancel()
        if ended:
            await asyncio.wait(ended)
        log.info("serve.drained", ended=len(ended))

    async def _generate(self, gen: Generation, prompt: list[int], emit: Emit) -> tuple[Finished, TextStream]:
        """Generate, handing each newly shown text to `emit`; stop at a stop string. The metrics and `last`
        see every request, finished or not."""
        request = Request(mode=self.config.mode, max_new_tokens=gen.max_tokens, temperature=gen.temperature,
                          top_p=gen.top_p, seed=gen.seed, budget=self.config.budget)
        result = GenerationResult()
        text = TextStream(self.cluster.decode, gen.stop)
        start = last = time.monotonic()
        gaps: list[tuple[float, int]] = []
        reason = "error"
        try:
            async with contextlib.aclosing(self.cluster.stream_tokens(prompt, request, result)) as stream:
                async for tokens in stream:
                    now = time.monotonic()
                    if len(result.tokens) > len(tokens):  # not the first: the first is time to first token
                        gaps.append((now - last, len(tokens)))
                    last = now
                    await emit(text.feed(tokens), tokens)
                    if text.stopped:
                        break
            await emit(text.finish(), [])
            reason = "stop" if text.stopped or result.finish_reason == "eos" else "length"
        except (asyncio.CancelledError, ConnectionError):
            reason = "abort"
            raise
        finally:
            done = Finished(self.config.mode, len(prompt), reason, time.monotonic() - start, gaps, result)
            self.metrics.record(done)
            self.last = self._stats(done)
        return done, text

    def _stats(self, done: Finished) -> dict[str, Any]:
        result, n = done.result, self.cluster.head.num_stages
        stats = result.stats
        return {
            "mode": done.mode, "finish_reason": done.finish_reason, "prompt_tokens": done.prompt_tokens,
            "tokens": len(result.tokens), "ttft_s": round(result.ttft_s, 4), "total_s": round(result.total_s, 4),
            "tokens_per_s": round(result.tokens_per_s, 3), "decode_tokens_per_s": round(result.decode_tokens_per_s, 3),
            "verifications": stats.verifications, "mean_accepted": round(stats.mean_accepted, 3),
            "accepted_per_verification": stats.accepted_per_verification[-1024:],
            "stages": n, "utilization": [round(u, 3) for u in result.utilization(n)] if result.busy else [],
            "head_busy": round(min(1.0, result.head_busy_s / max(result.total_s, 1e-9)), 3),
            "recoveries": result.recoveries,
        }

    @staticmethod
    def created_now() -> int:
        return int(time.time())


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


def _pipeline_failed(exc: FlowSpecError) -> ApiError:
    return ApiError(503, f"the pipeline failed: {exc}", type="server_error", code="pipeline_error")


def _shutting_down(what: str = "it takes no new requests") -> ApiError:
    return ApiError(503, f"the server is shutting down: {what}", type="server_error", code="server_shutdown")


def _http_error(exc: web.HTTPException, limits: Limits) -> ApiError:
    if exc.status == 413:
        return ApiError(413, f"the request body is larger than {limits.max_body_bytes} bytes",
                        code="request_too_large")
    if exc.status == 404:
        return ApiError(404, f"no such endpoint: {exc.reason}", code="not_found")
    return ApiError(exc.status, exc.reason or f"HTTP {exc.status}")


def _usage(done: Finished) -> dict[str, int]:
    completion = len(done.result.tokens)
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": completion,
            "total_tokens": done.prompt_tokens + completion}


class _Kind:
    """The response shapes of one endpoint."""

    prefix = ""
    chunk_object = ""

    def opening(self, rid: str, created: int, model: str) -> dict[str, Any] | None:
        return None

    def chunk(self, rid: str, created: int, model: str, delta: str, finish: str | None) -> dict[str, Any]:
        raise NotImplementedError

    def whole(self, rid: str, created: int, model: str, text: str, finish: str) -> dict[str, Any]:
        raise NotImplementedError


class _Chat(_Kind):
    prefix, chunk_object = "chatcmpl", "chat.completion.chunk"

    def opening(self, rid: str, created: int, model: str) -> dict[str, Any] | None:
        return {"id": rid, "object": self.chunk_object, "created": created, "model": model,
                "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}]}

    def chunk(self, rid: str, created: int, model: str, delta: str, finish: str | None) -> dict[str, Any]:
        return {"id": rid, "object": self.chunk_object, "created": created, "model": model,
                "choices": [{"index": 0, "delta": {"content": delta} if delta else {}, "logprobs": None,
                             "finish_reason": finish}]}

    def whole(self, rid: str, created: int, model: str, text: str, finish: str) -> dict[str, Any]:
        return {"id": rid, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                             "finish_reason": finish}]}


class _Completion(_Kind):
    prefix, chunk_object = "cmpl", "text_completion"

    def chunk(self, rid: str, created: int, model: str, delta: str, finish: str | None) -> dict[str, Any]:
        return {"id": rid, "object": self.chunk_object, "created": created, "model": model,
                "choices": [{"index": 0, "text": delta, "logprobs": None, "finish_reason": finish}]}

    def whole(self, rid: str, created: int, model: str, text: str, finish: str) -> dict[str, Any]:
        return self.chunk(rid, created, model, text, finish)
