"""Start-up probes (flowspec/node/probe.py) read a device's cost curves through the node's backend: under the
emulated testbed they recover the profile's, so budgets chosen at run time equal those the profile calls for."""

from __future__ import annotations

import asyncio

import pytest

from flowspec.bench.profiles import builtin_profiles
from flowspec.bench.testbed import work_cost
from flowspec.model.drafter import Drafter, random_drafter_model
from flowspec.node.backend import Backend, Work
from flowspec.node.probe import line_from, probe_drafter, probe_lm_head, probe_stage
from flowspec.sched import CostModel, Mode, choose_budget


class ChargedBackend(Backend):
    """Work takes exactly its profile cost (no sleeping: the test needs the numbers, not the waiting)."""

    def __init__(self, profile_name: str) -> None:
        super().__init__()
        self.profile = builtin_profiles()[profile_name]

    def charge(self, work: Work, start: float, end: float) -> float:
        return start + work_cost(self.profile, work)


@pytest.mark.parametrize("profile_name", ["jetson-7b", "pi5-8b"])
def test_probes_recover_the_profile_and_its_budget(profile_name: str) -> None:
    model, head = random_drafter_model(vocab_size=97, seed=0)
    backend = ChargedBackend(profile_name)
    profile = backend.profile

    async def probe() -> CostModel:
        try:
            stage_points = await probe_stage(model, backend)
            assert [n for n, _ in stage_points] == [1, 16]
            for n, seconds in stage_points:
                assert seconds == pytest.approx(profile.stage_cost(n, 32), rel=1e-6)
            return CostModel(line_from(stage_points), await probe_lm_head(head, 64, backend),
                             await probe_drafter(Drafter(model, head), backend))
        finally:
            await backend.aclose()

    costs = asyncio.run(probe())
    assert costs.lm_head(4) == pytest.approx(profile.head_step_cost(4), rel=1e-6)
    assert costs.draft is not None and costs.draft(3) == pytest.approx(profile.draft_level_cost(3), rel=1e-6)
    assert choose_budget(Mode.FLOWSPEC, 4, costs) == choose_budget(Mode.FLOWSPEC, 4, profile.cost_model())
