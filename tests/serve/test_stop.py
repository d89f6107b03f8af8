"""How a live `flowspec serve --local` process stops, and what an open stream sees meanwhile.

SIGTERM drains: new requests get a 503, an open stream runs on for the grace period and then ends with an error
event naming the shutdown and `data: [DONE]`; the process exits 0, every stage closed the request, and no stage
process is left. A second signal ends the drain at once. A stalled stage (SIGSTOPped, past the head's step
timeout) ends the stream with an error event and `[DONE]` too, instead of a cut connection.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack, asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import aiohttp
import pytest

from tests.e2e.conftest import SMOL
from tests.jsonlog import json_events
from tests.serve.conftest import API_KEY, STAGES, LiveServer, start_server, stop_server

pytestmark = pytest.mark.slow

PROMPT = "Write a long story about a lighthouse keeper and her cat."
HEADERS = {"Authorization": f"Bearer {API_KEY}"}


class Stream:
    """An open SSE answer: its `data:` payloads as they come."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.events: list[Any] = []

    async def next(self) -> Any:
        """The next payload (a dict, or "[DONE]"); None at the end of the stream."""
        async for line in self.response.content:
            if line.startswith(b"data: "):
                data = line[6:].strip()
                event = "[DONE]" if data == b"[DONE]" else json.loads(data)
                self.events.append(event)
                return event
        return None

    async def rest(self) -> list[Any]:
        """Every payload until the end of the stream."""
        start = len(self.events)
        while await self.next() is not None:
            pass
        return self.events[start:]


@asynccontextmanager
async def long_stream(server: LiveServer) -> AsyncIterator[Stream]:
    """A chat answer of up to 2000 tokens, streaming (its first content chunk already read)."""
    body = {"model": SMOL, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 2000,
            "temperature": 0, "stream": True}
    async with aiohttp.ClientSession(headers=HEADERS) as http:
        async with http.post(server.url + "/v1/chat/completions", json=body) as response:
            assert response.status == 200, await response.text()
            stream = Stream(response)
            while not content(await stream.next()):
                pass
            yield stream


def content(event: Any) -> str:
    assert isinstance(event, dict) and "choices" in event, event
    return str(event["choices"][0]["delta"].get("content") or "")


def error_code(event: Any) -> str | None:
    return event["error"]["code"] if isinstance(event, dict) and "error" in event else None


async def refused_while_draining(server: LiveServer, deadline_s: float) -> dict[str, Any]:
    """A new request's answer once the drain has begun: a 503 naming the shutdown."""
    body = {"model": SMOL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    deadline = time.monotonic() + deadline_s
    async with aiohttp.ClientSession(headers=HEADERS) as http:
        while True:
            async with http.post(server.url + "/v1/chat/completions", json=body) as response:
                if response.status == 503:
                    answer: dict[str, Any] = await response.json()
                    return answer
            assert time.monotonic() < deadline, "new requests were still answered during the drain"
            await asyncio.sleep(0.05)


def wait_exit(server: LiveServer, stages: dict[int, int], timeout_s: float) -> int:
    """The serve process's exit status, once it and every stage process are gone."""
    code = server.proc.wait(timeout=timeout_s)
    deadline = time.monotonic() + 30
    while left := [k for k, pid in stages.items() if alive(pid)]:
        assert time.monotonic() < deadline, f"stage processes {left} outlived flowspec serve"
        time.sleep(0.1)
    return code


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@contextmanager
def kept_stage_logs(server: LiveServer) -> Iterator[dict[int, BinaryIO]]:
    """The stage processes' logs, open: readable after flowspec serve removed them with its stages."""
    with ExitStack() as stack:
        yield {k: stack.enter_context(open(path, "rb")) for k, path in server.stage_logs.items()}


def closed_everywhere(logs: dict[int, BinaryIO]) -> None:
    """Every request a stage opened, it closed (an ended one too)."""
    for k, log in logs.items():
        events = [json.loads(line) for line in log.read().splitlines() if line.startswith(b"{")]
        opened = {e["req"] for e in events if e.get("event") == "request.open"}
        closed = {e["req"] for e in events if e.get("event") in ("request.closed", "request.failed",
                                                                  "request.orphaned")}
        assert opened and opened == closed, f"stage {k}: requests still open: {opened - closed}"


async def test_sigterm_drains_then_ends_the_open_stream_and_leaves_nothing(tmp_path: Path) -> None:
    grace = 4.0
    server = start_server(tmp_path, "--shutdown-grace", str(grace))
    try:
        stages = {k: server.stage_pid(k) for k in range(1, STAGES + 1)}
        with kept_stage_logs(server) as logs:
            async with long_stream(server) as stream:
                server.proc.send_signal(signal.SIGTERM)
                stopped = time.monotonic()
                refused = await refused_while_draining(server, grace)
                rest = await stream.rest()
                ended = time.monotonic() - stopped
            assert refused["error"]["code"] == "server_shutdown", refused
            assert any(content(e) for e in rest[:-2]), "the open stream was not let run on during the grace period"
            assert error_code(rest[-2]) == "server_shutdown" and rest[-1] == "[DONE]", rest[-3:]
            assert "shutting down" in rest[-2]["error"]["message"], rest[-2]
            assert ended < grace + 20, f"the stream ended {ended:.1f} s after SIGTERM, past the {grace} s grace"
            assert wait_exit(server, stages, 60) == 0, server.log_tail()
            closed_everywhere(logs)
        drained = [e for e in json_events(server.log) if e.get("event") == "serve.drained"]
        assert [e["ended"] for e in drained] == [1], server.log_tail()
    finally:
        stop_server(server)


async def test_a_second_signal_ends_the_drain_at_once(tmp_path: Path) -> None:
    """SIGHUP (a closed terminal) drains as SIGTERM does (it used to do nothing); SIGINT then ends it."""
    grace = 600.0  # longer than this test may take: only the second signal can end the stream in time
    server = start_server(tmp_path, "--shutdown-grace", str(grace))
    try:
        stages = {k: server.stage_pid(k) for k in range(1, STAGES + 1)}
        with kept_stage_logs(server) as logs:
            async with long_stream(server) as stream:
                server.proc.send_signal(signal.SIGHUP)
                await refused_while_draining(server, 60)
                assert content(await stream.next()), "the stream did not go on during the drain"
                server.proc.send_signal(signal.SIGINT)
                rest = await asyncio.wait_for(stream.rest(), 60)
            assert error_code(rest[-2]) == "server_shutdown" and rest[-1] == "[DONE]", rest[-3:]
            assert wait_exit(server, stages, 60) == 0, server.log_tail()
            closed_everywhere(logs)
    finally:
        stop_server(server)


async def test_a_stalled_stage_ends_the_stream_with_an_error_event_and_done(tmp_path: Path) -> None:
    # heartbeats may be silent for 120 s: only the head's 2 s step timeout sees the stall
    server = start_server(tmp_path, "--heartbeat-timeout", "120", "--step-timeout", "2")
    stage2 = server.stage_pid(2)
    try:
        async with long_stream(server) as stream:
            os.kill(stage2, signal.SIGSTOP)
            try:
                rest = await asyncio.wait_for(stream.rest(), 60)
            finally:
                os.kill(stage2, signal.SIGCONT)
        assert error_code(rest[-2]) == "pipeline_error" and rest[-1] == "[DONE]", rest[-3:]
        assert "no progress for 2 s: a stage is stalled" in rest[-2]["error"]["message"], rest[-2]
        assert server.proc.poll() is None, "the server died with its request"
    finally:
        stop_server(server)
