"""Device cost profiles: the math, the built-in numbers (device-profiles.md §0), user files, link charging."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flowspec.bench.profiles import Profile, builtin_profiles, load_profile, read_profiles
from flowspec.errors import ConfigError
from flowspec.net import Prefill, Segment, Verdict


@pytest.mark.parametrize(("name", "k", "ms"), [
    ("jetson-7b", 1, 60.2), ("jetson-7b", 16, 63.2), ("jetson-7b", 64, 72.8), ("jetson-7b", 128, 104.8),
    ("jetson-agx-7b", 1, 21.0), ("jetson-agx-7b", 16, 21.6), ("jetson-agx-7b", 64, 23.6),
    ("jetson-agx-7b", 128, 28.5),
    ("pi5-8b", 1, 115), ("pi5-8b", 16, 490), ("pi5-8b", 64, 1690), ("pi5-8b", 128, 3290),
])
def test_stage_cost_matches_the_table(name: str, k: int, ms: float) -> None:
    assert load_profile(name).stage_cost(k) * 1e3 == pytest.approx(ms, abs=0.06)


def test_knee_context_draft_and_head_costs() -> None:
    j, pi = load_profile("jetson-7b"), load_profile("pi5-8b")
    assert j.k1 == 96 and j.b2 == pytest.approx(0.0008)
    assert j.stage_cost(96) == pytest.approx(0.060 + 0.0002 * 96)
    assert j.stage_cost(97) == pytest.approx(0.060 + 0.0002 * 96 + 0.0008)
    assert pi.stage_cost(4, ctx=1000) == pytest.approx(0.090 + 0.1 + 3.5e-3)
    assert j.draft_level_cost(10) == pytest.approx(0.015) and j.draft_level_cost(3) == pytest.approx(0.015)
    assert pi.draft_level_cost(10) == pytest.approx(0.165) and pi.draft_level_cost(4) == pytest.approx(0.093)
    assert pi.draft_context_cost(0) == 0.0 and pi.draft_context_cost(2) == pytest.approx(0.069)
    assert j.lm_head_cost(16) == pytest.approx(0.0058) and pi.lm_head_cost(16) == pytest.approx(0.152)
    assert j.head_step_cost(16) == pytest.approx(0.0088)
    assert j.row_bytes == 4096 * 2


def test_builtins_have_sources() -> None:
    found = builtin_profiles()
    assert {"jetson-7b", "jetson-agx-7b", "pi5-8b"} <= set(found)
    for p in found.values():
        assert "device-profiles.md" in p.source


def test_user_file(tmp_path: Path) -> None:
    one = tmp_path / "board.toml"
    one.write_text('[profile.board]\nsource = "measured"\nstage = { a = 0.01, b = 0.001, knees = [[8, 0.01]] }\n'
                   'head = { lm_head_a = 0.002 }\n')
    p = load_profile(one)
    assert p.name == "board" and p.source == "measured" and p.k1 == 8
    assert p.stage_cost(10) == pytest.approx(0.01 + 0.008 + 0.02)
    two = tmp_path / "two.toml"
    two.write_text('[profile.a]\nstage = { a = 1.0 }\n[profile.b]\nstage = { a = 2.0 }\n')
    assert load_profile(f"{two}:b").a == 2.0
    with pytest.raises(ConfigError, match="pick one"):
        load_profile(two)
    with pytest.raises(ConfigError, match="no profile"):
        load_profile(f"{two}:c")


@pytest.mark.parametrize("text", [
    "x = 1", "[profile.a]\nstage = { a = -1.0 }", "[profile.a]\nstage = { alpha = 1.0 }",
    "[profile.a]\nwheels = { a = 1.0 }", "[profile.a]\nstage = { a = 'fast' }", "not toml [",
])
def test_bad_files(text: str) -> None:
    with pytest.raises(ConfigError):
        read_profiles(text)


def test_unknown_name() -> None:
    with pytest.raises(ConfigError, match="jetson-7b"):
        load_profile("jetson-9000")


def test_wire_bytes_count_profiled_hidden_rows() -> None:
    charge = load_profile("jetson-7b").wire_bytes
    ar = torch.arange(5)
    hidden = Segment(1, 1, 0, ar, ar - 1, ar, torch.zeros(5, 576))
    assert charge(hidden, 12345) == 5 * (4096 * 2 + 24) + 64
    prefill = Prefill(1, 0, True, 0, torch.zeros(60, 576))
    assert charge(prefill, 99) == 60 * (4096 * 2 + 24) + 64
    tokens = Segment(1, 1, 0, ar, ar - 1, ar, ar)  # token ids to V1: real size
    assert charge(tokens, 321) == 321
    assert charge(Verdict(1, 1, ar, 3, 4), 77) == 77


def test_profile_validation() -> None:
    with pytest.raises(ConfigError):
        Profile("x", k1=0)
