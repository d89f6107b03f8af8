"""`flowspec demo` on SmolLM2 (2 stages, a few tokens): the real-CPU part, then the emulated side by side."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flowspec.cli import main

pytestmark = pytest.mark.slow

SMALL = ["demo", "--model", "smollm2-135m", "--draft", "self:layers=20", "--stages", "2", "--prompt",
         "Name three colours.", "--max-new-tokens", "4", "--quant", "none", "--dtype", "float32"]


def test_demo_prints_the_emulated_side_by_side(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo-out"
    rc = main([*SMALL, "--emulated-tokens", "4", "--out", str(out)])
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert rc == 0 and results["identical_outputs"] is True
    assert list(results["modes"]) == ["ar", "pipedec", "flowspec"]
    assert results["config"]["profile"] == "jetson-7b" and results["config"]["link"] == "150mbit,1ms"
    assert [(p["source"], p["id"]) for p in results["prompts"]] == [("demo", "demo")] * 3  # the one prompt
    dilation = results["config"]["dilation"]
    assert f"emulated jetson-7b (time dilation D={dilation:g}" in printed
    for mode, m in results["modes"].items():
        row = next(line for line in printed.splitlines() if line.strip().startswith(f"{mode} |"))
        assert f"{m['emulated_tokens_per_s']:.2f}" in row and f"{m['emulated_decode_tokens_per_s']:.2f}" in row
        assert str(out / f"timeline-{mode}.png") in row and (out / f"timeline-{mode}.png").is_file()
    assert "identical outputs (ar, pipedec, flowspec): True" in printed


def test_demo_without_the_emulated_part(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo-out"
    assert main([*SMALL, "--no-emulated", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "identical outputs (flowspec vs ar" in printed and "emulated jetson-7b" not in printed
    assert not out.exists()
