"""OpenAI's wire shapes, both ways, as pure functions over JSON values: no HTTP and no pipeline here.

In: a request body (parsed JSON) becomes a validated `Generation`, or an `ApiError` that names the offending
field. What flowspec honours: `messages` (or `prompt`), `max_tokens` / `max_completion_tokens`, `temperature`,
`top_p`, `seed`, `stop`, `stream`, `stream_options.include_usage`. Fields that OpenAI clients send with their
neutral value (`n: 1`, `frequency_penalty: 0`, `logprobs: false`, `tools: []`, ...) are accepted and ignored;
any other value of them is refused with a 400 naming the field, because silently ignoring it would change what
the client asked for. Fields that change nothing about the output (`user`, `metadata`, `store`, ...) and fields
this server does not know are ignored.

Out: the bodies of an answer (`CHAT`, `COMPLETION`: whole, or the chunks of a stream), `usage`, the error body
(`ApiError.body`) and the errors the server itself names, and the server-sent event framing (`sse`, `SSE_DONE`).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from flowspec.errors import ConfigError, FlowSpecError
from flowspec.sched import SamplingParams

__all__ = ["CHAT", "COMPLETION", "SSE_DONE", "ApiError", "Generation", "Kind", "Limits", "parse_chat",
           "parse_completion", "pipeline_failed", "shutting_down", "sse", "usage"]

_MAX_STOP = 4  # stop sequences per request, as OpenAI
_MAX_STOP_CHARS = 256  # per stop sequence: a stop string is matched in the text as it grows


class ApiError(Exception):
    """An HTTP error in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True, slots=True)
class Limits:
    """What one request may ask for (each default: room for real use, a bound on what one client can take)."""

    max_body_bytes: int = 1 << 20  # a long conversation is tens of KiB; the model's context is far smaller
    max_messages: int = 256  # messages in one conversation
    max_tokens: int = 4096  # the most max_tokens a request may ask for (the context bounds it as well)
    default_max_tokens: int = 256  # a chat request without max_tokens (a completion's default is OpenAI's 16)


@dataclass(frozen=True, slots=True)
class Generation:
    """A validated request: a conversation (chat) or a prompt (completions), and how to sample the answer."""

    model: str
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    stats: bool  # flowspec's extension `flowspec_stats`: pipeline statistics in the stream (the chat page)
    messages: tuple[tuple[str, str], ...] = ()  # (role, content), chat only
    prompt: str | tuple[int, ...] = ""  # completions only: text, or token ids


def _neutral(*values: object) -> Callable[[object], bool]:
    return lambda v: v is None or any(v == ok and type(v) is type(ok) for ok in values)


# field -> the values that change nothing; anything else is refused, naming the field
_NEUTRAL: dict[str, Callable[[object], bool]] = {
    "n": _neutral(1),
    "best_of": _neutral(1),
    "logprobs": _neutral(False),
    "top_logprobs": _neutral(0),
    "echo": _neutral(False),
    "suffix": _neutral(""),
    "frequency_penalty": _neutral(0, 0.0),
    "presence_penalty": _neutral(0, 0.0),
    "logit_bias": _neutral({}),
    "tools": _neutral([]),
    "functions": _neutral([]),
    "tool_choice": _neutral("none", "auto"),
    "function_call": _neutral("none", "auto"),
    "response_format": _neutral({"type": "text"}),
    "modalities": _neutral(["text"]),
    "audio": _neutral(),
    "prediction": _neutral(),
    "web_search_options": _neutral(),
}
_WHY = {
    "n": "only n=1 is supported (one answer per request)",
    "best_of": "only best_of=1 is supported",
    "logprobs": "log-probabilities are not returned",
    "top_logprobs": "log-probabilities are not returned",
    "tools": "tool calls are not supported",
    "functions": "function calls are not supported",
    "tool_choice": "tool calls are not supported",
    "function_call": "function calls are not supported",
}


def parse_chat(body: object, limits: Limits) -> Generation:
    """A `POST /v1/chat/completions` body."""
    obj = _object(body)
    raw = obj.get("messages")
    if not isinstance(raw, list) or not raw:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", param="messages")
    if len(raw) > limits.max_messages:
        raise ApiError(400, f"{len(raw)} messages: at most {limits.max_messages} per request", param="messages")
    messages = tuple(_message(m, i) for i, m in enumerate(raw))
    max_tokens = obj.get("max_completion_tokens", obj.get("max_tokens"))
    param = "max_completion_tokens" if "max_completion_tokens" in obj else "max_tokens"
    return _generation(obj, limits, max_tokens, param, limits.default_max_tokens, messages=messages)


def parse_completion(body: object, limits: Limits, vocab_size: int | None = None) -> Generation:
    """A `POST /v1/completions` body: `prompt` is a string, a list of one string, or a list of token ids (each in
    0..vocab_size-1, when `vocab_size` is given; never negative)."""
    obj = _object(body)
    prompt = obj.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        text: str | tuple[int, ...] = _token_ids(prompt, vocab_size)
    elif isinstance(prompt, str) and prompt:
        text = prompt
    elif isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        raise ApiError(400, "one prompt per request (a batch of prompts is not supported)", param="prompt")
    else:
        raise ApiError(400, "'prompt' must be a non-empty string or a list of token ids", param="prompt")
    return _generation(obj, limits, obj.get("max_tokens"), "max_tokens", 16, prompt=text)


def _token_ids(ids: list[int], vocab_size: int | None) -> tuple[int, ...]:
    for i, t in enumerate(ids):
        if t < 0 or (vocab_size is not None and t >= vocab_size):
            allowed = f"0..{vocab_size - 1} (this model's vocabulary)" if vocab_size is not None else "0 or more"
            raise ApiError(400, f"'prompt' token ids must be integers in {allowed}; prompt[{i}] is {t}",
                           param="prompt")
    return tuple(ids)


def _object(body: object) -> Mapping[str, Any]:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "'model' is required (see GET /v1/models)", param="model")
    for field, neutral in _NEUTRAL.items():
        if field in body and not neutral(body[field]):
            why = _WHY.get(field, f"flowspec does not support {field}")
            raise ApiError(400, f"unsupported value of '{field}': {why}", param=field, code="unsupported_value")
    return body


def _message(m: object, i: int) -> tuple[str, str]:
    param = f"messages[{i}]"
    if not isinstance(m, dict):
        raise ApiError(400, f"{param} must be an object with 'role' and 'content'", param=param)
    role, content = m.get("role"), m.get("content")
    if role not in ("system", "developer", "user", "assistant"):
        raise ApiError(400, f"{param}.role must be system, developer, user or assistant, not {role!r}",
                       param=f"{param}.role")
    if isinstance(content, list):  # content parts: text only
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"{param}.content[{j}]: only text parts are supported",
                               param=f"{param}.content")
            texts.append(part["text"])
        content = "".join(texts)
    if not isinstance(content, str):
        raise ApiError(400, f"{param}.content must be a string or a list of text parts", param=f"{param}.content")
    return ("system" if role == "developer" else role, content)


def _generation(obj: Mapping[str, Any], limits: Limits, max_tokens: object, tokens_param: str, default: int,
                **what: Any) -> Generation:
    if max_tokens is None:
        max_tokens = min(default, limits.max_tokens)
    if not _is_int(max_tokens) or not 1 <= int(max_tokens) <= limits.max_tokens:  # type: ignore[call-overload]
        raise ApiError(400, f"'{tokens_param}' must be an integer in 1..{limits.max_tokens}", param=tokens_param)
    temperature, top_p = _sampling(obj)
    seed = obj.get("seed")
    if seed is None:
        seed = secrets.randbits(63)  # no seed: a fresh draw each request, as OpenAI
    elif not _is_int(seed):
        raise ApiError(400, "'seed' must be an integer", param="seed")
    stream = obj.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise ApiError(400, "'stream' must be true or false", param="stream")
    options = obj.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object", param="stream_options")
    return Generation(model=str(obj["model"]), max_tokens=int(max_tokens), temperature=temperature,  # type: ignore[call-overload]
                      top_p=top_p, seed=int(seed), stop=_stop(obj.get("stop")), stream=bool(stream),
                      include_usage=bool(options.get("include_usage")), stats=obj.get("flowspec_stats") is True,
                      **what)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _sampling(obj: Mapping[str, Any]) -> tuple[float, float]:
    """temperature (OpenAI's default 1) and top_p, in the ranges of SamplingParams (the one rule, the CLI's too)."""
    temperature, top_p = _number(obj, "temperature", 1.0), _number(obj, "top_p", 1.0)
    param = "temperature"
    try:
        SamplingParams(temperature)
        param = "top_p"
        SamplingParams(top_p=top_p)
    except ConfigError as exc:
        raise ApiError(400, str(exc), param=param) from None
    return temperature, top_p


def _number(obj: Mapping[str, Any], name: str, default: float) -> float:
    v = obj.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ApiError(400, f"'{name}' must be a number", param=name)
    try:
        return float(v)
    except OverflowError:  # an integer past a float's range
        return float("inf") if v > 0 else float("-inf")


def _stop(v: object) -> tuple[str, ...]:
    stops = [v] if isinstance(v, str) else v if isinstance(v, list) else [] if v is None else None
    if stops is None or not all(isinstance(s, str) and 0 < len(s) <= _MAX_STOP_CHARS for s in stops) \
            or len(stops) > _MAX_STOP:
        raise ApiError(400, f"'stop' must be a string or a list of at most {_MAX_STOP} non-empty strings of at most "
                       f"{_MAX_STOP_CHARS} characters", param="stop")
    return tuple(stops)


# -- responses ------------------------------------------------------------------------------------------------
def pipeline_failed(exc: FlowSpecError) -> ApiError:
    return ApiError(503, f"the pipeline failed: {exc}", type="server_error", code="pipeline_error")


def shutting_down(what: str = "it takes no new requests") -> ApiError:
    return ApiError(503, f"the server is shutting down: {what}", type="server_error", code="server_shutdown")


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


SSE_DONE = b"data: [DONE]\n\n"  # a stream's last event, after its last chunk or its error


def sse(obj: dict[str, Any]) -> bytes:
    """One server-sent event: a chunk, or an error body."""
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


class Kind:
    """The response shapes of one endpoint: `rid` is the answer's id, `created` its Unix time."""

    prefix = ""  # of the answer's id
    chunk_object = ""

    def opening(self, rid: str, created: int, model: str) -> dict[str, Any] | None:
        return None

    def chunk(self, rid: str, created: int, model: str, delta: str, finish: str | None) -> dict[str, Any]:
        raise NotImplementedError

    def whole(self, rid: str, created: int, model: str, text: str, finish: str) -> dict[str, Any]:
        raise NotImplementedError

    def usage_chunk(self, rid: str, created: int, model: str, counts: dict[str, int]) -> dict[str, Any]:
        """A stream's last chunk when the client asked for usage (stream_options.include_usage): no choices."""
        return {"id": rid, "object": self.chunk_object, "created": created, "model": model, "choices": [],
                "usage": counts}


class _Chat(Kind):
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


class _Completion(Kind):
    prefix, chunk_object = "cmpl", "text_completion"

    def chunk(self, rid: str, created: int, model: str, delta: str, finish: str | None) -> dict[str, Any]:
        return {"id": rid, "object": self.chunk_object, "created": created, "model": model,
                "choices": [{"index": 0, "text": delta, "logprobs": None, "finish_reason": finish}]}

    def whole(self, rid: str, created: int, model: str, text: str, finish: str) -> dict[str, Any]:
        return self.chunk(rid, created, model, text, finish)


CHAT: Kind = _Chat()  # POST /v1/chat/completions
COMPLETION: Kind = _Completion()  # POST /v1/completions
