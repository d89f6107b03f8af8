"""Options and reports shared by `flowspec run`, `flowspec demo` and `flowspec bench`."""

from __future__ import annotations

import argparse
import errno
import math
import socket
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from flowspec.bounds import MAX_COUNT, MAX_SECONDS, MAX_STAGES, problem

if TYPE_CHECKING:
    from flowspec.api import Cluster
    from flowspec.config import ClusterConfig
    from flowspec.net import TlsConfig
    from flowspec.node.head import GenerationResult
    from flowspec.prompts import Prompt
    from flowspec.sched import BudgetOverrides

__all__ = ["Number", "Numbers", "WaitStatus", "add_budget_args", "add_pipeline_args", "add_precision_args",
           "add_sampling_args", "add_tls_args", "budget_overrides", "check_can_listen", "cluster_config", "check_pipeline_args", "count0",
           "duration", "factor", "formats", "layer_counts", "listen_error", "open_cluster", "port", "positive_int",
           "reach", "result_row", "seed", "stage_count", "tls_config", "wait_duration"]


# Argument types: every numeric flag of every command takes one of these (tests/cli/test_numeric_flags.py feeds each
# nan, inf, -1, 0 and 1e30). A bad value is a one-line usage error from argparse, before anything starts or
# connects; the rule itself is flowspec.bounds', which the library's arguments meet too.
class Number:
    """An argparse type: a number in [low, high] (flowspec.bounds.problem); `note` says what an edge value
    means ("0 = off")."""

    def __init__(self, low: float, high: float, *, whole: bool = True, above: bool = False, below: bool = False,
                 unit: str = "", note: str = "", rule: Callable[[float], None] | None = None) -> None:
        self.low, self.high, self.whole, self.above, self.below = low, high, whole, above, below
        self.unit, self.note, self.rule = unit, note, rule  # rule: a range kept elsewhere (ArgumentTypeError)

    def __call__(self, text: str) -> Any:
        try:
            value: float = int(text) if self.whole else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a {'whole ' if self.whole else ''}number, got {text!r}") from None
        why = problem(value, self.low, self.high, whole=self.whole, above=self.above, below=self.below,
                      unit=self.unit)
        if why is not None:
            raise argparse.ArgumentTypeError(why + (f" ({self.note})" if self.note else ""))
        if self.rule is not None:
            self.rule(value)
        return value

    def __repr__(self) -> str:  # argparse names the type in some messages
        return "number"


class Numbers:
    """An argparse type: a comma list of `Number`s, e.g. 8,8,7,7."""

    def __init__(self, item: Number, example: str) -> None:
        self.item, self.example = item, example

    def __call__(self, text: str) -> list[Any]:
        parts = text.split(",")
        if not all(part.strip() for part in parts):
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers like {self.example}, got {text!r}")
        try:
            return [self.item(part.strip()) for part in parts]
        except argparse.ArgumentTypeError as exc:
            raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None

    def __repr__(self) -> str:
        return "numbers"


positive_int = Number(1, MAX_COUNT)  # tokens, prompts, tree budgets
count0 = Number(0, MAX_COUNT, note="0 = off")
stage_count = Number(1, MAX_STAGES)
layer_counts = Numbers(Number(1, MAX_COUNT), "8,8,7,7")
duration = Number(0, MAX_SECONDS, whole=False, above=True, unit="seconds")
wait_duration = Number(0, MAX_SECONDS, whole=False, unit="seconds", note="0 = fail at once")
port = Number(1, 65535)
seed = Number(0, 2**64 - 1)
factor = Number(0, 1000, whole=False, above=True)  # time dilation, calibration margin: the timeouts scale with it
temperature = Number(-math.inf, math.inf, whole=False, rule=lambda v: _sampling_rule(temperature=v))
top_p = Number(-math.inf, math.inf, whole=False, rule=lambda v: _sampling_rule(top_p=v))
reach = Number(0, 1, whole=False, below=True, note="0 sends every node")


def _sampling_rule(temperature: float = 0.0, top_p: float = 1.0) -> None:
    """The sampling ranges are SamplingParams' rule (the API and the server check with it too)."""
    from flowspec.errors import ConfigError
    from flowspec.sched import SamplingParams

    try:
        SamplingParams(temperature, top_p)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_sampling_args(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    p.add_argument("--max-new-tokens", type=positive_int, default=max_new_tokens,
                   help=f"tokens to generate at most (default {max_new_tokens})")
    p.add_argument("--temperature", type=temperature, default=0.0,
                   help="0 = greedy (identical to transformers); > 0 samples the target's distribution exactly")
    p.add_argument("--top-p", type=top_p, default=1.0, help="nucleus sampling mass in (0, 1] (default 1)")
    p.add_argument("--seed", type=seed, default=0, help="sampling seed; a run is reproducible from it")


def add_precision_args(p: argparse.ArgumentParser, *, device: bool = True, quant: str = "none") -> None:
    from flowspec.model.precision import DEFAULT_GROUP_SIZE, DTYPES, GROUP_SIZES, QUANTS

    g = p.add_argument_group("device and number format (a peers-file line's device=/dtype=/quant= wins)")
    if device:
        g.add_argument("--device", default="auto",
                       help="auto (a CUDA GPU when present, else the CPU), cpu, cuda or cuda:N (default auto)")
    g.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="compute dtype; auto = float16 on a GPU line, float32 (exact) on the CPU, bfloat16 with "
                        "--quant (default auto)")
    g.add_argument("--quant", default=quant, choices=QUANTS,
                   help=f"weight-only quantization of every linear layer for CPU stages and the head (default {quant})")
    g.add_argument("--group-size", type=positive_int, choices=GROUP_SIZES, default=DEFAULT_GROUP_SIZE,
                   help=f"int4 group size (default {DEFAULT_GROUP_SIZE}, measured: see BENCHMARKS.md)")


def formats(args: argparse.Namespace) -> dict[str, Any]:
    """The flags of `add_precision_args` as ClusterConfig fields."""
    return {"device": getattr(args, "device", "auto"), "dtype": args.dtype, "quant": args.quant,
            "group_size": args.group_size}

def add_tls_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "TLS (all three or none; every node of the pipeline alike)",
        "Mutual TLS on every link: each node presents a certificate signed by the CA\n"
        "and checks its peer's against it (by CA, not by hostname: peers are addressed\n"
        "by IP). A stage with TLS may listen beyond loopback without a shared secret.")
    g.add_argument("--tls-cert", metavar="PEM", help="this node's certificate, signed by --tls-ca")
    g.add_argument("--tls-key", metavar="PEM", help="the private key of --tls-cert")
    g.add_argument("--tls-ca", metavar="PEM", help="the CA certificate that signed every node's certificate")


def tls_config(args: argparse.Namespace) -> TlsConfig | None:
    """The flags of `add_tls_args` as a `TlsConfig` (its files loaded and checked), or None without them."""
    from flowspec.errors import ConfigError
    from flowspec.net import TlsConfig

    given = {flag: getattr(args, flag.removeprefix("--").replace("-", "_"))
             for flag in ("--tls-cert", "--tls-key", "--tls-ca")}
    if not any(given.values()):
        return None
    missing = [flag for flag, value in given.items() if not value]
    if missing:
        raise ConfigError(f"TLS needs --tls-cert, --tls-key and --tls-ca together; missing {', '.join(missing)}")
    return TlsConfig(given["--tls-cert"], given["--tls-key"], given["--tls-ca"])


_BUDGET_FLAGS = {  # flag -> Budget field
    "tree_tokens": "init_tokens", "topk": "topk", "depth": "depth", "expand_tokens": "expand_tokens",
    "expand_depth": "expand_depth", "segment": "segment", "width": "width", "in_flight": "in_flight",
    "eager_root": "eager_root", "expand_from_leaf": "expand_from_leaf", "draft_ahead": "draft_ahead",
    "lookup": "lookup", "max_tree": "max_tree", "min_reach": "min_reach",
}


def add_budget_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "tree budgets", "By default the runtime picks these from what a stage step, a drafter level and the "
        "lm_head cost on the devices it runs on (measured at start-up; flowspec/sched/costs.py). Any flag set "
        "here overrides its field.")
    g.add_argument("--tree-tokens", type=positive_int, help="draft nodes in a round's first tree (chunk, flowspec)")
    g.add_argument("--topk", type=positive_int, help="children per node per level, and the beam width")
    g.add_argument("--depth", type=positive_int, help="beam levels after the first top-k level")
    g.add_argument("--expand-tokens", type=positive_int, help="draft nodes per dynamic expansion (flowspec)")
    g.add_argument("--expand-depth", type=positive_int, help="beam levels per expansion (flowspec)")
    g.add_argument("--segment", type=positive_int, help="max tree nodes per pipeline segment (flowspec)")
    g.add_argument("--width", type=positive_int, help="nodes per tree layer (pipedec)")
    g.add_argument("--in-flight", type=positive_int, help="segments in the pipeline at once (default stages + 1)")
    g.add_argument("--eager-root", action="store_const", const=True, default=None,
                   help="flowspec: send a round's root before its tree is drafted (for fast drafters)")
    g.add_argument("--expand-from-leaf", action=argparse.BooleanOptionalAction, default=None,
                   help="flowspec: expand below the best-scored leaf of the surviving tree, not the new root")
    g.add_argument("--draft-ahead", action=argparse.BooleanOptionalAction, default=None,
                   help="flowspec: keep drafting below the best leaf while the pipeline works")
    g.add_argument("--lookup", type=count0, metavar="N",
                   help="flowspec: tokens proposed by prompt lookup after each verdict (0 turns it off)")
    g.add_argument("--max-tree", type=positive_int, help="live draft nodes the head keeps at most")
    g.add_argument("--min-reach", type=reach, metavar="P",
                   help="flowspec: send a segment's later rows only for nodes the draft gives at least chance P "
                        "of being accepted (0 sends every node)")


def budget_overrides(args: argparse.Namespace) -> BudgetOverrides:
    """The budget fields the user set (the runtime chooses the others)."""
    from flowspec.sched import BudgetOverrides

    return BudgetOverrides(**{field: getattr(args, flag) for flag, field in _BUDGET_FLAGS.items()
                              if getattr(args, flag, None) is not None})


def result_row(prompt: Prompt, result: GenerationResult, cluster: Cluster, mode: str) -> dict[str, Any]:
    stats = result.stats
    n = len(result.tokens)
    return {
        "id": prompt.id,
        "mode": mode,
        "tokens": result.tokens,
        "text": cluster.decode(result.tokens),
        "finish_reason": result.finish_reason,
        "tokens_per_s": round(result.tokens_per_s, 3),
        "decode_tokens_per_s": round(result.decode_tokens_per_s, 3),
        "ttft_s": round(result.ttft_s, 4),
        "steps": stats.steps,
        "verifications": stats.verifications,
        "mean_accepted": round(stats.mean_accepted, 3),
        "tokens_per_step": round(stats.committed / stats.steps, 3) if stats.steps else 0.0,
        "draft_tokens_per_token": round(stats.rows_sent / max(stats.committed, 1), 3),
        "utilization": [round(u, 3) for u in result.utilization(cluster.head.num_stages)],
        "bytes_per_token": round(result.bytes_sent / max(n, 1), 1),
        "stage_memory_mib": {k: {part: round(v / 2**20, 1) for part, v in m.items()}
                             for k, m in sorted(result.stage_memory.items())},
    }


class WaitStatus:
    """The one-line "waiting for stage K at host:port (n s)" status while a stage is not up yet: rewritten in
    place on a terminal while connecting, a line every few seconds otherwise (and during a recovery, when
    answer text is on the screen)."""

    EVERY_S = 5.0

    def __init__(self) -> None:
        self.inline = sys.stderr.isatty()
        self.shown: tuple[int, float] | None = None  # (stage, waited_s) last shown

    def __call__(self, stage: int, address: str, waited_s: float) -> None:
        if not self.inline and self.shown is not None and self.shown[0] == stage \
                and 0 <= waited_s - self.shown[1] < self.EVERY_S:
            return
        line = f"waiting for stage {stage} at {address} ({waited_s:.0f} s)"
        sys.stderr.write(f"\r{line}\x1b[K" if self.inline else line + "\n")
        sys.stderr.flush()
        self.shown = (stage, waited_s)

    def done(self) -> None:
        if self.inline and self.shown is not None:
            sys.stderr.write("\n")
        self.inline, self.shown = False, None


def add_pipeline_args(p: argparse.ArgumentParser, model_help: str = "target model name or HF folder") -> None:
    """Where the pipeline is (local stage processes, or a peers file of running nodes) and how to reach it:
    the flags `flowspec run` and `flowspec serve` share (with the precision, TLS and budget groups)."""
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--local", action="store_true", help="start the stages as local processes on loopback")
    where.add_argument("--peers", help="peers file of running flowspec-node processes (this process is line 1)")
    p.add_argument("--stages", type=stage_count, default=4, help="stage processes for --local (default 4)")
    p.add_argument("--layers", type=layer_counts,
                   help="layers per stage for --local, one number per stage, e.g. 8,8,7,7 (default balanced)")
    p.add_argument("--model", default="smollm2-135m", help=model_help)
    p.add_argument("--draft", help="draft: a model sharing the target's tokenizer, self, self:layers=N, random")
    p.add_argument("--mode", default="flowspec", choices=["ar", "chunk", "pipedec", "flowspec"])
    p.add_argument("--cache-dir", help="model cache (default $FLOWSPEC_CACHE or ~/.cache/flowspec)")
    p.add_argument("--secret-file", help="shared secret for --peers (else $FLOWSPEC_SECRET)")
    from flowspec.config import HEARTBEAT_TIMEOUT_S, RECOVERY_TIMEOUT_S, STEP_TIMEOUT_S

    p.add_argument("--heartbeat-timeout", type=duration, default=HEARTBEAT_TIMEOUT_S,
                   help=f"seconds of silence before a stage is declared dead (default {HEARTBEAT_TIMEOUT_S:g}; "
                        "with --local also passed to the stage processes)")
    p.add_argument("--step-timeout", type=duration, default=STEP_TIMEOUT_S,
                   help="seconds without progress (heartbeats still flowing) before a stalled or far too slow "
                        f"stage fails the request (default {STEP_TIMEOUT_S:g}; raise it for a long prompt on "
                        "slow devices)")
    p.add_argument("--recovery-timeout", type=wait_duration, default=RECOVERY_TIMEOUT_S,
                   help="seconds to wait for a stage that is not up yet or was lost (restarted, or a standby= "
                        f"address) before its requests fail; 0 = fail at once (default {RECOVERY_TIMEOUT_S:g})")


def check_pipeline_args(args: argparse.Namespace) -> None:
    from flowspec.errors import ConfigError
    from flowspec.store.shard import check_layer_counts

    if args.layers is not None:
        if not args.local:
            raise ConfigError("--layers is for --local; with --peers give layers=N on the peers file's stage lines")
        check_layer_counts(args.layers, args.stages)
    if args.local and (args.tls_cert or args.tls_key or args.tls_ca):
        raise ConfigError("--tls-cert/--tls-key/--tls-ca are for --peers; --local stages run on loopback")


def cluster_config(args: argparse.Namespace, **settings: Any) -> ClusterConfig:
    """The one ClusterConfig the flags of `add_pipeline_args` and `add_precision_args` describe (`settings`: a
    command's own, e.g. serve's max_requests)."""
    from flowspec.config import ClusterConfig

    return ClusterConfig(model=args.model, draft=args.draft, cache_dir=args.cache_dir,
                         heartbeat_timeout=args.heartbeat_timeout, step_timeout=args.step_timeout,
                         recovery_timeout=args.recovery_timeout, **formats(args), **settings)


async def open_cluster(args: argparse.Namespace, config: ClusterConfig) -> Cluster:
    """The cluster `add_pipeline_args` describes, built from `config`: local stage processes started here, or
    running nodes connected to (with the waiting-for-stage status while one is not up yet)."""
    from flowspec.api import Cluster
    from flowspec.config import load_secret

    if args.local:
        return await Cluster.start_local(config=config, stages=args.stages, layers=args.layers)
    status = WaitStatus()
    try:
        return await Cluster.connect(args.peers, config, secret=load_secret(args.secret_file), on_waiting=status,
                                     tls=tls_config(args))
    finally:
        status.done()


def check_can_listen(host: str, port: int, what_to_change: str) -> None:
    """Bind-test host:port now, so that a port in use or a host name that does not resolve is one line before the
    model loads (seconds to minutes), not a traceback after it. The server binds it again when it starts (a race
    lost meanwhile is `listen_error`'s line too)."""
    from flowspec.errors import ConfigError
    from flowspec.net.link import format_address

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError) as exc:
        raise ConfigError(f"cannot listen on {format_address(host, port)}: the name {host!r} does not resolve "
                          f"here ({getattr(exc, 'strerror', None) or exc}); give an address of this machine") from None
    for family, kind, proto, _, addr in infos:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio's and aiohttp's servers do
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(addr)
            except OSError as exc:
                raise ConfigError(listen_error(host, port, exc, what_to_change)) from None


def listen_error(host: str, port: int, exc: OSError, what_to_change: str) -> str:
    """One line for a server that cannot bind host:port, saying what to do."""
    from flowspec.net.link import format_address

    where = f"cannot listen on {format_address(host, port)}"
    if exc.errno == errno.EADDRINUSE:
        return f"{where}: the address is already in use (another flowspec process?); stop it or {what_to_change}"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"{where}: {host} is not an address of this machine"
    if exc.errno == errno.EACCES:
        return f"{where}: permission denied (ports below 1024 need privileges); {what_to_change}"
    return f"{where}: {exc.strerror or exc}"
