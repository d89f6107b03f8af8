"""The real `openai` client against a live `flowspec serve` (tests/serve/conftest.py): greedy answers equal
`flowspec run --json`'s on the same stages, concurrent streams equal their solo answers, a client that goes
away frees its request on every stage, bad requests get OpenAI-shaped errors, a full server answers 429, and
/metrics counts what happened."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import SMOL, specbench_prompts
from tests.serve.conftest import API_KEY, MAX_BODY, MAX_CONCURRENT, LiveServer

pytestmark = pytest.mark.slow

N = 20  # tokens per answer
PROMPTS = [*specbench_prompts(("mt_bench", "qa", "humaneval")), "Write a haiku about pipelines."]


@pytest.fixture(scope="module")
def references(server: LiveServer, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """`flowspec run --json` (mode ar, greedy) for PROMPTS: another head, in its own process, on the same stages."""
    folder = tmp_path_factory.mktemp("refs")
    prompt_file = folder / "prompts.jsonl"
    prompt_file.write_text("".join(json.dumps({"question_id": i, "turns": [p]}) + "\n" for i, p in enumerate(PROMPTS)))
    peers = server.stage_logs[1].parent / "peers.txt"
    out = subprocess.run([sys.executable, "-m", "flowspec", "run", "--peers", str(peers), "--model", SMOL,
                          "--mode", "ar", "--json", "--prompt-file", str(prompt_file), "--max-new-tokens", str(N)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [r["id"] for r in rows] == [str(i) for i in range(len(PROMPTS))]
    return [r["text"] for r in rows]


@pytest.fixture
async def client(server: LiveServer) -> AsyncIterator[openai.AsyncOpenAI]:
    c = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=300)
    try:
        yield c
    finally:
        await c.close()


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


async def streamed(client: openai.AsyncOpenAI, prompt: str, **kw: Any) -> tuple[str, Any, Any]:
    """(text, finish_reason, usage) of a streamed chat answer."""
    stream = await client.chat.completions.create(model=SMOL, messages=user(prompt), max_tokens=N,  # type: ignore[call-overload]
                                                  temperature=0, stream=True,
                                                  stream_options={"include_usage": True}, **kw)
    text, finish, usage = "", None, None
    async for chunk in stream:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
        usage = chunk.usage or usage
    return text, finish, usage


def metrics(server: LiveServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, body = server.get("/metrics")
    assert status == 200
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "model_name"))
            out[(sample.name, labels)] = sample.value
    return out


async def test_chat_whole_and_streamed_equal_flowspec_run(client: openai.AsyncOpenAI, references: list[str]) -> None:
    whole = await client.chat.completions.create(model=SMOL, messages=user(PROMPTS[0]),  # type: ignore[arg-type]
                                                 max_tokens=N, temperature=0)
    assert whole.choices[0].message.content == references[0]
    assert whole.choices[0].finish_reason in ("length", "stop")
    assert whole.usage is not None and whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    if whole.choices[0].finish_reason == "length":
        assert whole.usage.completion_tokens == N
    text, finish, usage = await streamed(client, PROMPTS[0])
    assert text == references[0]
    assert finish == whole.choices[0].finish_reason
    assert usage is not None and usage.total_tokens == whole.usage.total_tokens


async def test_four_concurrent_streams_equal_their_solo_answers(server: LiveServer, client: openai.AsyncOpenAI,
                                                                references: list[str]) -> None:
    seen: list[int] = []
    done = asyncio.Event()

    async def watch() -> None:
        async with aiohttp.ClientSession() as http:
            while not done.is_set():
                async with http.get(server.url + "/health") as r:
                    seen.append((await r.json())["running"])
                await asyncio.sleep(0.2)

    watcher = asyncio.create_task(watch())
    try:
        answers = await asyncio.gather(*(streamed(client, p) for p in PROMPTS))
    finally:
        done.set()
        await watcher
    assert [text for text, _, _ in answers] == references
    assert max(seen) == len(PROMPTS), f"requests were not in flight together: running seen {sorted(set(seen))}"
    server.wait_idle()


async def test_stop_sequence_cuts_the_answer(client: openai.AsyncOpenAI, references: list[str]) -> None:
    words = references[1].split()
    stop = " " + words[len(words) // 2]
    text, finish, _ = await streamed(client, PROMPTS[1], stop=[stop])
    assert text == references[1][:references[1].index(stop)]
    assert finish == "stop"


async def test_completions_endpoint(client: openai.AsyncOpenAI) -> None:
    whole = await client.completions.create(model=SMOL, prompt="The capital of France is", max_tokens=6,
                                            temperature=0)
    assert whole.choices[0].text and whole.usage is not None and whole.usage.completion_tokens <= 6
    stream = await client.completions.create(model=SMOL, prompt="The capital of France is", max_tokens=6,
                                             temperature=0, stream=True)
    assert "".join([c.choices[0].text async for c in stream if c.choices]) == whole.choices[0].text


async def test_client_disconnect_frees_the_request_on_every_stage(server: LiveServer) -> None:
    before = metrics(server).get(("flowspec:request_success_total", (("finished_reason", "abort"),)), 0.0)
    body = {"model": SMOL, "messages": user(PROMPTS[2]), "max_tokens": 500, "temperature": 0, "stream": True}
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        response = await http.post(server.url + "/v1/chat/completions", json=body)
        chunks = 0
        async for line in response.content:
            chunks += line.startswith(b"data: ")
            if chunks == 3:
                break
        response.close()  # the client goes away mid-answer
    health = server.wait_idle()
    assert health["status"] == "ok"
    after = metrics(server)
    assert after[("flowspec:request_success_total", (("finished_reason", "abort"),))] == before + 1
    for k in server.stage_logs:  # every request a stage opened, it closed (the cancelled one too)
        events = server.stage_events(k)
        opened = {e["req"] for e in events if e.get("event") == "request.open"}
        closed = {e["req"] for e in events if e.get("event") in ("request.closed", "request.failed",
                                                                  "request.orphaned")}
        assert opened and opened == closed, f"stage {k}: requests still open: {opened - closed}"


async def test_bad_requests_get_openai_errors(server: LiveServer, client: openai.AsyncOpenAI) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession(headers=headers) as http:
        async with http.post(server.url + "/v1/chat/completions", data=b"{not json") as r:
            assert r.status == 400
            error = (await r.json())["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
        async with http.post(server.url + "/v1/chat/completions", data=b" " * (MAX_BODY + 1)) as r:
            assert r.status == 413
            assert "larger than" in (await r.json())["error"]["message"]
    with pytest.raises(openai.NotFoundError) as not_found:
        await client.chat.completions.create(model="gpt-4o", messages=user("hi"), max_tokens=2)  # type: ignore[arg-type]
    assert not_found.value.code == "model_not_found" and not_found.value.param == "model"
    wrong = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        await wrong.models.list()
    await wrong.close()
    for field, value in [("n", 2), ("logprobs", True), ("tools", [{"type": "function", "function": {"name": "f"}}])]:
        with pytest.raises(openai.BadRequestError) as bad:
            await client.chat.completions.create(model=SMOL, messages=user("hi"), max_tokens=2,  # type: ignore[call-overload]
                                                 **{field: value})
        assert bad.value.param == field, bad.value
    with pytest.raises(openai.BadRequestError) as too_many:
        await client.chat.completions.create(model=SMOL, messages=user("hi"), max_tokens=10**6)  # type: ignore[arg-type]
    assert too_many.value.param == "max_tokens"
    # fields OpenAI clients send with neutral values are accepted
    ok = await client.chat.completions.create(model=SMOL, messages=user("hi"), max_tokens=2, n=1,  # type: ignore[arg-type]
                                              frequency_penalty=0, presence_penalty=0, user="someone", seed=1)
    assert ok.choices[0].message.content is not None
    models = await client.models.list()
    assert [m.id for m in models.data] == [SMOL]
    assert server.get("/v1/models")[0] == 401  # no key
    assert server.get("/health")[0] == 200  # open, as vLLM's


async def test_a_deeply_nested_body_is_a_400(server: LiveServer) -> None:
    """The JSON parser gives up a thousand levels down (a RecursionError): a 400 like every other bad body, not a
    500, and the server serves on."""
    deep = b"[" * 5000 + b"]" * 5000
    bodies = [deep, b'{"model": "' + SMOL.encode() + b'", "messages": ' + deep + b"}",
              b'{"a": ' * 3000 + b"1" + b"}" * 3000]
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        for path in ("/v1/chat/completions", "/v1/completions"):
            for body in bodies:
                async with http.post(server.url + path, data=body,
                                     headers={"Content-Type": "application/json"}) as r:
                    assert r.status == 400, (path, body[:40], await r.text())
                    error = (await r.json())["error"]
                    assert error["type"] == "invalid_request_error" and "nested too deeply" in error["message"]
    assert server.get("/health")[0] == 200


async def test_requests_past_the_limit_get_429_at_once(server: LiveServer) -> None:
    body = {"model": SMOL, "messages": user(PROMPTS[3]), "max_tokens": 500, "temperature": 0, "stream": True}
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        streams = [await http.post(server.url + "/v1/chat/completions", json=body) for _ in range(MAX_CONCURRENT)]
        try:
            assert server.health()["running"] == MAX_CONCURRENT
            for _ in range(5):
                async with http.post(server.url + "/v1/chat/completions", json=body,
                                     timeout=aiohttp.ClientTimeout(total=10)) as r:
                    assert r.status == 429
                    assert r.headers["Retry-After"] == "1"
                    assert (await r.json())["error"]["code"] == "rate_limit_exceeded"
        finally:
            for response in streams:
                response.close()
    server.wait_idle()


async def test_metrics_parse_and_count(server: LiveServer, client: openai.AsyncOpenAI) -> None:
    before = metrics(server)
    answer = await client.chat.completions.create(model=SMOL, messages=user(PROMPTS[3]), max_tokens=4,  # type: ignore[arg-type]
                                                  temperature=0)
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="nope", messages=user("hi"), max_tokens=2)  # type: ignore[arg-type]
    after = metrics(server)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert answer.usage is not None
    reason = answer.choices[0].finish_reason
    assert delta("flowspec:request_success_total", finished_reason=reason) == 1
    assert delta("flowspec:prompt_tokens_total") == answer.usage.prompt_tokens
    assert delta("flowspec:generation_tokens_total") == answer.usage.completion_tokens
    assert delta("flowspec:time_to_first_token_seconds_count") == 1
    assert delta("flowspec:e2e_request_latency_seconds_count") == 1
    assert delta("flowspec:request_rejected_total", status="404") == 1
    assert delta("flowspec:spec_decode_num_drafts_total") >= 1  # flowspec mode: verifications
    assert delta("flowspec:spec_decode_accepted_length_count", mode="flowspec") >= 1
    for k in ("1", "2"):
        assert after[("flowspec:stage_up", (("stage", k),))] == 1.0
        assert delta("flowspec:stage_busy_seconds_total", stage=k) > 0
        assert 0.0 < after[("flowspec:stage_busy_fraction", (("stage", k),))] <= 1.0
        assert delta("flowspec:link_sent_bytes_total", stage=k) > 0
    assert after[("flowspec:num_requests_running", ())] == 0.0
    assert after[("flowspec:recoveries_total", ())] == 0.0
    status, last = server.get("/v1/stats/last")
    assert status == 401  # /v1/* wants the key


async def test_health_names_a_stage_that_is_down(server: LiveServer) -> None:
    """Last in this module: it kills stage 2 of the module's server."""
    stage2 = server.stage_pid(2)
    os.kill(stage2, signal.SIGKILL)
    deadline = time.monotonic() + 30  # the head's heartbeat timeout is 5 s
    while server.get("/health")[0] != 503:
        assert time.monotonic() < deadline, "/health still says ok with stage 2 killed"
        await asyncio.sleep(0.2)
    health = json.loads(server.get("/health")[1])
    assert health["status"] == "degraded" and health["down"] == [2]
    assert [s["up"] for s in health["stages"]] == [True, False] and health["stages"][1]["error"]
    assert metrics(server)[("flowspec:stage_up", (("stage", "2"),))] == 0.0
