"""A long generation keeps every stage's KV memory bounded by the context length: 2,000 tokens (EOS disabled)
through three in-process stages of a tiny random-weight llama over real loopback sockets, flowspec mode with
the target drafting for itself. Each stage's cache is allocated once at `open` (prompt + new tokens + the
budget's tree slack), never grows, and the tree never holds more slots than it; nothing is left after close.

And on a real stage process: a head opening as many requests as a stage admits, each with the largest cache it
admits, cannot get more, and once they close the process's memory goes back down (it used to keep it all)."""

from __future__ import annotations

import asyncio
import time
from asyncio import Server
from pathlib import Path

import pytest
import torch

from flowspec.config import Peers, parse_peers
from flowspec.net import MAX_REQUESTS, Close, Error, Open, Prefill, Stats, Timeouts, connect, serve
from flowspec.node.build import Deployment, build_head, build_stage, deployment
from flowspec.node.head import GenerationResult
from flowspec.node.local import LocalCluster, free_ports
from flowspec.node.stage import _TREE_SLACK_MAX, StageNode
from flowspec.sched import Budget, Mode, SamplingParams
from flowspec.store import make_drafter
from tests.faults.conftest import SMOL, rss_mb

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


async def tiny_stages(folder: Path, n: int, cache: Path) -> tuple[Deployment, Peers, list[StageNode], list[Server]]:
    """n stages of the tiny model serving on loopback in this process (each on this loop; compute threads)."""
    dep = deployment(str(folder), n, cache_dir=cache)
    ports = free_ports(n + 1)
    peers = parse_peers("\n".join(f"127.0.0.1:{p}" for p in ports))
    timeouts = Timeouts()
    nodes = [build_stage(dep, peers, k, None, timeouts) for k in range(1, n + 1)]
    servers = [await serve("127.0.0.1", ports[k], hello=node.hello, secret=None, limits=node.limits,
                           timeouts=timeouts, on_link=node.on_link) for k, node in enumerate(nodes, start=1)]
    return dep, peers, nodes, servers


@pytest.mark.slow
async def test_long_generation_keeps_stage_kv_bounded(tmp_path: Path) -> None:
    folder = tiny_llama(tmp_path / "tiny-llama")
    cache = tmp_path / "cache"
    dep, peers, nodes, servers = await tiny_stages(folder, 3, cache)
    timeouts = Timeouts()
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


@pytest.mark.slow
async def test_a_stage_gives_back_the_memory_of_closed_requests() -> None:
    layers = [2, 28]  # stage 1, the one measured, keeps its caches small enough for a shared test machine
    dep = deployment(SMOL, 2, layers)
    cfg = dep.config
    largest = cfg.max_position_embeddings + _TREE_SLACK_MAX  # the largest cache a stage admits
    cache_mb = 2 * layers[0] * cfg.num_kv_heads * cfg.head_dim * largest * 4 / 2**20  # k and v, fp32
    # a slow open (zeroing the caches) must not look like a silent head to the stage
    local = LocalCluster(SMOL, 2, layers, extra_args=["--heartbeat-timeout", "120"])
    timeouts = Timeouts(heartbeat_timeout=120.0)
    await local.start()
    try:
        pid = local.procs[1].pid
        links = [await connect(p.host, p.port, hello=dep.hello("head", 0), expect_index=k, secret=None,
                               limits=dep.limits(), timeouts=timeouts) for k, p in enumerate(local.peers.stages, 1)]
        first, last = links
        before = rss_mb(pid)
        for cycle in range(2):  # a second round must not add to what the first one left
            reqs = range(1 + 100 * cycle, 1 + 100 * cycle + MAX_REQUESTS)
            for req in reqs:
                await first.send(Open(req, largest))
                await last.send(Open(req, 16))
                await first.send(Prefill(req, 0, True, 0, torch.arange(8, dtype=torch.int64)))
            for _ in reqs:
                assert isinstance(await last.recv(120), Prefill)
            held = rss_mb(pid)
            assert held - before > 0.8 * MAX_REQUESTS * cache_mb, (before, held, cache_mb)  # the caches are real
            await first.send(Open(900 + cycle, 16))  # one more than a stage serves
            refused = await first.recv(60)
            assert isinstance(refused, Error) and refused.code == "busy", refused
            for req in reqs:
                await first.send(Close(req))
                await last.send(Close(req))
            for _ in reqs:
                assert isinstance(await first.recv(60), Stats)
                assert isinstance(await last.recv(60), Stats)
            after, deadline = rss_mb(pid), time.monotonic() + 10
            while after - before > 100 and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
                after = rss_mb(pid)
            print(f"\n[faults] stage 1 RSS {before:.0f} MB, {held:.0f} MB with {MAX_REQUESTS} requests of "
                  f"{largest} slots ({cache_mb:.0f} MB each), {after:.0f} MB after they closed")
            assert after - before < 100, f"RSS {before:.0f} -> {held:.0f} -> {after:.0f} MB after the closes"
        await first.send(Open(1000, largest + 1))  # past the largest cache: refused, nothing allocated
        refused = await first.recv(60)
        assert isinstance(refused, Error) and refused.code == "limits", refused
        for link in links:
            await link.close()
    finally:
        local.stop()
