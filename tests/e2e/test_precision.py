"""Lower precision over real stage processes: SmolLM2 split into bfloat16 and int8 shards, every mode equals `ar`
at the same precision on the Spec-Bench prompts, hidden states travel in the compute dtype (half the bytes of
fp32), stages report their memory, and a stage started in another format is refused by the handshake."""

from __future__ import annotations

from dataclasses import fields

import pytest

from flowspec.api import Cluster, Request
from flowspec.errors import FlowSpecError
from flowspec.node.local import LocalCluster
from flowspec.sched import Budget, Mode
from tests.e2e.conftest import SMOL, specbench_prompts, start_sync

pytestmark = pytest.mark.slow
NEW = 16
PROMPTS = specbench_prompts(("mt_bench", "humaneval"))
# One fixed budget: the runtime picks budgets from timings that vary run to run, and in bfloat16 a different
# row count per forward can flip a near-tie (the lossless contract below fp32 is "equal to ar except at measured
# near-ties"); this test checks the formats' plumbing on prompts without a near-tie at these row counts.
FIXED = {f.name: getattr(Budget(Mode.FLOWSPEC, 2), f.name) for f in fields(Budget)
         if f.name not in ("mode", "num_stages")} | {"lookup": 0}


@pytest.mark.parametrize(("dtype", "quant"), [("bfloat16", "none"), ("auto", "int8")])
async def test_speculative_modes_equal_ar_at_the_same_precision(dtype: str, quant: str) -> None:
    async with await Cluster.start_local(SMOL, 2, draft="self:layers=20", dtype=dtype, quant=quant,
                                         device="cpu") as cluster:
        assert cluster.dep.precisions[1].dtype == "bfloat16"
        for text in PROMPTS:
            ids = cluster.encode(text)
            ar = await cluster.generate(ids, Request("ar", NEW))
            assert ar.stage_memory.keys() == {1, 2} and all(m["weights"] > 0 and m["kv"] > 0 and m["rss"] > 0
                                                             for m in ar.stage_memory.values())
            for mode in ("flowspec", "pipedec"):
                spec = await cluster.generate(ids, Request(mode, NEW, budget=FIXED))
                assert spec.tokens == ar.tokens, f"{mode} at {dtype}/{quant} differs from ar on {text[:40]!r}"


async def test_hidden_states_travel_in_the_compute_dtype() -> None:
    received = {}
    for dtype in ("float32", "bfloat16"):
        async with await Cluster.start_local(SMOL, 2, dtype=dtype, device="cpu") as cluster:
            last = cluster.head.links.links[-1]  # the last stage sends its hidden rows to the head on this link
            before = last.bytes_received
            await cluster.generate(PROMPTS[0], Request("ar", NEW))
            received[dtype] = last.bytes_received - before
    assert received["bfloat16"] < 0.6 * received["float32"], received  # 2 bytes a value instead of 4


async def test_a_stage_in_another_format_is_refused() -> None:
    local = LocalCluster(SMOL, 1, extra_args=["--dtype", "bfloat16", "--heartbeat-timeout", "2"])
    try:
        start_sync(local)
        with pytest.raises(FlowSpecError, match="fingerprint"):
            await Cluster.connect(local.peers, model=SMOL, dtype="float32", recovery_timeout=0)
    finally:
        local.stop()
