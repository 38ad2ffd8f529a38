"""Time to score + select one request per policy, engine-free, on this CPU.

Default shapes are the default model's (SmolLM2-135M-Instruct: 30 layers, 9 query heads,
3 KV heads, head_dim 64), a 4096-token prompt, window 32, budget 128 (window included).
Random post-RoPE-like tensors (the cost does not depend on the values). Reports the median
of ``--repeats`` runs after one warm-up, with ``torch.set_num_threads(--threads)``, split
into the scoring phase (``score_layer`` over all layers) and the selection phase
(budgets + top-k), and writes JSON.

    python benchmarks/score_time.py                       # -> benchmarks/results/score_time.json
    python benchmarks/score_time.py --seq-len 8192 --dtype bfloat16 --out /tmp/x.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lava_sglang.config import CompressionConfig  # noqa: E402
from lava_sglang.policies import get_policy, select_request  # noqa: E402
from lava_sglang.policies.scoring import DEFAULT_KEY_CHUNK  # noqa: E402

POLICIES = ["streamingllm", "snapkv", "pyramidkv", "adakv", "lava"]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--q-heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--prefix-len", type=int, default=0)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--budget", type=int, default=128)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--policies", nargs="*", default=POLICIES)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "score_time.json"))
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    L, N, w = args.layers, args.seq_len, args.window
    q = [torch.randn(w, args.q_heads, args.head_dim).to(dtype) for _ in range(L)]
    k = [torch.randn(N, args.kv_heads, args.head_dim).to(dtype) for _ in range(L)]
    v = [torch.randn(N, args.kv_heads, args.head_dim).to(dtype) for _ in range(L)]

    rows = []
    for name in args.policies:
        cfg = CompressionConfig(policy=name, budget=args.budget, window=w)
        pol = get_policy(name)
        select_request(cfg, q, k, v, args.prefix_len)  # warm-up
        total, score, select = [], [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            scores = [pol.score_layer(cfg, q[l], k[l], v[l], args.prefix_len) for l in range(L)]
            t1 = time.perf_counter()
            sel = pol.select(cfg, scores, args.prefix_len, N)
            t2 = time.perf_counter()
            score.append(t1 - t0)
            select.append(t2 - t1)
            total.append(t2 - t0)
        assert sel.compressed and sel.kept_cells == L * args.kv_heads * args.budget
        rows.append({
            "policy": name,
            "total_ms": 1e3 * statistics.median(total),
            "score_ms": 1e3 * statistics.median(score),
            "select_ms": 1e3 * statistics.median(select),
            "min_total_ms": 1e3 * min(total),
            "max_total_ms": 1e3 * max(total),
            "kept_cells": sel.kept_cells,
            "layer_budget_max_over_mean": max(sel.layer_budgets) / (sum(sel.layer_budgets) / L),
        })

    result = {
        "benchmark": "score_time",
        "what": "score + select one request (engine-free, lava_sglang.policies), median over repeats",
        "shapes": {"layers": L, "q_heads": args.q_heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim,
                   "seq_len": N, "prefix_len": args.prefix_len, "window": w, "budget": args.budget, "dtype": args.dtype},
        "key_chunk": DEFAULT_KEY_CHUNK,
        "repeats": args.repeats,
        "torch_threads": args.threads,
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_avg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "command": "python benchmarks/score_time.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "results": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"{L} layers, {args.q_heads} q heads / {args.kv_heads} KV heads, head_dim {args.head_dim}, N={N}, P={args.prefix_len}, "
          f"w={w}, budget={args.budget}, {args.dtype}, {args.threads} threads, median of {args.repeats}")
    print(f"{'policy':<13}{'total ms':>10}{'score ms':>10}{'select ms':>11}{'min-max ms':>16}")
    for r in rows:
        print(f"{r['policy']:<13}{r['total_ms']:>10.1f}{r['score_ms']:>10.1f}{r['select_ms']:>11.1f}"
              f"{r['min_total_ms']:>8.1f}-{r['max_total_ms']:<7.1f}")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
