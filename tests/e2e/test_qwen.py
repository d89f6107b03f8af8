"""The Qwen pair over 4 real stage processes: flowspec (0.5B drafting for the 1.5B) equals `ar` and
transformers' greedy generate token for token."""

from __future__ import annotations

import gc

import pytest

from flowspec.api import Request
from tests.e2e.conftest import Reference, require_model, specbench_prompts

TARGET, DRAFT = "qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b"
NEW = 16


@pytest.mark.slow
@pytest.mark.qwen
async def test_qwen_flowspec_equals_ar_and_transformers(head_for, stages) -> None:  # type: ignore[no-untyped-def]
    require_model(TARGET)
    require_model(DRAFT)
    text = specbench_prompts(("qa",))[0]
    try:
        async with head_for(4, draft=DRAFT, model=TARGET) as cluster:
            ids = cluster.encode(text)
            spec = await cluster.generate(ids, Request(mode="flowspec", max_new_tokens=NEW))
            ar = await cluster.generate(ids, Request(mode="ar", max_new_tokens=NEW))
    finally:
        stages.release(TARGET, 4)
    assert spec.tokens == ar.tokens
    ref = Reference(TARGET)
    try:
        assert spec.tokens == ref.greedy(ids, NEW)
    finally:
        del ref
        gc.collect()
