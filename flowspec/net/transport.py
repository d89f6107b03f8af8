"""The seam between a link and its socket, in the spirit of httpcore's ``network_backend=``.

A ``Network`` makes one ``Transport`` per link once the handshake has told it who is at both ends. The default
network writes every frame at once. An emulated testbed (``flowspec.bench.testbed``) passes a network whose
transports deliver frames as a slower link would; product code never sees the difference.
"""

from __future__ import annotations

from flowspec.net.messages import Hello, Message

__all__ = ["DIRECT", "Network", "Transport"]


class Transport:
    """When one link's frames reach its peer. This default: at once."""

    def deliver_at(self, msg: Message, frame_len: int, now: float) -> float | None:
        """The event-loop time at which the frame of ``msg`` should reach the peer, or None for "write it now".

        Called once per frame, in send order; a transport delays either every frame of its link or none.
        """
        return None


class Network:
    """Makes the transport of each link; the default writes every frame at once."""

    def transport(self, local: Hello, peer: Hello) -> Transport:
        """The transport for a link from ``local`` (this node) to ``peer`` (the other end's hello)."""
        return _DIRECT_TRANSPORT


_DIRECT_TRANSPORT = Transport()
DIRECT = Network()
