"""`flowspec serve`: an OpenAI-compatible HTTP server on the head, with metrics and a chat page."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import signal
import socket
from typing import Any

import structlog

from flowspec.bounds import MAX_SECONDS
from flowspec.cli.options import (
    Number,
    add_budget_args,
    add_pipeline_args,
    add_precision_args,
    add_tls_args,
    budget_overrides,
    check_can_listen,
    check_pipeline_args,
    cluster_config,
    listen_error,
    open_cluster,
    port,
    positive_int,
)
from flowspec.errors import ConfigError
from flowspec.logging import configure_logging
from flowspec.net import install_uvloop
from flowspec.node.head import MAX_REQUESTS
from flowspec.serve import Limits, ServeConfig, Server

__all__ = ["add_serve_command"]

log = structlog.get_logger("flowspec.serve")
_DEFAULTS = Limits()
SHUTDOWN_GRACE_S = 5.0  # most answers in flight end within seconds; a service manager's stop waits 90 s
CLOSE_S = 5.0  # after the drain, for a client still taking its last bytes (aiohttp's shutdown_timeout)


def add_serve_command(sub: Any) -> None:
    p = sub.add_parser("serve", help="serve an OpenAI-compatible HTTP API (and a chat page) from the head",
                       formatter_class=argparse.RawDescriptionHelpFormatter, description="""\
Serve the pipeline over HTTP, OpenAI-style: POST /v1/chat/completions and /v1/completions (streamed as
server-sent events, or whole), GET /v1/models, /health (503 naming any stage that is down), /metrics
(Prometheus, vLLM's names with a flowspec: prefix) and a chat page at /. Requests run concurrently through
the one head, each producing what it would alone; past --max-concurrent they get a 429 at once.

It binds loopback by default. Another --host needs --api-key (or $FLOWSPEC_API_KEY): /v1/* then asks for
`Authorization: Bearer KEY`.

SIGTERM or Ctrl-C drains: new requests get a 503, answers in flight get --shutdown-grace seconds to finish, and
those still running then end with an error naming the shutdown (streams: an error event, then [DONE]); then the
stages stop and the server exits. A second Ctrl-C (or SIGTERM) ends the answers at once.

examples:
  flowspec serve --local --stages 3 --model smollm2-135m --draft self:layers=20
  flowspec serve --peers peers.txt --model qwen2.5-coder-1.5b --draft qwen2.5-coder-0.5b \\
      --host 0.0.0.0 --api-key "$(cat ~/.flowspec-api-key)"
then, with the openai client:  OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")""")
    add_pipeline_args(p, model_help="target model name or HF folder (and the served name)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback only)")
    p.add_argument("--port", type=port, default=8000,
                   help="port to listen on, 1..65535 (default 8000); checked free before the model loads")
    p.add_argument("--api-key", default=os.environ.get("FLOWSPEC_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default $FLOWSPEC_API_KEY); needed off "
                        "loopback")
    p.add_argument("--max-concurrent", type=Number(1, MAX_REQUESTS, note="a stage's limit"),
                   default=4,
                   help=f"requests generated at once, 1..{MAX_REQUESTS} (a stage's limit); more get a 429 "
                        "(default 4)")
    p.add_argument("--max-tokens", type=positive_int, default=_DEFAULTS.max_tokens,
                   help=f"the most max_tokens a request may ask for (default {_DEFAULTS.max_tokens})")
    p.add_argument("--max-body-bytes", type=Number(1024, 1 << 30), default=_DEFAULTS.max_body_bytes,
                   help=f"largest request body, 1 KiB..1 GiB; larger gets a 413 (default {_DEFAULTS.max_body_bytes})")
    p.add_argument("--shutdown-grace", type=Number(0, MAX_SECONDS, whole=False, unit="seconds", note="0 = end them at once"),
                   default=SHUTDOWN_GRACE_S, metavar="SECONDS",
                   help="on SIGTERM or Ctrl-C, how long answers in flight may run on before they are ended "
                        f"(default {SHUTDOWN_GRACE_S:g}; 0 or a second signal ends them at once)")
    add_precision_args(p)
    add_tls_args(p)
    add_budget_args(p)
    p.set_defaults(handler=serve_command)


def check_bind(host: str, api_key: str | None) -> None:
    """Refuse to listen beyond loopback without an API key: anyone on the network could use the pipeline."""
    if api_key is not None and not api_key.strip():
        raise ConfigError("--api-key is empty")
    if api_key is None and not _is_loopback(host):
        raise ConfigError(f"refusing to serve on {host} without an API key: anyone who can reach it could use "
                          "the pipeline. Pass --api-key KEY (or set FLOWSPEC_API_KEY), or keep --host 127.0.0.1.")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


async def _serve(args: argparse.Namespace) -> int:
    cluster = await open_cluster(args, cluster_config(args, max_requests=args.max_concurrent))
    async with cluster:
        await cluster.prepare(args.mode)  # the drafter now, not during the first request
        limits = Limits(max_body_bytes=args.max_body_bytes, max_tokens=args.max_tokens,
                        default_max_tokens=min(_DEFAULTS.default_max_tokens, args.max_tokens))
        config = ServeConfig(model=args.model, mode=args.mode, api_key=args.api_key,
                             max_concurrent=args.max_concurrent, limits=limits, budget=budget_overrides(args))
        from aiohttp import web

        server = Server(cluster, config)
        runner = web.AppRunner(server.app(), handler_cancellation=True, access_log=None, shutdown_timeout=CLOSE_S)
        await runner.setup()
        try:
            site = web.TCPSite(runner, args.host, args.port)
            try:
                await site.start()
            except OSError as exc:  # taken while the model loaded: check_can_listen found it free
                raise ConfigError(listen_error(args.host, args.port, exc, "choose another --port")) from None
            print(f"flowspec serve: {args.model} ({args.mode}, {cluster.head.num_stages} stages) on "
                  f"http://{args.host}:{args.port}/ (OpenAI base_url http://{args.host}:{args.port}/v1)",
                  flush=True)
            log.info("serve.ready", host=args.host, port=args.port, model=args.model, mode=args.mode,
                     stages=cluster.head.num_stages, max_concurrent=args.max_concurrent)
            stops = _Stops()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                if signal.getsignal(sig) is not signal.SIG_IGN:  # SIGHUP under nohup stays ignored
                    loop.add_signal_handler(sig, stops)
            await stops.asked.wait()
            print(f"flowspec serve: stopping (answers in flight get {args.shutdown_grace:g} s; Ctrl-C again to "
                  "end them now)", flush=True)
            await server.drain(args.shutdown_grace, stops.now)
        finally:
            await runner.cleanup()  # cancels what is still in flight: each request closes on every stage
    return 0


class _Stops:
    """SIGINT, SIGTERM and SIGHUP while serving: the first asks for a drain, the next one ends it now."""

    def __init__(self) -> None:
        self.asked, self.now = asyncio.Event(), asyncio.Event()

    def __call__(self) -> None:
        (self.now if self.asked.is_set() else self.asked).set()


def serve_command(args: argparse.Namespace) -> int:
    check_bind(args.host, args.api_key)
    check_pipeline_args(args)
    check_can_listen(args.host, args.port, "choose another --port")  # now, not after loading the model
    if args.log is None and not os.environ.get("FLOWSPEC_LOG"):
        configure_logging("info")  # the access log: one JSON line per HTTP request
    install_uvloop()  # one loop for the head and HTTP
    return asyncio.run(_serve(args))
