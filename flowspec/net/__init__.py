"""Networking: tensor codec, capped framing, typed messages, sans-IO handshake, the async link shell, and TLS.

Knows nothing about trees or models; see docs/ARCHITECTURE.md ("Wire protocol") for the contract.
"""

from flowspec.net.codec import DTYPE_CODES, decode_tensor, encode_tensor, packb, unpackb
from flowspec.net.framing import FrameDecoder, encode_frame
from flowspec.net.handshake import Handshake, HandshakeState, proof
from flowspec.net.limits import HANDSHAKE_LIMITS, MAX_REQUESTS, Limits
from flowspec.net.link import Link, PendingHandshakes, Timeouts, connect, format_address, install_uvloop, serve
from flowspec.net.messages import (
    Auth,
    Close,
    Error,
    Hello,
    Message,
    Open,
    Ping,
    Pong,
    Prefill,
    Ready,
    Refuse,
    Segment,
    Stats,
    Verdict,
    parse_message,
)
from flowspec.net.retry import Backoff, connect_retrying
from flowspec.net.tls import TlsConfig
from flowspec.net.transport import DIRECT, Network, Transport

PROTOCOL_VERSION = 3  # 2: stats carry the stage's memory (weights, KV, RSS); 3: proofs bind the transcript

__all__ = [
    "DIRECT", "DTYPE_CODES", "HANDSHAKE_LIMITS", "MAX_REQUESTS", "PROTOCOL_VERSION",
    "Auth", "Backoff", "Close", "Error", "FrameDecoder", "Handshake", "HandshakeState", "Hello", "Limits",
    "Link", "Message", "Network", "Open", "PendingHandshakes", "Ping", "Pong", "Prefill", "Ready", "Refuse",
    "Segment", "Stats", "Timeouts", "TlsConfig", "Transport", "Verdict",
    "proof", "connect", "connect_retrying", "decode_tensor", "encode_frame", "encode_tensor",
    "format_address", "install_uvloop",
    "packb", "parse_message", "serve", "unpackb",
]
