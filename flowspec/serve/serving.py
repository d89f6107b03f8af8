"""The serving logic over a `Cluster`, free of HTTP: what `flowspec serve` does with a validated request.

`Serving.chat` / `Serving.completion` turn a parsed `Generation` into a `Job` (the model named, the prompt encoded
and checked against the context and the head's own rules); `admission` admits it (at most `max_concurrent` at
once: one more is refused at once with a 429); `whole` answers it in one body and `stream` as OpenAI chunks
handed one by one to a `send` callback. Each answer updates the metrics and the last answer's statistics, finished
or not. `drain` shuts down gently. routes.py is the HTTP side around this; protocol.py has the shapes.

Requests run concurrently through the one head (each with its own scheduler and drafting state; their segments
interleave on the stages). A handler cancelled while it waits (its client went away) cancels its generation,
which closes the request on every stage.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog

from flowspec.api import Cluster, Request
from flowspec.errors import FlowSpecError, RequestRejected
from flowspec.node.head import GenerationResult
from flowspec.sched import BudgetOverrides
from flowspec.serve.metrics import Finished, ServeMetrics
from flowspec.serve.protocol import (
    CHAT,
    COMPLETION,
    ApiError,
    Generation,
    Kind,
    Limits,
    pipeline_failed,
    shutting_down,
    usage,
)
from flowspec.text import TextStream

__all__ = ["RETRY_AFTER_S", "Job", "Send", "ServeConfig", "Serving"]

log = structlog.get_logger("flowspec.serve")

Send = Callable[[dict[str, Any]], Awaitable[None]]  # hands one stream chunk (or error body) to the client
_Emit = Callable[[str, list[int]], Awaitable[None]]

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


@dataclass(frozen=True, slots=True)
class Job:
    """A request checked and ready to generate: what was asked, its prompt's token ids, the endpoint's shapes."""

    gen: Generation
    prompt: list[int]
    kind: Kind
    rid: str  # the answer's id, also the access log's request_id


class Serving:
    def __init__(self, cluster: Cluster, config: ServeConfig) -> None:
        self.cluster, self.config = cluster, config
        # Requests admitted and not yet answered: what `max_concurrent` bounds. Not the head's `running`: the
        # 429 must be decided and the place taken in one synchronous step, before any await, while the head
        # counts a request only once its generation has begun (after the stream's headers are sent, and after a
        # drafter load), and lets it go before the answer's last chunks are written. Counting the head's would
        # let requests that arrive together all pass and queue in the head instead of getting their 429.
        self.admitted = 0
        self.metrics = ServeMetrics(cluster.head, config.model)  # its running/waiting gauges: the head's own
        self.last: dict[str, Any] | None = None  # the last answer's statistics
        self.draining = False  # shutting down: new requests get a 503
        self._generations: set[asyncio.Task[Any]] = set()  # those in flight, which a drain may end
        self.created = int(time.time())

    # -- requests in ------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.cluster.dep.config.vocab_size

    def chat(self, gen: Generation) -> Job:
        self._check_model(gen)
        prompt = self.cluster.encode_messages([{"role": role, "content": text} for role, text in gen.messages])
        return self._job(gen, prompt, CHAT)

    def completion(self, gen: Generation) -> Job:
        self._check_model(gen)
        prompt = self.cluster.encode(gen.prompt, chat=False) if isinstance(gen.prompt, str) else list(gen.prompt)
        return self._job(gen, prompt, COMPLETION)

    def _check_model(self, gen: Generation) -> None:
        if gen.model != self.config.model:
            raise ApiError(404, f"the model {gen.model!r} does not exist here; this server serves "
                           f"{self.config.model!r}", param="model", code="model_not_found")

    def _job(self, gen: Generation, prompt: list[int], kind: Kind) -> Job:
        try:
            self.cluster.head.check_request(len(prompt), gen.max_tokens)  # the head's rules (context), before a byte
        except RequestRejected as exc:
            raise ApiError(400, str(exc), param="max_tokens", code=exc.code) from None
        return Job(gen, prompt, kind, f"{kind.prefix}-{uuid.uuid4().hex}")

    @contextlib.contextmanager
    def admission(self) -> Iterator[None]:
        """Hold one of the `max_concurrent` places while answering, or refuse at once (ApiError 503 or 429)."""
        if self.draining:  # it came in before the drain began, and has only now read its body
            raise shutting_down()
        if self.admitted >= self.config.max_concurrent:
            raise ApiError(429, f"{self.admitted} requests are being answered, the most this server takes at "
                           f"once; try again in {RETRY_AFTER_S} s", type="requests", code="rate_limit_exceeded")
        self.admitted += 1
        try:
            yield
        finally:
            self.admitted -= 1

    # -- answers out ------------------------------------------------------------------------------------------
    async def whole(self, job: Job) -> dict[str, Any]:
        """The answer in one body (ApiError 503 when the pipeline fails or a drain ends it)."""
        async def keep(delta: str, tokens: list[int]) -> None:
            pass

        try:
            done, text = await self._endable(self._generate(job, keep))
        except FlowSpecError as exc:
            raise pipeline_failed(exc) from exc
        body = job.kind.whole(job.rid, int(time.time()), self.config.model, text.text, done.finish_reason)
        body["usage"] = usage(done.prompt_tokens, len(done.result.tokens))
        return body

    async def stream(self, job: Job, send: Send) -> None:
        """The answer as chunks handed to `send`: the opening (chat), the text as it comes, the final chunk (and
        the usage chunk if asked); when the pipeline fails or a drain ends it, an error body instead of the final
        chunk. A ConnectionError from `send` (the client went away) ends the generation and comes out."""
        gen, kind, rid = job.gen, job.kind, job.rid
        created, model = int(time.time()), self.config.model
        accepted: list[int] = []  # tokens committed per verification since the last chunk

        async def chunk(obj: dict[str, Any]) -> None:
            if gen.include_usage and "usage" not in obj and "error" not in obj:
                obj["usage"] = None  # OpenAI's rule: with include_usage every chunk has it, null but the last
            await send(obj)

        async def emit(delta: str, tokens: list[int]) -> None:
            if tokens:
                accepted.append(len(tokens))
            if delta:
                obj = kind.chunk(rid, created, model, delta, None)
                if gen.stats:
                    obj["flowspec"] = {"accepted": accepted[:]}
                    accepted.clear()
                await chunk(obj)

        opening = kind.opening(rid, created, model)
        if opening is not None:
            await chunk(opening)
        try:
            done, _ = await self._endable(self._generate(job, emit))
        except FlowSpecError as exc:
            await chunk(pipeline_failed(exc).body())
        except ApiError as exc:  # the server is shutting down
            await chunk(exc.body())
        else:
            final = kind.chunk(rid, created, model, "", done.finish_reason)
            if gen.stats:
                final["flowspec"] = {"accepted": accepted, "last": self.last}
            await chunk(final)
            if gen.include_usage:
                await chunk(kind.usage_chunk(rid, created, model, usage(done.prompt_tokens, len(done.result.tokens))))

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
            raise shutting_down("it ended this answer before it was finished")
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

    async def _generate(self, job: Job, emit: _Emit) -> tuple[Finished, TextStream]:
        """Generate, handing each newly shown text to `emit`; stop at a stop string. The metrics and `last`
        see every request, finished or not."""
        gen, prompt = job.gen, job.prompt
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

    # -- small answers ----------------------------------------------------------------------------------------
    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": self.config.model, "object": "model", "created": self.created, "owned_by": "flowspec"}]}

    def last_stats(self) -> dict[str, Any]:
        if self.last is None:
            raise ApiError(404, "no answer yet", code="not_found")
        return self.last

    def health(self) -> dict[str, Any]:
        """Every stage and whether it is up; `down` lists those that are not (then the answer is a 503)."""
        links = self.cluster.head.links
        stages = []
        for k, (host, port) in enumerate(links.addresses, start=1):
            link = links.links[k - 1] if k <= len(links.links) else None
            error = "not connected" if link is None else None if link.error is None else str(link.error)
            stages.append({"stage": k, "address": f"{host}:{port}", "up": error is None, "error": error})
        down = [s["stage"] for s in stages if not s["up"]]
        return {"status": "ok" if not down else "degraded", "model": self.config.model, "mode": self.config.mode,
                "stages": stages, "down": down, "running": self.admitted,  # beside the bound it counts against
                "max_concurrent": self.config.max_concurrent, "open_requests": links.open_requests,
                "recoveries": links.generation}
