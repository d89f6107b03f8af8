"""Link shaping: parsing, the NIC clock model, and delays through a Link's transport seam on a live link (lower
bounds, loose upper bounds)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from flowspec.bench.shaping import PRESETS, LinkShape, Shaper
from flowspec.errors import ConfigError
from flowspec.net import Hello, Limits, Link, Message, Network, Segment, Timeouts, Transport, connect, serve

LIMITS = Limits.for_model(hidden_size=1024, vocab_size=1000, max_positions=4096, max_rows=32)
TIMEOUTS = Timeouts(heartbeat_interval=10.0, heartbeat_timeout=30.0)  # no pings during the timing window
STAGE = Hello(version=1, role="stage", index=1, fingerprint="fp", nonce=bytes(16))
HEAD = Hello(version=1, role="head", index=0, fingerprint="fp", nonce=bytes(16))


@pytest.mark.parametrize(("text", "latency", "bandwidth"), [
    ("150mbit,1ms", 1e-3, 150e6), ("1gbit,0.2ms", 0.2e-3, 1e9), ("1ms,500kbit", 1e-3, 500e3),
    ("10mbit", 0.0, 10e6), ("paper-150", 0.1e-3, 150e6), ("gbe", 0.1e-3, 940e6), ("PAPER-1000", 0.1e-3, 1e9),
    ("wifi", 2e-3, 200e6), ("100mbit, 250us", 250e-6, 100e6),
])
def test_parse(text: str, latency: float, bandwidth: float) -> None:
    shape = LinkShape.parse(text)
    assert shape.latency_s == pytest.approx(latency) and shape.bandwidth_bps == pytest.approx(bandwidth)


@pytest.mark.parametrize("text", ["", "fast", "150mbps", "1ms", "-5mbit", "150mbit,1parsec"])
def test_parse_rejects(text: str) -> None:
    with pytest.raises(ConfigError):
        LinkShape.parse(text)


def test_scaled() -> None:
    shape = PRESETS["paper-150"].scaled(4.0)
    assert shape.latency_s == pytest.approx(0.4e-3) and shape.bandwidth_bps == pytest.approx(37.5e6)
    with pytest.raises(ConfigError):
        shape.scaled(0)


def test_shaper_queues_frames_and_pipelines_latency() -> None:
    shaper = Shaper(LinkShape(latency_s=0.010, bandwidth_bps=8e6))  # 1 byte/us
    assert shaper.deliver_at(0.0, 1000) == pytest.approx(0.001 + 0.010)
    assert shaper.deliver_at(0.0, 1000) == pytest.approx(0.002 + 0.010)  # queued behind the first
    assert shaper.deliver_at(1.0, 1000) == pytest.approx(1.001 + 0.010)  # idle NIC: no queueing


class _Shaped(Network):
    """Every link shaped to `shape`, each frame charged `charge` × its real size."""

    def __init__(self, shape: LinkShape, charge: int) -> None:
        self.shape, self.charge, self.charged = shape, charge, 0

    def transport(self, local: Hello, peer: Hello) -> Transport:
        network, shaper = self, Shaper(self.shape)

        class Shaped(Transport):
            def deliver_at(self, msg: Message, frame_len: int, now: float) -> float | None:
                network.charged += frame_len * network.charge
                return shaper.deliver_at(now, frame_len * network.charge)

        return Shaped()


async def arrivals(shape: LinkShape, msgs: list[Message], charge: int = 1) -> tuple[list[float], Link, int]:
    """Send ``msgs`` back-to-back on a shaped link; return arrival times relative to the first send, the link
    and the bytes charged."""
    loop = asyncio.get_running_loop()
    got: asyncio.Queue[float] = asyncio.Queue()

    async def sink(link: Link) -> None:
        while True:
            await link.recv()
            got.put_nowait(loop.time())

    server = await serve("127.0.0.1", 0, hello=STAGE, secret=None, limits=LIMITS, timeouts=TIMEOUTS, on_link=sink)
    port = server.sockets[0].getsockname()[1]
    link = await connect("127.0.0.1", port, hello=HEAD, expect_index=1, secret=None, limits=LIMITS,
                         timeouts=TIMEOUTS, network=(network := _Shaped(shape, charge)))
    t0 = loop.time()
    for msg in msgs:
        await link.send(msg)
    times = [await asyncio.wait_for(got.get(), 10) - t0 for _ in msgs]
    await link.close()
    server.close()
    await server.wait_closed()
    return times, link, network.charged


def seg(rows: int) -> Segment:
    ar = torch.arange(rows, dtype=torch.int64)
    return Segment(req=1, step=0, after=0, ids=ar, parents=ar - 1, pos=ar, x=torch.zeros(rows, 1024))


async def test_single_frame_delay_is_latency_plus_serialization() -> None:
    shape = LinkShape(latency_s=0.030, bandwidth_bps=20e6)
    msg = seg(8)  # ~33 KB: 13 ms at 20 Mbit/s
    [t], link, _ = await arrivals(shape, [msg])
    expected = shape.latency_s + shape.serialization_s(link.bytes_sent)
    assert t >= expected - 0.002
    assert t < expected + 0.25


async def test_frames_queue_behind_each_other_but_latency_is_pipelined() -> None:
    shape = LinkShape(latency_s=0.100, bandwidth_bps=40e6)
    msgs = [seg(8) for _ in range(5)]  # ~6.6 ms of serialization each
    times, link, _ = await arrivals(shape, msgs)
    per = shape.serialization_s(link.bytes_sent // 5)
    for i, t in enumerate(times):
        assert t >= shape.latency_s + (i + 1) * per - 0.002
    assert times[-1] < 2 * shape.latency_s  # five frames did not pay five latencies


async def test_charged_bytes_drive_the_delay() -> None:
    shape = LinkShape(latency_s=0.0, bandwidth_bps=20e6)
    [t], link, charged = await arrivals(shape, [seg(8)], charge=4)
    assert charged == 4 * link.bytes_sent
    assert t >= shape.serialization_s(charged) - 0.002
