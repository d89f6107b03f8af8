"""flowspec: one LLM split across small devices, kept busy by continuous pipelined tree speculation."""

from flowspec.errors import (
    ConfigError,
    FlowSpecError,
    LocalProtocolError,
    ModelMismatch,
    PeerProtocolError,
    StageFailed,
    StageTimeout,
)

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "FlowSpecError",
    "LocalProtocolError",
    "ModelMismatch",
    "PeerProtocolError",
    "StageFailed",
    "StageTimeout",
    "__version__",
]
