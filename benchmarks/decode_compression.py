"""Compression during decode: one long output with and without ``kv_decode_budget``.

One server (``--kv-policy lava --kv-budget B``), one prompt, ``--output-tokens`` generated with
``ignore_eos``: first with compression after prefill only, then with ``kv_decode_budget N`` and
``kv_decode_interval D`` (per request), the radix cache flushed between them. Reports, per run:
wall time, output tokens/s, the private slots held at the end and at their peak, the number of
decode selections and their summed time (its share of the run), and whether the two outputs agree.

    python -m benchmarks.decode_compression                      # 300-token prompt, 1000 tokens out
    python -m benchmarks.decode_compression --output-tokens 3000 --interval 128 --decode-budget 256
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from lava_sglang.launch import Server, flush_cache, http_json
from lava_sglang.models import default_model_path
from lava_sglang.workloads import default_corpus_dir, haystack, load_corpus

OUT = Path("benchmarks") / "results" / "decode_compression"


def run(server: Server, ids: list, args, decode: bool) -> dict:
    custom = {"kv_budget": args.budget}
    if decode:
        custom.update(kv_decode_budget=args.decode_budget, kv_decode_interval=args.interval)
    flush_cache(server.url)
    started = time.perf_counter()
    out = http_json(server.url + "/generate", {"input_ids": ids, "sampling_params": {
        "max_new_tokens": args.output_tokens, "temperature": 0.0, "ignore_eos": True, "custom_params": custom}},
        timeout=7200)
    wall = time.perf_counter() - started
    rep = (out["meta_info"].get("kv_compression") or [{}])[0]
    n = out["meta_info"]["completion_tokens"]
    selections_ms = rep.get("decode_compression_ms_total", 0.0)
    return {"decode_compression": decode, "output_tokens": n, "wall_s": round(wall, 2), "tokens_per_s": round(n / wall, 2),
            "decode_selections": rep.get("decode_selections", 0), "decode_peak_slots": rep.get("decode_peak_slots"),
            "prompt_private_slots": rep.get("private_slots"), "decode_private_slots": rep.get("decode_private_slots"),
            "decode_selections_ms": selections_ms, "selections_share_of_wall": round(selections_ms / 1000 / wall, 4),
            "output_ids": out["output_ids"], "text_head": out["text"][:200]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompt-tokens", type=int, default=300)
    p.add_argument("--output-tokens", type=int, default=1000)
    p.add_argument("--budget", type=int, default=128)
    p.add_argument("--decode-budget", type=int, default=128)
    p.add_argument("--interval", type=int, default=128)
    p.add_argument("--max-total-tokens", type=int, default=16384)
    p.add_argument("--core", type=int, default=None, help="pin the server to this core (OMP_NUM_THREADS=1)")
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)
    from transformers import AutoTokenizer

    model = str(default_model_path())
    tok = AutoTokenizer.from_pretrained(model)
    ids = tok.encode(haystack(args.prompt_tokens + 50, load_corpus(default_corpus_dir()), seed=11, tokenizer=tok))
    ids = ids[:args.prompt_tokens]
    flags = ["--kv-policy", "lava", "--kv-budget", str(args.budget), "--max-total-tokens", str(args.max_total_tokens)]
    with Server(model, flags, core=args.core) as server:
        runs = [run(server, ids, args, False), run(server, ids, args, True)]
    a, b = runs
    same = next((i for i, (x, y) in enumerate(zip(a["output_ids"], b["output_ids"])) if x != y), None)
    result = {"command": "python -m benchmarks.decode_compression " + " ".join(argv or []), "args": vars(args),
              "runs": runs, "first_divergence": same,
              "bound": max(args.budget, args.decode_budget) + args.interval + 1}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode_compression.json").write_text(json.dumps(result, indent=1) + "\n")
    for r in runs:
        print({k: v for k, v in r.items() if k != "output_ids"})
    print("first divergence at token", same, "bound", result["bound"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
