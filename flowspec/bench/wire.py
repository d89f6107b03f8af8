"""Micro-benchmarks for the wire layer: ``python -m flowspec.bench.wire [--uvloop]``.

* codec: encode + frame-decode + validate a 16 x 1536 fp16 segment and a small verdict;
* loopback: ping-pong round trips of a control message over a real ``Link`` on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import time
from collections.abc import Callable

import torch

from flowspec.net.framing import FrameDecoder, encode_frame
from flowspec.net.limits import Limits
from flowspec.net.link import Link, Timeouts, connect, install_uvloop, serve
from flowspec.net.messages import Hello, Message, Segment, Verdict, parse_message

LIMITS = Limits.for_model(hidden_size=1536, vocab_size=151936, max_positions=32768, max_rows=64)
STAGE = Hello(version=1, role="stage", index=1, fingerprint="bench", nonce=bytes(16))
HEAD = Hello(version=1, role="head", index=0, fingerprint="bench", nonce=bytes(16))


def _codec_once(msg: Message, decoder: FrameDecoder) -> int:
    frame = encode_frame(msg.to_wire())
    decoder.feed(frame)
    raw = decoder.next_message()
    assert raw is not None
    parse_message(raw, LIMITS)
    return len(frame)


def bench_codec(name: str, msg: Message, seconds: float) -> str:
    decoder = FrameDecoder(LIMITS)
    size = _codec_once(msg, decoder)
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        for _ in range(100):
            _codec_once(msg, decoder)
        n += 100
    per = elapsed / n
    return (f"codec {name:<22} {size:>8} B/frame  {per * 1e6:8.1f} us/msg  {n / elapsed:10.0f} msg/s  "
            f"{size * n / elapsed / 1e6:8.1f} MB/s")


async def bench_loopback(count: int) -> str:
    async def echo(link: Link) -> None:
        while True:
            await link.send(await link.recv())

    server = await serve("127.0.0.1", 0, hello=STAGE, secret=b"bench-secret-123", limits=LIMITS,
                         timeouts=Timeouts(), on_link=echo)
    port = server.sockets[0].getsockname()[1]
    link = await connect("127.0.0.1", port, hello=HEAD, expect_index=1, secret=b"bench-secret-123",
                         limits=LIMITS, timeouts=Timeouts())
    msg = Verdict(req=1, seq=1, commit=torch.arange(4), root=3, watermark=10)
    rtts = []
    for _ in range(count):
        t0 = time.perf_counter()
        await link.send(msg)
        await link.recv(timeout_s=5)
        rtts.append(time.perf_counter() - t0)
    await link.close()
    server.close()
    await server.wait_closed()
    rtts.sort()
    return (f"loopback verdict round trip over Link: median {statistics.median(rtts) * 1e6:.0f} us, "
            f"p99 {rtts[int(0.99 * len(rtts))] * 1e6:.0f} us ({count} round trips)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="time per codec case")
    parser.add_argument("--round-trips", type=int, default=2000)
    parser.add_argument("--uvloop", action="store_true", help="run the loopback case on uvloop")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"# {platform.processor() or platform.machine()}, Python {platform.python_version()}, "
          f"torch {torch.__version__}")
    rows = torch.arange(16, dtype=torch.int64)
    segment = Segment(req=1, step=1, after=0, ids=rows, parents=rows - 1, pos=rows + 100,
                      x=torch.randn(16, 1536).to(torch.float16))
    verdict = Verdict(req=1, seq=3, commit=torch.arange(4), root=3, watermark=20)
    cases: list[tuple[str, Message]] = [("segment 16x1536 fp16", segment), ("verdict (control)", verdict)]
    for name, msg in cases:
        print(bench_codec(name, msg, args.seconds))
    loop_name = "uvloop" if args.uvloop and install_uvloop() else "asyncio"
    runner: Callable[[], str] = lambda: asyncio.run(bench_loopback(args.round_trips))  # noqa: E731
    print(f"[{loop_name}] {runner()}")


if __name__ == "__main__":
    main()
