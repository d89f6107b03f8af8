"""One exception hierarchy. Messages say what went wrong and what to do about it."""

from __future__ import annotations


class FlowSpecError(Exception):
    """Root of every error flowspec raises on purpose."""


class ConfigError(FlowSpecError):
    """Bad configuration: a peers file, a CLI flag, a tree budget, a layer split."""


class ModelError(FlowSpecError):
    """A model is missing, corrupt or unusable."""


class ModelNotInstalled(ModelError):
    """The named model has not been pulled yet."""


class ModelMismatch(ModelError):
    """Two parts that must come from the same model do not (shard vs manifest, draft vs target, peers)."""


class PeerProtocolError(FlowSpecError):
    """The peer misbehaved: malformed frame, unknown kind, wrong shape. Close the link and log the reason."""

    def __init__(self, reason: str, code: str = "protocol") -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


class LocalProtocolError(FlowSpecError):
    """We misused our own protocol or state machine: a bug in flowspec."""


class AuthError(PeerProtocolError):
    """Handshake refused: wrong secret, version or model fingerprint."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason, code="auth")


class StageTimeout(FlowSpecError, TimeoutError):
    """A stage did not answer within its deadline (stalled or unreachable)."""


class StageFailed(FlowSpecError):
    """A stage died or its link broke and no replacement came in time."""


class RequestRejected(FlowSpecError):
    """The cluster cannot serve this request as asked (longer than the model's context, bad arguments).
    Nothing was sent: retrying it unchanged fails the same way. `code` names the rule (OpenAI's where one
    exists: `context_length_exceeded`)."""

    def __init__(self, reason: str, code: str | None = None) -> None:
        super().__init__(reason)
        self.code = code


class RequestCancelled(FlowSpecError):
    """The request was cancelled by its client."""
