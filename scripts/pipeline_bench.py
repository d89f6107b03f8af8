#!/usr/bin/env python3
"""Pipeline measurements for docs/benchmarks/pipeline.md (real CPU: every process shares this machine's cores).

  latency: per-token decode latency of the `ar` pipeline for 1..N local stages next to transformers' own
           single-process greedy generate (same prompt, same tokens; the tokens are checked equal).
  modes:   for each mode, the `flowspec run --json` statistics averaged over Spec-Bench prompts.

  .venv/bin/python scripts/pipeline_bench.py latency --model smollm2-135m --stages 1,2,3,4 --tokens 32
  .venv/bin/python scripts/pipeline_bench.py modes --model smollm2-135m --draft self:layers=20 --stages 4 \
      --prompt-file data/specbench/mt_bench.jsonl --limit 10 --tokens 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from flowspec.api import Cluster, Request  # noqa: E402
from flowspec.cli.options import result_row  # noqa: E402
from flowspec.node.head import GenerationResult  # noqa: E402
from flowspec.prompts import read_prompt_file  # noqa: E402

PROMPT = "Explain why the sky is blue in two sentences."


def hf_per_token(model: str, ids: list[int], n: int) -> tuple[float, list[int]]:
    from flowspec.store import load_hf_reference

    ref = load_hf_reference(model)
    x = torch.tensor([ids])
    mask = torch.ones_like(x)

    def gen(k: int) -> tuple[float, list[int]]:
        t = time.perf_counter()
        with torch.no_grad():
            out = ref.generate(x, attention_mask=mask, max_new_tokens=k, min_new_tokens=k, do_sample=False)
        return time.perf_counter() - t, out[0, len(ids):].tolist()

    gen(2)  # warm-up
    t1 = min(gen(1)[0] for _ in range(2))
    tn, tokens = gen(n)
    return (tn - t1) / (n - 1), tokens


async def latency(args: argparse.Namespace) -> None:
    rows = []
    ids: list[int] | None = None
    tokens_ref: list[int] | None = None
    for n in [int(s) for s in args.stages.split(",")]:
        async with await Cluster.start_local(args.model, n) as cluster:
            ids = cluster.encode(PROMPT)
            await cluster.generate(ids, Request(mode="ar", max_new_tokens=4))  # warm-up
            r = await cluster.generate(ids, Request(mode="ar", max_new_tokens=args.tokens))
            per = r.decode_s / max(len(r.tokens) - 1, 1)
            rows.append({"stages": n, "per_token_ms": round(per * 1000, 1), "ttft_ms": round(r.ttft_s * 1000, 1),
                         "tokens": len(r.tokens)})
            tokens_ref = tokens_ref or r.tokens
            assert r.tokens == tokens_ref
            print(json.dumps({"model": args.model, **rows[-1]}), flush=True)
    assert ids is not None
    per, hf_tokens = hf_per_token(args.model, ids, args.tokens)
    print(json.dumps({"model": args.model, "stages": "transformers", "per_token_ms": round(per * 1000, 1),
                      "same_tokens": hf_tokens[:len(tokens_ref or [])] == tokens_ref}), flush=True)


async def modes(args: argparse.Namespace) -> None:
    prompts = read_prompt_file(args.prompt_file, args.limit)
    async with await Cluster.start_local(args.model, args.stages, draft=args.draft) as cluster:
        await cluster.generate("Hi", Request(mode="flowspec", max_new_tokens=4))  # warm-up, loads the drafter
        for mode in args.modes.split(","):
            rows = []
            for prompt in prompts:
                result = GenerationResult()
                async for _ in cluster.stream_tokens(prompt.text, Request(mode, args.tokens), result):
                    pass
                rows.append(result_row(prompt, result, cluster, mode))
            summary = {k: round(statistics.mean(r[k] for r in rows), 3)
                       for k in ("tokens_per_s", "decode_tokens_per_s", "ttft_s", "mean_accepted",
                                 "tokens_per_step", "draft_tokens_per_token", "bytes_per_token")}
            summary["utilization"] = round(statistics.mean(statistics.mean(r["utilization"]) for r in rows), 3)
            print(json.dumps({"model": args.model, "draft": args.draft, "stages": args.stages, "mode": mode,
                              "prompts": len(rows), "tokens": sum(len(r["tokens"]) for r in rows), **summary}),
                  flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["latency", "modes"])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--draft", default="self:layers=20")
    p.add_argument("--stages", default="1,2,3,4")
    p.add_argument("--modes", default="ar,chunk,pipedec,flowspec")
    p.add_argument("--prompt-file", default="data/specbench/mt_bench.jsonl")
    p.add_argument("--limit", type=int, default=10)
    p.add_argument("--tokens", type=int, default=32)
    args = p.parse_args()
    if args.what == "modes":
        args.stages = int(args.stages)
    asyncio.run(latency(args) if args.what == "latency" else modes(args))


if __name__ == "__main__":
    main()
