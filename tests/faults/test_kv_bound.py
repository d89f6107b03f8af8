"""A long generation keeps every stage's KV memory bounded by the context length: 2,000 tokens (EOS disabled)
through three in-process stages of a tiny random-weight llama over real loopback sockets, flowspec mode with
the target drafting for itself. Each stage's cache is allocated once at `open` (prompt + new tokens + the
budget's tree slack), never grows, and the tree never holds more slots than it; nothing is left after close."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from flowspec.config import parse_peers
from flowspec.net import Timeouts, serve
from flowspec.node.build import build_head, build_stage, deployment
from flowspec.node.head import GenerationResult
from flowspec.node.local import free_ports
from flowspec.sched import Budget, Mode, SamplingParams
from flowspec.store import make_drafter

NEW = 2000
PROMPT = [5, 17, 3, 42, 8, 23, 61, 7, 11, 30]


def tiny_llama(folder: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=6,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=10000.0, eos_token_id=1,
                      bos_token_id=0, initializer_range=0.3)  # peaked logits: drafts get accepted
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


@pytest.mark.slow
async def test_long_generation_keeps_stage_kv_bounded(tmp_path: Path) -> None:
    folder = tiny_llama(tmp_path / "tiny-llama")
    cache = tmp_path / "cache"
    dep = deployment(str(folder), 3, cache_dir=cache)
    ports = free_ports(4)
    peers = parse_peers("\n".join(f"127.0.0.1:{p}" for p in ports))
    timeouts = Timeouts()
    nodes = [build_stage(dep, peers, k, None, timeouts) for k in (1, 2, 3)]
    servers = [await serve("127.0.0.1", ports[k], hello=node.hello, secret=None, limits=node.limits,
                           timeouts=timeouts, on_link=node.on_link) for k, node in enumerate(nodes, start=1)]
    drafter = make_drafter("self", str(folder), cache, capacity=256)  # the drafter's own cache may grow
    head = build_head(dep, peers, None, timeouts, drafter=drafter)
    budget = Budget(mode=Mode.FLOWSPEC, num_stages=3)
    expected_capacity = len(PROMPT) + NEW + 1 + budget.tree_slack + 1  # what the head asks for at open
    seen: dict[int, dict[str, int]] = {k: {"capacity": 0, "length": 0, "tree": 0, "samples": 0} for k in (1, 2, 3)}

    def sample() -> None:
        for k, node in enumerate(nodes, start=1):
            for r in node.requests.values():
                s = seen[k]
                assert r.cache.capacity == expected_capacity == r.cache.k.shape[2] == r.cache.v.shape[2]
                assert r.cache.length <= r.cache.capacity
                assert r.tree.cache_len <= r.cache.capacity
                s["capacity"] = r.cache.capacity
                s["length"] = max(s["length"], r.cache.length)
                s["tree"] = max(s["tree"], r.tree.cache_len)
                s["samples"] += 1

    async def sampler() -> None:
        while True:
            sample()
            await asyncio.sleep(0.002)

    result = GenerationResult()
    await head.connect()
    task = asyncio.create_task(sampler())
    try:
        async for _ in head.generate(PROMPT, budget, SamplingParams(), NEW, eos_ids=(), result=result):
            sample()
        task.cancel()
        for _ in range(100):  # the close reaches every stage
            if not any(node.requests or node.orphans for node in nodes):
                break
            await asyncio.sleep(0.02)
        assert all(not node.requests and not node.orphans for node in nodes), "request state left on a stage"
    finally:
        task.cancel()
        await head.aclose()
        for server in servers:
            server.close()
        for node in nodes:
            await node.aclose()

    assert len(result.tokens) == NEW and result.finish_reason == "length", result.finish_reason
    assert result.stats.drafts > 0 and result.stats.rows_sent > result.stats.committed, result.stats  # trees
    bound = len(PROMPT) + NEW + budget.tree_slack + 2
    for k in (1, 2, 3):
        s = seen[k]
        assert s["samples"] > 100, s
        assert s["capacity"] == expected_capacity <= bound, s
        assert s["length"] >= len(PROMPT) + NEW - 64, s  # it did hold the whole context at the end
        assert s["tree"] <= s["capacity"], s
    print(f"\n[faults] kv bound: {NEW} tokens, capacity {expected_capacity} slots per stage "
          f"(prompt {len(PROMPT)} + {NEW} + tree slack {budget.tree_slack} + 2), peak lengths "
          f"{[seen[k]['length'] for k in (1, 2, 3)]}, {result.stats.mean_accepted:.2f} accepted per verification, "
          f"{result.total_s:.1f} s")

    # Not garbage: the first tokens equal transformers' greedy generate on the unsplit model (all 2,000 would
    # take transformers over a minute on CPU).
    from flowspec.store import load_hf_reference

    ref = load_hf_reference(str(folder))
    check = 200
    with torch.no_grad():
        ids = torch.tensor([PROMPT])
        out = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=check, min_new_tokens=check,
                           do_sample=False, eos_token_id=None, pad_token_id=0)
    assert result.tokens[:check] == out[0, len(PROMPT):].tolist()
