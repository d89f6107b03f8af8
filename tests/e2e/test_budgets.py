"""Budgets from measured costs, end to end: stages announce what a forward costs them, the head measures its
lm_head and drafter, the request runs with the budget chosen from those lines, and the output is unchanged."""

from __future__ import annotations

from flowspec.api import Request
from flowspec.sched import Mode, choose_budget
from tests.e2e.conftest import specbench_prompts


async def test_the_runtime_picks_budgets_from_what_its_devices_cost(head_for) -> None:  # type: ignore[no-untyped-def]
    async with head_for(2, draft="self:layers=20") as cluster:
        await cluster.head.probe()  # the drafter was handed over after connect: measure it now
        for link in cluster.head.links.links:  # each stage timed 1 and 16 rows at start-up
            assert [rows for rows, _ in link.peer.costs] == [1, 16]
            assert all(seconds > 0 for _, seconds in link.peer.costs)
        costs = cluster.head.cost_model()
        assert costs is not None and costs.draft is not None and costs.lm_head(1) > 0
        chosen = cluster.budget(Request(mode="flowspec"))
        assert chosen == choose_budget(Mode.FLOWSPEC, 2, costs)
        assert chosen.draft_ahead and chosen.expand_from_leaf  # what the cost rules turn on
        assert cluster.budget(Request(mode="flowspec", budget={"segment": 2, "lookup": 0})).segment == 2

        prompt = specbench_prompts(("qa",))[0]
        auto = await cluster.generate(prompt, Request(mode="flowspec", max_new_tokens=24))
        ar = await cluster.generate(prompt, Request(mode="ar", max_new_tokens=24))
        assert auto.tokens == ar.tokens and auto.stats.lookup_proposed >= 0
        assert auto.stats.verifications < len(auto.tokens)  # some verification accepted more than one token
