"""Measure model/ costs on this machine: pull/convert (from the receipt), shard load, stage forward vs tokens.

    python -m flowspec.bench.model_costs [--model smollm2-135m] [--stages 4] [--cache 256] [--reps 7]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from flowspec.model.stage import StageModel
from flowspec.store.load import load_full, load_head, load_stage
from flowspec.store.registry import RECEIPT, resolve
from flowspec.store.shard import ensure_shards
from flowspec.treemask import tree_visible

TOKENS = (1, 8, 16, 32, 64)


def _timed(fn) -> float:  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def forward_costs(stage: StageModel, cache_len: int, reps: int) -> dict[int, list[float]]:
    """[min, median] ms of one forward of n new tree rows (a chain: worst-case mask) on a cache_len-slot cache."""
    cfg = stage.cfg
    cache = stage.new_cache(cache_len + max(TOKENS))
    gen = torch.Generator().manual_seed(0)

    def inputs(n: int) -> torch.Tensor:
        if stage.embed is not None:
            return torch.randint(0, cfg.vocab_size, (n,), generator=gen)
        return torch.randn(n, cfg.hidden_size, generator=gen)

    stage(inputs(cache_len), torch.arange(cache_len), cache)
    out: dict[int, list[float]] = {}
    for n in TOKENS:
        x, pos = inputs(n), torch.arange(cache_len, cache_len + n)
        mask = tree_visible(cache_len, list(range(-1, n - 1)))
        samples = []
        for _ in range(reps + 1):  # first run warms up
            samples.append(_timed(lambda: stage(x, pos, cache, mask)))
            cache.truncate(cache_len)
        # min is the uncontended cost; median shows what sharing the CPU does to it
        out[n] = [round(min(samples[1:]) * 1e3, 1), round(statistics.median(samples[1:]) * 1e3, 1)]
    return out


def run(model: str, stages: int, cache_len: int, reps: int) -> dict[str, object]:
    folder = resolve(model)
    receipt = json.loads((folder / RECEIPT).read_text()) if (folder / RECEIPT).is_file() else {}
    t_split = _timed(lambda: ensure_shards(model, None, num_stages=stages))
    shards = ensure_shards(model, None, num_stages=stages)
    load = {f"stage-{k}": round(_timed(lambda k=k: load_stage(shards / f"stage-{k}")), 3) for k in range(1, stages + 1)}
    load["stage-0"] = round(_timed(lambda: load_head(shards / "stage-0")), 3)
    load["stage-1 (verify=False)"] = round(_timed(lambda: load_stage(shards / "stage-1", verify=False)), 3)
    load["full model (load_full)"] = round(_timed(lambda: load_full(model)), 3)
    fwd = {}
    for k in range(1, stages + 1):
        stage = load_stage(shards / f"stage-{k}")
        fwd[f"stage-{k} [{stage.start},{stage.end})"] = forward_costs(stage, cache_len, reps)
    return {"model": model, "threads": torch.get_num_threads(), "receipt": receipt, "split_or_reuse_s": round(t_split, 2),
            "load_s": load, "forward_ms_min_median": fwd, "cache_len": cache_len,
            "loadavg_1m_at_end": round(os.getloadavg()[0], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--stages", type=int, default=4)
    ap.add_argument("--cache", type=int, default=256, help="tokens already in the KV cache")
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    print(json.dumps(run(args.model, args.stages, args.cache, args.reps), indent=1))


if __name__ == "__main__":
    main()
