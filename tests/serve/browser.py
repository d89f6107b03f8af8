"""Headless Chromium driven over the DevTools protocol (a websocket, aiohttp's client): open a page, evaluate
JavaScript in it, take a screenshot. Enough for the chat page's test, without a WebDriver."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import re
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp

from flowspec.compat import timeout

__all__ = ["Page", "chromium", "open_page"]


def chromium() -> str | None:
    """The Chromium binary (Debian's `chromium` package), or None."""
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


class Page:
    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self._ids = itertools.count(1)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        n = next(self._ids)
        await self.ws.send_json({"id": n, "method": method, "params": params})
        while True:
            msg = json.loads((await self.ws.receive()).data)
            if msg.get("id") == n:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]  # type: ignore[no-any-return]

    async def eval(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout_s: float) -> Any:
        """Poll `expression` until it is truthy."""
        async with timeout(timeout_s):
            while not (value := await self.eval(expression)):
                await asyncio.sleep(0.25)
        return value

    async def screenshot(self, path: Path) -> None:
        data = (await self.call("Page.captureScreenshot", format="png"))["data"]
        path.write_bytes(base64.b64decode(data))


@asynccontextmanager
async def open_page(url: str, width: int = 960, height: int = 1000) -> AsyncIterator[Page]:
    binary = chromium()
    assert binary is not None
    with tempfile.TemporaryDirectory(prefix="flowspec-chromium-") as profile:
        proc = await asyncio.create_subprocess_exec(
            binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
            f"--user-data-dir={profile}", f"--window-size={width},{height}", "--remote-debugging-port=0",
            "--hide-scrollbars", "about:blank", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        drain: asyncio.Task[None] | None = None
        try:
            port = await _devtools_port(proc)
            assert proc.stderr is not None
            drain = asyncio.create_task(_drain(proc.stderr))  # chromium must never block on a full pipe
            async with aiohttp.ClientSession() as http:
                async with http.put(f"http://127.0.0.1:{port}/json/new") as r:
                    target = await r.json()
                async with http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                    page = Page(ws)
                    await page.call("Page.navigate", url=url)  # the whole URL, fragment included
                    yield page
        finally:
            if proc.returncode is None:
                proc.terminate()
            await proc.wait()
            if drain is not None:
                await drain


async def _devtools_port(proc: asyncio.subprocess.Process) -> int:
    assert proc.stderr is not None
    async with timeout(60):
        while line := await proc.stderr.readline():
            m = re.search(rb"DevTools listening on ws://[^:]+:(\d+)/", line)
            if m:
                return int(m.group(1))
    raise RuntimeError(f"chromium exited ({proc.returncode}) before its DevTools endpoint was up")


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.read(65536):
        pass
