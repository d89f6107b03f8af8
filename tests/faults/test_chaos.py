"""A short seeded chaos run (flowspec chaos): stages and heads killed, stopped and restarted at random moments of
connect, prefill and decode. No request may be lost or hung, every completed one equals its fault-free run, and
every stage frees every request it opened."""

from __future__ import annotations

import pytest

from flowspec.bench.chaos import ChaosConfig, run_chaos

pytestmark = pytest.mark.slow


async def test_a_short_seeded_chaos_run_loses_nothing() -> None:
    report = await run_chaos(ChaosConfig(faults=10, seed=7, max_new_tokens=12, head_process_share=0.25),
                             progress=False)
    s = report.summary()
    print(f"\n[chaos] {s}")
    assert s["faults"] >= 10
    assert s["hung"] == 0 and s["different"] == 0, s
    assert s["leaked_requests"] == 0, report.leaked
    assert s["identical"] + s["failed"] + s["head_killed"] == s["requests"]
    assert s["identical"] >= 1, "no request survived its faults"
    for outcome in report.outcomes:  # a failure names its cause
        if outcome.result == "failed":
            assert "stage" in outcome.reason, outcome
