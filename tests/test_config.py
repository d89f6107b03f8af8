"""ClusterConfig: the one frozen object a head's cluster is built from, by the CLI's flags and the API's keywords
alike, with one default for each setting."""

from __future__ import annotations

import argparse
import dataclasses
import math

import pytest

from flowspec.cli import build_parser
from flowspec.cli.options import cluster_config
from flowspec.config import HEARTBEAT_TIMEOUT_S, RECOVERY_TIMEOUT_S, STEP_TIMEOUT_S, ClusterConfig
from flowspec.errors import ConfigError
from flowspec.net import MAX_REQUESTS, Timeouts


def parsed(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["run", "--local", "--prompt", "hi", *argv])


def test_the_flags_and_the_api_build_the_same_config_with_the_same_defaults() -> None:
    assert cluster_config(parsed()) == ClusterConfig(model="smollm2-135m")
    config = ClusterConfig(model="m")
    assert (config.heartbeat_timeout, config.step_timeout, config.recovery_timeout, config.max_requests) == \
        (HEARTBEAT_TIMEOUT_S, STEP_TIMEOUT_S, RECOVERY_TIMEOUT_S, MAX_REQUESTS)
    flags = cluster_config(parsed("--model", "m", "--draft", "random", "--heartbeat-timeout", "2",
                                  "--step-timeout", "7", "--recovery-timeout", "0", "--quant", "int4"))
    assert flags == ClusterConfig.build(ClusterConfig(model="m"), draft="random", heartbeat_timeout=2.0,
                                        step_timeout=7.0, recovery_timeout=0.0, quant="int4")


def test_it_is_frozen_and_refuses_what_no_flag_would_take() -> None:
    config = ClusterConfig(model="m")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.step_timeout = 1.0  # type: ignore[misc]
    for bad in ({"step_timeout": math.nan}, {"heartbeat_timeout": 0.0}, {"recovery_timeout": math.inf},
                {"max_requests": MAX_REQUESTS + 1}, {"max_requests": 0}):
        with pytest.raises(ConfigError):
            ClusterConfig.build(config, **bad)
    with pytest.raises(ConfigError, match="unknown cluster setting.*stepp_timeout"):
        ClusterConfig.build(config, stepp_timeout=3.0)
    with pytest.raises(ConfigError, match="a model is needed"):
        ClusterConfig(model="")


def test_one_heartbeat_rule_for_the_head_and_its_local_stages() -> None:
    config = ClusterConfig(model="m", heartbeat_timeout=2.0)
    assert config.link_timeouts == Timeouts.for_heartbeat(2.0) == Timeouts(heartbeat_interval=0.5,
                                                                           heartbeat_timeout=2.0)
    assert config.stage_args()[-2:] == ["--heartbeat-timeout", "2.0"]
    tuned = ClusterConfig(model="m", timeouts=Timeouts(heartbeat_timeout=9.0))
    assert tuned.link_timeouts.heartbeat_timeout == 9.0 and tuned.stage_args()[-1] == "9.0"
    assert Timeouts.for_heartbeat(60.0).heartbeat_interval == 1.0


def test_a_step_timeout_flag_reaches_the_head() -> None:
    """--step-timeout is a flag (there was none: the tests patched HeadNode to get a short one)."""
    assert cluster_config(parsed("--step-timeout", "2")).step_timeout == 2.0
    args = build_parser().parse_args(["serve", "--local", "--step-timeout", "3"])
    assert cluster_config(args, max_requests=2) == ClusterConfig(model="smollm2-135m", step_timeout=3.0,
                                                                 max_requests=2)
