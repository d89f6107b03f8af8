"""The serve room without a pipeline: request validation, the text stream, binding and shutdown flags."""

from __future__ import annotations

import subprocess
import sys

import pytest

from flowspec.cli.serve import check_bind
from flowspec.errors import ConfigError
from flowspec.serve.protocol import ApiError, Limits, parse_chat, parse_completion
from flowspec.text import TextStream

LIMITS = Limits(max_messages=3, max_tokens=100, default_max_tokens=50)


def chat(**fields: object) -> dict[str, object]:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}


def test_a_chat_request_is_read_with_openai_defaults() -> None:
    gen = parse_chat(chat(max_tokens=7, temperature=0, stop="\n\n", seed=3, stream=True,
                          stream_options={"include_usage": True}), LIMITS)
    assert (gen.max_tokens, gen.temperature, gen.top_p, gen.seed, gen.stop) == (7, 0.0, 1.0, 3, ("\n\n",))
    assert gen.stream and gen.include_usage and gen.messages == (("user", "hi"),)
    default = parse_chat(chat(), LIMITS)
    assert default.max_tokens == 50 and default.temperature == 1.0 and not default.stream
    assert parse_chat(chat(max_completion_tokens=9, max_tokens=5), LIMITS).max_tokens == 9
    parts = parse_chat({"model": "m", "messages": [{"role": "developer", "content": [
        {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}, LIMITS)
    assert parts.messages == (("system", "ab"),)


@pytest.mark.parametrize(("fields", "param"), [
    ({"n": 2}, "n"), ({"logprobs": True}, "logprobs"), ({"tools": [{"type": "function"}]}, "tools"),
    ({"frequency_penalty": 0.5}, "frequency_penalty"), ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"max_tokens": 101}, "max_tokens"), ({"max_tokens": 0}, "max_tokens"), ({"max_completion_tokens": "9"},
                                                                             "max_completion_tokens"),
    ({"temperature": 3}, "temperature"), ({"top_p": 0}, "top_p"), ({"seed": 1.5}, "seed"),
    ({"stop": ["a"] * 5}, "stop"), ({"stop": [""]}, "stop"), ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}] * 4}, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content"),
    ({"model": ""}, "model"),
])
def test_unsupported_or_bad_fields_are_refused_by_name(fields: dict[str, object], param: str) -> None:
    with pytest.raises(ApiError) as exc:
        parse_chat(chat(**fields), LIMITS)
    assert exc.value.status == 400 and exc.value.param == param
    assert set(exc.value.body()["error"]) == {"message", "type", "param", "code"}


def test_neutral_values_and_unknown_fields_are_ignored() -> None:
    parse_chat(chat(n=1, logprobs=False, tools=[], frequency_penalty=0, presence_penalty=0.0, user="u",
                    metadata={"a": "b"}, logit_bias={}, response_format={"type": "text"}, something_new=1), LIMITS)


def test_completion_prompts() -> None:
    assert parse_completion({"model": "m", "prompt": "abc"}, LIMITS).prompt == "abc"
    assert parse_completion({"model": "m", "prompt": ["abc"]}, LIMITS).prompt == "abc"
    assert parse_completion({"model": "m", "prompt": [1, 2, 3]}, LIMITS).prompt == (1, 2, 3)
    assert parse_completion({"model": "m", "prompt": "x"}, LIMITS).max_tokens == 16  # OpenAI's default
    for bad in ("", ["a", "b"], [1, -2], None):
        with pytest.raises(ApiError, match="prompt"):
            parse_completion({"model": "m", "prompt": bad}, LIMITS)
    with pytest.raises(ApiError) as exc:
        parse_completion({"model": "m", "prompt": "x", "echo": True}, LIMITS)
    assert exc.value.param == "echo"


def test_token_id_prompts_out_of_range_say_so() -> None:
    for ids, index, value, allowed in (([-1, 5], 0, -1, "0 or more"), ([3, 4, -7], 2, -7, "0 or more")):
        with pytest.raises(ApiError, match=rf"'prompt' token ids must be integers in {allowed}; "
                                           rf"prompt\[{index}\] is {value}") as exc:
            parse_completion({"model": "m", "prompt": ids}, LIMITS)
        assert exc.value.param == "prompt" and "batch" not in exc.value.message
    with pytest.raises(ApiError, match=r"in 0\.\.99 \(this model's vocabulary\); prompt\[1\] is 100"):
        parse_completion({"model": "m", "prompt": [5, 100]}, LIMITS, vocab_size=100)
    assert parse_completion({"model": "m", "prompt": [0, 99]}, LIMITS, vocab_size=100).prompt == (0, 99)
    with pytest.raises(ApiError, match="a batch of prompts is not supported"):
        parse_completion({"model": "m", "prompt": [[1, 2], [3]]}, LIMITS)


async def test_the_library_streams_text_by_the_servers_rule() -> None:
    """Cluster.stream and the HTTP server cut text with the one TextStream: whole characters, stop strings."""
    from flowspec.api import Cluster

    pieces = {1: "Hello", 2: " wor", 3: "ld", 4: "\ufffd", 5: "é", 6: " END", 7: " more"}
    closed: list[bool] = []

    def decode(tokens: list[int]) -> str:
        return "".join(pieces[t] for t in tokens).replace("\ufffdé", "é")

    async def stream_tokens(*args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        try:
            for t in (1, 2, 3, 4, 5, 6, 7):
                yield [t]
        finally:
            closed.append(True)

    cluster = object.__new__(Cluster)
    cluster.decode = decode  # type: ignore[method-assign]
    cluster.stream_tokens = stream_tokens  # type: ignore[method-assign]
    deltas = [d async for d in cluster.stream("x", stop=[" END"])]
    assert "".join(deltas) == "Hello worldé" and not any(d.endswith("\ufffd") for d in deltas)
    assert closed == [True]  # the request was ended at the stop string, not generated on
    assert "".join([d async for d in cluster.stream("x")]) == "Hello worldé END more"


def test_one_chat_template_rule() -> None:
    from flowspec.text import chat_ids

    class Templated:
        chat_template = "t"

        def apply_chat_template(self, messages, add_generation_prompt, tokenize):  # type: ignore[no-untyped-def]
            assert add_generation_prompt and tokenize
            return {"input_ids": [len(m["content"]) for m in messages]}

    class Plain:
        def encode(self, text: str) -> list[int]:
            return [ord(c) for c in text]

    assert chat_ids(Templated(), [{"role": "user", "content": "abc"}]) == [3]
    assert chat_ids(Plain(), [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]) == [97, 10, 98]


def test_text_stream_holds_back_half_characters_and_stop_strings() -> None:
    pieces = {1: "Hello", 2: " wor", 3: "ld", 4: "\ufffd", 5: "é", 6: " END", 7: " more"}

    def decode(tokens: list[int]) -> str:
        text = "".join(pieces[t] for t in tokens)
        return text.replace("\ufffdé", "é")  # token 4 is the first half of the character token 5 ends

    s = TextStream(decode, stop=[" END"])
    out = [s.feed([1]), s.feed([2]), s.feed([3]), s.feed([4]), s.feed([5]), s.feed([6])]
    assert "".join(out) == "Hello worldé" and s.stopped
    assert all(" E" not in piece for piece in out)  # never shows the start of the stop string
    assert s.feed([7]) == "" and s.finish() == ""
    plain = TextStream(decode)
    assert plain.feed([1, 2]) == "Hello wor" and plain.feed([4]) == "" and plain.feed([5]) == "é"
    assert plain.finish() == ""


def test_a_non_loopback_host_needs_an_api_key() -> None:
    check_bind("127.0.0.1", None)
    check_bind("localhost", None)
    check_bind("0.0.0.0", "key")
    with pytest.raises(ConfigError, match="refusing to serve on 0.0.0.0 without an API key"):
        check_bind("0.0.0.0", None)
    with pytest.raises(ConfigError, match="empty"):
        check_bind("127.0.0.1", " ")


@pytest.mark.parametrize("grace", ["-1", "nan", "inf"])
def test_a_bad_shutdown_grace_is_one_error_line(grace: str) -> None:
    out = subprocess.run([sys.executable, "-m", "flowspec", "serve", "--local", "--shutdown-grace", grace],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out
    errors = [line for line in out.stderr.splitlines() if "error:" in line]  # after argparse's usage lines
    assert len(errors) == 1 and errors[0].startswith("flowspec serve: error: argument --shutdown-grace: must be "), \
        out.stderr


@pytest.mark.parametrize(("field", "value"), [
    ("temperature", -1.0), ("temperature", 3.0), ("temperature", 2.5), ("top_p", 0.0), ("top_p", 1.5),
])
def test_the_cli_and_the_server_refuse_the_same_sampling_values_in_the_same_words(field: str, value: float) -> None:
    """One rule (SamplingParams): the HTTP schema and `flowspec run`'s flags refuse a value with its words."""
    import os
    import subprocess
    import sys
    from dataclasses import replace
    from pathlib import Path

    from flowspec.sched import SamplingParams

    with pytest.raises(ConfigError) as rule:
        replace(SamplingParams(), **{field: value})
    with pytest.raises(ApiError) as api:
        parse_chat(chat(**{field: value}), LIMITS)
    assert api.value.status == 400 and api.value.param == field and api.value.message == str(rule.value)
    flag = "--" + field.replace("_", "-")
    root = Path(__file__).resolve().parents[2]
    run = subprocess.run([sys.executable, "-m", "flowspec", "run", "--local", "--prompt", "Hi", flag, str(value)],
                         capture_output=True, text=True, timeout=120, cwd=root,
                         env={**os.environ, "PYTHONPATH": str(root)})
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert run.stderr.strip().splitlines()[-1].endswith(f"argument {flag}: {rule.value}"), run.stderr


def test_sampling_values_in_range_pass_every_edge() -> None:
    from flowspec.cli.options import temperature, top_p

    for t, p in ((0, 1), (2, 0.01), (0.7, 0.9)):
        gen = parse_chat(chat(temperature=t, top_p=p), LIMITS)
        assert (gen.temperature, gen.top_p) == (t, p) == (temperature(str(t)), top_p(str(p)))


async def test_the_running_and_waiting_gauges_are_the_heads_own_counts() -> None:
    """/metrics' num_requests_running and num_requests_waiting read the head (as vLLM's read its engine): a
    request waiting for a place in the head is waiting, not running as well. /health's `running` stays the
    server's own admission count (what --max-concurrent bounds): none came through HTTP here."""
    import asyncio
    import contextlib
    from types import SimpleNamespace

    from aiohttp import test_utils
    from prometheus_client.parser import text_string_to_metric_families

    from flowspec.node.backend import Backend
    from flowspec.node.head import HeadNode
    from flowspec.sched import Budget, Mode, SamplingParams
    from flowspec.serve import ServeConfig, Server
    from tests.node.fakes import CountingHead, FakeStages, Script

    gate = asyncio.Event()
    stages = FakeStages(2, Script(gates={"prefill": gate}))  # the first request holds its place, prefilling
    stages.links = [SimpleNamespace(error=None, bytes_sent=0, bytes_received=0)] * 2  # what /metrics reads
    stages.addresses = [("127.0.0.1", 1), ("127.0.0.1", 2)]  # type: ignore[attr-defined]  # what /health reads
    backend = Backend()
    head = HeadNode(CountingHead(), stages, backend=backend, max_requests=1)  # type: ignore[arg-type]
    server = Server(SimpleNamespace(head=head), ServeConfig(model="m"))  # type: ignore[arg-type]

    async def second_waits() -> None:
        while head.waiting < 1:
            await asyncio.sleep(0.01)

    async def generate() -> None:
        async with contextlib.aclosing(head.generate([1, 2, 3], Budget(Mode.AR, 2), SamplingParams(), 4)) as tokens:
            async for _ in tokens:
                pass

    async def counts(http: test_utils.TestClient) -> tuple[float, float, int]:  # type: ignore[type-arg]
        gauges = {sample.name: sample.value for family in text_string_to_metric_families(
            await (await http.get("/metrics")).text()) for sample in family.samples}
        health = await (await http.get("/health")).json()
        return gauges["flowspec:num_requests_running"], gauges["flowspec:num_requests_waiting"], health["running"]

    try:
        async with test_utils.TestClient(test_utils.TestServer(server.app())) as http:
            requests = [asyncio.create_task(generate()) for _ in range(2)]
            await asyncio.wait_for(second_waits(), 30)  # for the first's place
            assert await counts(http) == (1.0, 1.0, 0)
            gate.set()
            await asyncio.wait_for(asyncio.gather(*requests), 30)
            assert await counts(http) == (0.0, 0.0, 0)
    finally:
        await backend.aclose()


def test_past_the_context_is_the_heads_one_rule_with_openais_code() -> None:
    """The server asks the head's check_request (one context rule) and answers with OpenAI's code for it."""
    from types import SimpleNamespace

    from flowspec.errors import RequestRejected
    from flowspec.node.head import HeadNode
    from flowspec.serve.protocol import parse_completion
    from flowspec.serve.serving import ServeConfig, Serving
    from tests.node.fakes import CountingHead, FakeStages

    head = HeadNode(CountingHead(), FakeStages(2))  # type: ignore[arg-type]  # a context of 4096 positions
    with pytest.raises(RequestRejected) as rejected:
        head.check_request(10, 4086)
    assert rejected.value.code == "context_length_exceeded"
    head.check_request(10, 4085)
    serving = Serving(SimpleNamespace(head=head), ServeConfig(model="m"))  # type: ignore[arg-type]
    gen = parse_completion({"model": "m", "prompt": list(range(10)), "max_tokens": 4086}, Limits(), vocab_size=16)
    with pytest.raises(ApiError) as api:
        serving.completion(gen)
    assert (api.value.status, api.value.code, api.value.param) == (400, "context_length_exceeded", "max_tokens")
    assert str(rejected.value) == api.value.message
