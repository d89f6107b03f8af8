"""The library meets the rule the flags do (flowspec.bounds): a nan, inf or negative duration, or a layer list
that does not fit the stages, passed by an embedding app is a ConfigError at once, before anything starts."""

from __future__ import annotations

import math

import pytest

from flowspec.api import Cluster
from flowspec.bounds import MAX_SECONDS, problem, seconds
from flowspec.errors import ConfigError
from flowspec.net import Timeouts

BAD_SECONDS = [math.nan, math.inf, -math.inf, -1.0, 0.0, MAX_SECONDS * 2, 1e30]
NO_MODEL = "no-such-model"  # a check made after the model is resolved would answer with this instead


def test_problem_names_what_is_wrong() -> None:
    assert problem(5, 1, 10, whole=True) is None
    assert problem(0, 1, 10, whole=True) == "must be in 1..10, got 0"
    assert problem(10**30, 1, 10, whole=True) == f"must be in 1..10, got {10**30}"
    assert problem(2.5, 1, 10, whole=True) == "must be a whole number, got 2.5"
    assert problem(True, 0, 10) == "must be a number, got True"
    assert problem(math.nan, 0, 10, unit="seconds") == "must be a finite number of seconds, got nan"
    assert problem(0.0, 0, 10, above=True) == "must be in (0, 10], got 0"
    assert problem(1.0, 0, 1, below=True) == "must be in [0, 1), got 1"
    assert seconds(0, "wait", zero=True) == 0


@pytest.mark.parametrize("value", BAD_SECONDS)
@pytest.mark.parametrize("name", ["connect", "handshake", "frame", "heartbeat_interval", "heartbeat_timeout",
                                  "hello"])
def test_timeouts_check_themselves(name: str, value: float) -> None:
    with pytest.raises(ConfigError, match=f"Timeouts.{name} must be"):
        Timeouts(**{name: value})


@pytest.mark.parametrize(("kwargs", "expected"), [
    ({"recovery_timeout": math.nan}, "recovery_timeout must be a finite number of seconds, got nan"),
    ({"recovery_timeout": math.inf}, "recovery_timeout must be a finite number of seconds, got inf"),
    ({"recovery_timeout": -1.0}, r"recovery_timeout must be in \[0, 86400\] seconds, got -1"),
    ({"step_timeout": 0.0}, r"step_timeout must be in \(0, 86400\] seconds, got 0"),
])
async def test_connect_and_start_local_refuse_bad_durations(kwargs: dict[str, float], expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        await Cluster.connect("no-such-peers.txt", model=NO_MODEL, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=expected):
        await Cluster.start_local(NO_MODEL, 2, **kwargs)  # type: ignore[arg-type]


async def test_start_local_refuses_a_layer_list_that_does_not_fit_the_stages() -> None:
    with pytest.raises(ConfigError, match="--stages 4 but --layers has 2 numbers; give one per stage"):
        await Cluster.start_local(NO_MODEL, 4, layers=[15, 15])
