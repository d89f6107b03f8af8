"""`flowspec-node`: run one pipeline stage on this device.

    flowspec-node --peers peers.txt --index 2 --model qwen2.5-coder-1.5b

The peers file lists host:port per line in pipeline order, the head first; this process serves line
`--index` (1 = the first stage after the head). It loads only its own shard (splitting the model once if the
shards are not there yet) and serves until interrupted. Off a trusted LAN, give every node (the head too)
--tls-cert/--tls-key/--tls-ca: its links then run in mutual TLS.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Callable

import structlog

from flowspec.bounds import MAX_PID, MAX_THREADS
from flowspec.cli.options import (
    Number,
    add_precision_args,
    add_tls_args,
    check_can_listen,
    duration,
    listen_error,
    stage_count,
    tls_config,
)
from flowspec.config import HEARTBEAT_TIMEOUT_S, Peer, Peers, read_peers, split_address
from flowspec.errors import ConfigError, FlowSpecError
from flowspec.logging import configure_logging
from flowspec.net import Timeouts, install_uvloop, serve
from flowspec.node.backend import Backend
from flowspec.node.lifeline import tie_to_parent, watch_stdin

__all__ = ["BackendFactory", "main", "node_parser", "run_stage", "serve_stage"]


def node_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flowspec-node", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peers", required=True, help="peers file: host:port per line, head first, '#' comments")
    p.add_argument("--index", type=stage_count, required=True,
                   help="which stage this is: 1..N (line N+1 of the file)")
    p.add_argument("--model", required=True, help="model name (see `flowspec models list`) or an HF folder")
    p.add_argument("--cache-dir", help="model cache (default $FLOWSPEC_CACHE or ~/.cache/flowspec)")
    p.add_argument("--secret-file", help="file holding the shared secret (else $FLOWSPEC_SECRET)")
    p.add_argument("--listen", help="host:port to listen on instead of this stage's line (for a standby "
                                    "listed as standby=host:port on that line)")
    p.add_argument("--insecure", action="store_true",
                   help="allow listening on a non-loopback address without a shared secret or TLS")
    p.add_argument("--threads", type=Number(0, MAX_THREADS, note="0 = torch's choice"), default=0,
                   help="torch threads (default 0: torch's choice)")
    p.add_argument("--heartbeat-timeout", type=duration, default=HEARTBEAT_TIMEOUT_S,
                   help="seconds of silence before a peer is dead (default 5)")
    p.add_argument("--parent-pid", type=Number(1, MAX_PID),
                   help="stop when this process's parent, PID, exits, and when stdin (a pipe from it) reaches "
                        "end-of-file; for launchers (flowspec run --local, Cluster.start_local)")
    add_precision_args(p)
    add_tls_args(p)
    return p


BackendFactory = Callable[[Peers, int], Backend]


async def serve_stage(args: argparse.Namespace, make_backend: BackendFactory | None = None) -> None:
    """Serve stage `args.index` until SIGINT or SIGTERM (or, with `--parent-pid`, its launcher's exit);
    `make_backend(peers, index)` is the node's seam (the emulated testbed injects its own; the default runs on
    this machine as it is)."""
    from flowspec.config import load_secret
    from flowspec.node.build import build_stage, deployment, device_for, precisions_for

    peers = read_peers(args.peers)
    me = peers.stage(args.index)
    if args.listen:
        host, port = split_address(args.listen, 0, "--listen")
        if (host, port) not in [(me.host, me.port), *me.standbys]:
            raise ConfigError(f"--listen {args.listen} is neither stage {args.index}'s address nor one of its "
                              f"standby= addresses in {args.peers}; add it there so the others can find it")
        me = Peer(host, port, me.line, me.options)
    secret = load_secret(args.secret_file)
    tls = tls_config(args)
    if not me.is_loopback and secret is None and tls is None and not args.insecure:
        raise ConfigError(f"refusing to listen on {me.address} without a shared secret: anyone on the LAN "
                          "could drive this stage. Set FLOWSPEC_SECRET (or --secret-file), give every node "
                          "TLS (--tls-cert/--tls-key/--tls-ca), or pass --insecure.")
    change = "use another port on its line of the peers file" if not args.listen else "choose another --listen"
    check_can_listen(me.host, me.port, change)  # now, not after loading the shard
    log = structlog.get_logger("flowspec.node").bind(stage=args.index)
    device = device_for(peers, args.index, args.device)
    precisions = precisions_for(peers, args.dtype, args.quant, args.group_size, args.device)
    dep = deployment(args.model, peers.num_stages, peers.layers, args.cache_dir, precisions, prepare=[args.index])
    timeouts = Timeouts.for_heartbeat(args.heartbeat_timeout)
    backend = make_backend(peers, args.index) if make_backend is not None else Backend()
    node = build_stage(dep, peers, args.index, secret, timeouts, backend=backend, device=device, tls=tls)
    await node.probe()
    try:
        server = await serve(me.host, me.port, hello=node.hello, secret=secret, limits=node.limits,
                             timeouts=timeouts, on_link=node.on_link, network=backend.network, tls=tls)
    except OSError as exc:  # taken while the shard loaded: check_can_listen found it free
        await node.aclose()
        raise ConfigError(listen_error(me.host, me.port, exc, change)) from None
    precision = precisions[args.index]
    log.info("node.ready", address=me.address, layers=dep.counts[args.index - 1], model=args.model,
             device=str(device), precision=precision.tag, tls=tls is not None)
    print(f"flowspec-node stage {args.index} ready on {me.address} ({device}, {precision.tag}"
          f"{', TLS' if tls else ''})", flush=True)
    stop = _Stop(args.parent_pid)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.on_signal, sig)
    if args.parent_pid is not None and not watch_stdin(stop.on_parent_exit):
        log.info("node.no_lifeline", reason="this event loop cannot watch stdin; only signals stop this stage")
    try:
        await stop.wait()
    finally:
        (log.warning if stop.parent_gone else log.info)("node.stopping", reason=stop.reason or "cancelled")
        server.close()
        await node.aclose()


class _Stop:
    """Why this stage stops: the first of a signal and (with --parent-pid) its launcher's exit."""

    def __init__(self, parent_pid: int | None) -> None:
        self.parent_pid = parent_pid
        self.reason = ""
        self.parent_gone = False
        self._event = asyncio.Event()

    def on_signal(self, sig: int) -> None:
        if self.parent_pid is not None and os.getppid() != self.parent_pid:  # Linux's parent-death signal
            self.on_parent_exit(signal.Signals(sig).name)
        else:
            self._set(signal.Signals(sig).name)

    def on_parent_exit(self, how: str = "its pipe closed") -> None:
        self._set(f"launcher (pid {self.parent_pid}) exited: {how}", parent_gone=True)

    def _set(self, reason: str, parent_gone: bool = False) -> None:
        if not self._event.is_set():
            self.reason, self.parent_gone = reason, parent_gone
            self._event.set()

    async def wait(self) -> None:
        await self._event.wait()


def run_stage(args: argparse.Namespace, make_backend: BackendFactory | None = None) -> int:
    """The process around `serve_stage`: its launcher's lifeline, logging, torch threads, uvloop, exit codes."""
    configure_logging()
    if args.parent_pid is not None and not tie_to_parent(args.parent_pid):
        structlog.get_logger("flowspec.node").bind(stage=args.index).warning(
            "node.stopping", reason=f"launcher (pid {args.parent_pid}) exited before this stage started")
        return 1
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    install_uvloop()
    try:
        asyncio.run(serve_stage(args, make_backend))
    except FlowSpecError as exc:
        print(f"flowspec-node: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_stage(node_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
