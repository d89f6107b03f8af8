"""The chat page in a real headless Chromium against the live server: a question typed in streams its answer
(the same text the API gives), and the strip below shows every stage's busy fraction and the tokens accepted
per verification. Skipped, saying why, only where no Chromium could be installed (`make test` installs it)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import openai
import pytest

from tests.e2e.conftest import SMOL
from tests.serve.browser import chromium, open_page
from tests.serve.conftest import API_KEY, STAGES, LiveServer

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(chromium() is None, reason="no Chromium: `make test` installs it (apt-get install chromium); "
                                                  "install it to run the chat page in a browser"),
]

PROMPT = "Write a haiku about pipelines."
N = 24


async def test_the_chat_page_streams_an_answer_and_shows_the_pipeline(server: LiveServer, tmp_path: Path) -> None:
    api = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=300)
    try:
        expected = await api.chat.completions.create(model=SMOL, messages=[{"role": "user", "content": PROMPT}],
                                                     max_tokens=N, temperature=0)
    finally:
        await api.close()
    async with open_page(f"{server.url}/#key={API_KEY}&max_tokens={N}") as page:
        await page.wait_for("document.querySelectorAll('#stages .stage').length", 30)  # /health was read
        await page.eval(f"document.getElementById('prompt').value = {json.dumps(PROMPT)}")
        await page.eval("document.getElementById('send').click()")
        state = await page.wait_for("['done', 'error'].includes(document.getElementById('strip').dataset.state)"
                                    " && document.getElementById('strip').dataset.state", 240)
        answer = await page.eval("document.getElementById('answer').textContent")
        assert state == "done", answer
        assert answer == expected.choices[0].message.content
        widths = await page.eval("[...document.querySelectorAll('#stages .bar > div')].map(d => d.style.width)")
        assert len(widths) == STAGES and all(w.endswith("%") and int(w[:-1]) > 0 for w in widths), widths
        bars = await page.eval("document.querySelectorAll('#accepted > div').length")
        assert bars >= 2  # tokens accepted per verification, drawn as they came
        numbers = await page.eval("document.getElementById('numbers').textContent")
        assert "mean accepted" in numbers and "tokens/s" in numbers, numbers
        shot = Path(os.environ.get("FLOWSPEC_PAGE_SCREENSHOT", tmp_path / "page.png"))
        await page.screenshot(shot)
    assert shot.stat().st_size > 10_000
