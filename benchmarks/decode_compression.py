"""Compression during decode: one long output without compression, compressed after prefill, and
compressed during decode too.

One server (``--kv-policy lava --kv-budget B``, pool ``--max-total-tokens``), one prompt,
``--output-tokens`` generated with ``ignore_eos``: with ``kv_policy none``, with compression after
prefill only, then with ``kv_decode_budget N`` and ``kv_decode_interval D`` (per request), the
radix cache flushed between them. Reports, per run: tokens generated (SGLang clips an output to
what the pool holds beside the prompt; one compressed during decode is not clipped when its bound
fits), wall time, output tokens/s, the private slots at the end and at their peak, the number of
decode selections and their summed time (its share of the run), and where the outputs first
differ. The private slots over generated tokens of each run (from the server's selection log
lines) are plotted to ``slots.png``.

    python -m benchmarks.decode_compression                      # 300-token prompt, 1000 tokens out
    python -m benchmarks.decode_compression --output-tokens 3000 --budget 256 --decode-budget 256 --interval 128 \
        --max-total-tokens 1024                                  # an output longer than the pool
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from lava_sglang.launch import Server, flush_cache, http_json
from lava_sglang.models import default_model_path
from lava_sglang.sglang_log import decode_selections, slots_trace
from lava_sglang.workloads import default_corpus_dir, haystack, load_corpus

OUT = Path("benchmarks") / "results" / "decode_compression"


MODES = ("none", "after", "decode")


def run(server: Server, ids: list, args, mode: str) -> dict:
    custom = {"kv_budget": args.budget} if mode != "none" else {"kv_policy": "none"}
    if mode == "decode":
        custom.update(kv_decode_budget=args.decode_budget, kv_decode_interval=args.interval)
    flush_cache(server.url)
    rid = f"decode-bench-{mode}-{time.time_ns()}"
    mark = len(server.log_text())
    started = time.perf_counter()
    out = http_json(server.url + "/generate", {"rid": rid, "input_ids": ids, "sampling_params": {
        "max_new_tokens": args.output_tokens, "temperature": 0.0, "ignore_eos": True, "custom_params": custom}},
        timeout=7200)
    wall = time.perf_counter() - started
    rep = (out["meta_info"].get("kv_compression") or [{}])[0]
    n = out["meta_info"]["completion_tokens"]
    selections_ms = rep.get("decode_compression_ms_total", 0.0)
    selections = decode_selections(server.log_text()[mark:], rid, len(ids))
    return {"mode": mode, "requested_tokens": args.output_tokens, "output_tokens": n,
            "finish_reason": out["meta_info"].get("finish_reason"), "wall_s": round(wall, 2),
            "tokens_per_s": round(n / wall, 2), "decode_selections": rep.get("decode_selections", 0),
            "decode_peak_slots": rep.get("decode_peak_slots"), "prompt_private_slots": rep.get("private_slots"),
            "decode_private_slots": rep.get("decode_private_slots"), "decode_selections_ms": selections_ms,
            "selections_share_of_wall": round(selections_ms / 1000 / wall, 4),
            "trace": trace(mode, len(ids), n, rep, selections),
            "output_ids": out["output_ids"], "text_head": out["text"][:200]}


def trace(mode: str, prompt: int, n: int, rep: dict, selections: list) -> list:
    """(generated tokens, private slots) at the start, around each selection, and at the end."""
    start = prompt if mode == "none" or not rep else int(rep.get("private_slots") or prompt)
    return slots_trace(start, n, selections)


def plot(result: dict, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for r in result["runs"]:
        xs, ys = zip(*r["trace"])
        ax.plot(xs, ys, label=f"{r['mode']} ({r['output_tokens']} tokens)")
    ax.axhline(result["bound"], ls="--", c="grey", lw=0.8, label=f"bound {result['bound']}")
    ax.axhline(result["args"]["max_total_tokens"], ls=":", c="red", lw=0.8, label="pool")
    ax.set_xlabel("generated tokens")
    ax.set_ylabel("private KV slots")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompt-tokens", type=int, default=300)
    p.add_argument("--output-tokens", type=int, default=1000)
    p.add_argument("--budget", type=int, default=128)
    p.add_argument("--decode-budget", type=int, default=128)
    p.add_argument("--interval", type=int, default=128)
    p.add_argument("--max-total-tokens", type=int, default=16384)
    p.add_argument("--core", type=int, default=None, help="pin the server to this core (OMP_NUM_THREADS=1)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--name", default="decode_compression", help="results file stem (.json, .png)")
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)
    from transformers import AutoTokenizer

    model = str(default_model_path())
    tok = AutoTokenizer.from_pretrained(model)
    ids = tok.encode(haystack(args.prompt_tokens + 50, load_corpus(default_corpus_dir()), seed=11, tokenizer=tok))
    ids = ids[:args.prompt_tokens]
    flags = ["--kv-policy", "lava", "--kv-budget", str(args.budget), "--max-total-tokens", str(args.max_total_tokens)]
    with Server(model, flags, core=args.core) as server:
        runs = [run(server, ids, args, mode) for mode in args.modes]

    def first_difference(a, b):
        return next((i for i, (x, y) in enumerate(zip(a["output_ids"], b["output_ids"])) if x != y), None)

    command = "python -m benchmarks.decode_compression " + " ".join(sys.argv[1:] if argv is None else argv)
    result = {"command": command, "args": vars(args),
              "runs": runs, "first_divergence": {f"{a['mode']}/{b['mode']}": first_difference(a, b)
                                                 for i, a in enumerate(runs) for b in runs[i + 1:]},
              "bound": max(args.budget, args.decode_budget) + args.interval + 1}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out / f"{args.name}.png")
    for r in runs:
        print({k: v for k, v in r.items() if k not in ("output_ids", "trace")})
    print("first divergence", result["first_divergence"], "bound", result["bound"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
