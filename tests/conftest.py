"""Suite-wide fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import structlog


@pytest.fixture(autouse=True)
def _structlog_defaults() -> Iterator[None]:
    """A test that runs a command in-process configures structlog for the command line (level filter, stderr);
    undo it so later tests' `capture_logs` sees every event."""
    yield
    structlog.reset_defaults()
