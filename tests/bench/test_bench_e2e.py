"""`flowspec bench` end to end on SmolLM2: 2 stages, 2 prompts, every mode, a profile and a shaped link."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flowspec.cli import main

pytestmark = pytest.mark.slow


def _prompts(tmp: Path) -> Path:
    folder = tmp / "prompts"
    folder.mkdir()
    (folder / "a.jsonl").write_text(json.dumps({"question_id": 1, "turns": ["Name three colours."]}) + "\n")
    (folder / "b.jsonl").write_text(json.dumps({"question_id": 2, "turns": ["What is 2 + 3?"]}) + "\n")
    return folder


def test_bench_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "out"
    rc = main(["bench", "--modes", "ar,chunk,pipedec,flowspec", "--stages", "2", "--model", "smollm2-135m",
               "--draft", "self:layers=20", "--prompts", str(_prompts(tmp_path)), "--max-new-tokens", "6",
               "--profile", "jetson-7b", "--link", "150mbit,1ms", "--dilation", "1.5", "--out", str(out),
               "--no-progress"])
    results = json.loads((out / "results.json").read_text())
    assert rc == 0 and results["identical_outputs"] is True
    assert set(results["modes"]) == {"ar", "chunk", "pipedec", "flowspec"}
    for mode, m in results["modes"].items():
        assert m["tokens"] > 0 and m["tokens_per_s"] > 0
        assert m["emulated_tokens_per_s"] == pytest.approx(m["tokens_per_s"] * 1.5, rel=1e-2)
        assert m["emulated_decode_tokens_per_s"] == pytest.approx(m["decode_tokens_per_s"] * 1.5, rel=1e-2)
        assert len(m["utilization"]) == 2 and all(0 <= u <= 1 for u in m["utilization"])
        assert m["charged_bytes_per_token"] > m["bytes_per_token"] > 0  # 4096 x fp16 rows vs SmolLM2's 576 x fp32
        assert set(m["overruns_by_node"]) == set(m["overruns_by_node_kind"]) == {"head", "V1", "V2"}
        assert {n: sum(k.values()) for n, k in m["overruns_by_node_kind"].items()} == m["overruns_by_node"]
        assert (out / f"timeline-{mode}.png").stat().st_size > 5000
    assert len(results["prompts"]) == 8
    assert results["config"]["dilation"] == 1.5 and results["config"]["profile"] == "jetson-7b"
    assert "identical outputs" in (out / "results.md").read_text()


def test_bench_compares_speculative_modes_without_ar(tmp_path: Path) -> None:
    """The fast path to compare pipedec and flowspec: no ar, D calibrated, budgets from the profile's curves."""
    out = tmp_path / "out"
    folder = tmp_path / "prompts"
    folder.mkdir()
    (folder / "a.jsonl").write_text(json.dumps({"question_id": 1, "turns": ["Name three colours."]}) + "\n")
    rc = main(["bench", "--modes", "pipedec,flowspec", "--stages", "2", "--model", "smollm2-135m", "--draft",
               "self:layers=20", "--prompts", str(folder), "--max-new-tokens", "4", "--profile", "jetson-7b",
               "--out", str(out), "--no-progress"])
    results = json.loads((out / "results.json").read_text())
    assert rc == 0 and results["identical_outputs"] is True
    assert list(results["modes"]) == ["pipedec", "flowspec"]
    config = results["config"]
    spread = config["calibration"]["spread_ms"]
    assert all(s["min"] <= s["median"] <= s["max"] for s in spread.values())
    # jetson-7b's stage step barely grows with rows: the chosen flowspec segment is 16 wide, and calibrated so
    assert config["budget"]["flowspec"]["segment"] == 16 and "stage_forward_16" in spread
    assert config["budget"]["pipedec"]["width"] == 4 and "draft_level_4" in spread
    for mode, m in results["modes"].items():
        idle = m["v1_idle_after_verdict_ms"]
        assert idle["verdicts"] > 0 and 0 <= idle["p50"] and 0 <= idle["mean"]
        assert m["emulated_decode_tokens_per_s"] > 0
    for row in results["prompts"]:
        # the first root's verdict, then one per verification but the last (it finishes the request)
        assert row["verdicts"] == row["verifications"]
    table = (out / "results.md").read_text()
    assert "decode tok/s emulated" in table and "head " in table and "V1 idle after verdict" in table


def test_calibration_picks_a_dilation_that_covers_the_drafter() -> None:
    from flowspec.bench.calibrate import calibrate
    from flowspec.bench.profiles import load_profile
    from flowspec.node.build import deployment
    from flowspec.store import make_drafter

    dep = deployment("smollm2-135m", 2)
    cal = calibrate(load_profile("jetson-7b"), dep, make_drafter("self:layers=20", "smollm2-135m"),
                    segment_rows=4, beam=3, draft_rows=3, context=32, margin=1.3)
    worst = max(cal.ratios.values())
    assert cal.dilation >= worst * 1.3 and cal.dilation >= 1.0
    assert {"stage_forward_1", "stage_forward_4", "lm_head_4", "draft_level_3"} <= set(cal.ratios)
    spread = cal.to_json()["spread_ms"]
    assert set(spread) == set(cal.ratios)
    assert all(s["min"] <= s["median"] <= s["max"] for s in spread.values())
