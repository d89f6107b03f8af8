"""A stage of the emulated testbed: `flowspec-node` with its compute paced and its ring hop shaped.

    python -m flowspec.bench.node --peers peers.txt --index 2 --model smollm2-135m \\
        --profile jetson-7b --link 150mbit,1ms --dilation 4 --stats-file out/stage-{index}.stats.jsonl

Takes every `flowspec-node` option plus the emulation ones below, and runs the product's stage with an
`EmulatedBackend` injected (flowspec.bench.testbed). `flowspec bench` starts its stages this way.
"""

from __future__ import annotations

import argparse

from flowspec.bench.profiles import load_profile
from flowspec.bench.shaping import LinkShape
from flowspec.bench.testbed import EmulatedBackend
from flowspec.cli.node import node_parser, run_stage
from flowspec.cli.options import factor
from flowspec.config import Peers
from flowspec.node.backend import Backend

__all__ = ["emulation_args", "main"]


def emulation_args(profile: str, link: str | None, dilation: float) -> list[str]:
    """The command-line options that give a stage process this emulation (for LocalCluster): the device profile
    and link as named on the bench's command line, and the time dilation D."""
    out = ["--dilation", repr(float(dilation)), "--profile", profile]
    if link:
        out += ["--link", link]
    return out


def parser() -> argparse.ArgumentParser:
    p = node_parser()
    p.prog = "python -m flowspec.bench.node"
    p.description = __doc__
    g = p.add_argument_group("emulation")
    g.add_argument("--profile", required=True, help="device cost profile: jetson-7b, pi5-8b, ... or a TOML file")
    g.add_argument("--link", help="shape the outgoing ring hop, e.g. 150mbit,1ms or gbe")
    g.add_argument("--dilation", type=factor, default=1.0, help="time dilation D for --profile and --link")
    g.add_argument("--stats-file", help="append one JSON line per closed request (overruns, ring bytes); "
                   "'{index}' in the path becomes the stage index")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def make_backend(peers: Peers, index: int) -> Backend:  # called inside run_stage: errors print cleanly
        profile = load_profile(args.profile)
        link = LinkShape.parse(args.link) if args.link else None
        stats = args.stats_file.format(index=index) if args.stats_file else None
        return EmulatedBackend(profile, args.dilation, num_stages=peers.num_stages, link=link, name=f"V{index}",
                               stats_file=stats)

    return run_stage(args, make_backend)


if __name__ == "__main__":
    raise SystemExit(main())
