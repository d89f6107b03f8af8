"""Logging set-up stays reconfigurable: an app (or a test) that configures structlog after flowspec did still
gets every event."""

from __future__ import annotations

import structlog

from flowspec.logging import configure_logging
from flowspec.net.link import log


def test_events_reach_a_later_configuration() -> None:
    configure_logging()
    log.warning("first")  # would pin this logger to the first configuration if loggers were cached
    configure_logging()
    with structlog.testing.capture_logs() as logs:
        log.warning("second")
    assert [e["event"] for e in logs] == ["second"]
