"""Memory the engine really frees, per policy and budget, on the live server (CPU engine).

    python benchmarks/memory.py [--tokens 4000] [--budgets 64 128 256] [--repeats 2] [--corpus DIR]

One server (``--kv-policy lava``); each policy and budget is chosen per request through
``custom_params`` (same engine path). For every (policy, budget) it sends ``--repeats``
different prompts of ``--tokens`` tokens and records from the response's compression report:
slots held after compression (vs the prompt length that ``--kv-policy none`` holds), slots
freed, packing efficiency (kept cells / (K x heads x layers)), layer-budget max/mean, and
compression time vs the request's prefill time. Writes JSON, a markdown table and a PNG to
``benchmarks/results/memory/``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from lava_sglang.launch import Server
from lava_sglang.models import default_model_path
from lava_sglang.workloads import default_corpus_dir, haystack, load_corpus

POLICIES = ("streamingllm", "snapkv", "pyramidkv", "adakv", "lava")
OUT = Path(__file__).resolve().parent / "results" / "memory"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4000)
    parser.add_argument("--budgets", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--policies", nargs="+", default=list(POLICIES))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--corpus", default=None)
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)

    model = str(default_model_path())
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    corpus_dir = args.corpus or default_corpus_dir()
    corpus = load_corpus(corpus_dir)
    rows = []
    seed = 0
    with Server(model, ["--kv-policy", "lava", "--max-total-tokens", str(max(24576, 3 * args.tokens))]) as server:
        for policy in args.policies:
            for budget in args.budgets:
                for _ in range(args.repeats):
                    seed += 1
                    ids = tokenizer.encode(haystack(args.tokens, corpus, seed=seed, tokenizer=tokenizer) + "\n\nSummarize the text above.")
                    t0 = time.time()
                    out = server.generate(input_ids=ids, max_new_tokens=1,
                                          sampling_params={"custom_params": {"kv_policy": policy, "kv_budget": budget}})
                    rep = out["meta_info"]["kv_compression"][0]
                    rows.append({"policy": policy, "budget": budget, "prompt_tokens": len(ids), "wall_s": time.time() - t0, **rep})
                    print(f"{policy:12s} b={budget:4d} L={len(ids)} held={rep['slots_held']:5d} freed={rep['slots_freed']:5d} "
                          f"packing={rep['packing_efficiency']:.3f} comp={rep['compression_ms']:.0f}ms prefill={rep['prefill_ms']:.0f}ms",
                          flush=True)
    summary = []
    for policy in args.policies:
        for budget in args.budgets:
            rs = [r for r in rows if r["policy"] == policy and r["budget"] == budget]
            summary.append({
                "policy": policy, "budget": budget,
                "prompt_tokens": statistics.mean(r["prompt_tokens"] for r in rs),
                "slots_held": statistics.mean(r["slots_held"] for r in rs),
                "slots_held_none": statistics.mean(r["prompt_tokens"] for r in rs),
                "memory_saving_x": statistics.mean(r["prompt_tokens"] / r["slots_held"] for r in rs),
                "packing_efficiency": statistics.mean(r["packing_efficiency"] for r in rs),
                "layer_budget_max_over_mean": statistics.mean(r["layer_budget_max_over_mean"] for r in rs),
                "compression_over_prefill": statistics.median(r["compression_ms"] / r["prefill_ms"] for r in rs),
                "compression_ms": statistics.median(r["compression_ms"] for r in rs),
                "prefill_ms": statistics.median(r["prefill_ms"] for r in rs),
            })
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/memory.py " + " ".join(argv if argv is not None else sys.argv[1:])
    (out_dir / "memory.json").write_text(json.dumps({"command": command, "corpus": str(corpus_dir), "rows": rows,
                                                      "summary": summary}, indent=1))
    lines = [f"Command: `{command}`", "",
             "| policy | budget | prompt | slots held (none: prompt) | saving | packing eff. | layer max/mean | compression / prefill |",
             "|---|---|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['policy']} | {s['budget']} | {s['prompt_tokens']:.0f} | {s['slots_held']:.0f} | {s['memory_saving_x']:.1f}x | "
                     f"{s['packing_efficiency']:.3f} | {s['layer_budget_max_over_mean']:.2f} | {100 * s['compression_over_prefill']:.2f}% "
                     f"({s['compression_ms']:.0f} / {s['prefill_ms']:.0f} ms) |")
    (out_dir / "memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(1, 2, figsize=(10, 4))
        for policy in args.policies:
            ss = [s for s in summary if s["policy"] == policy]
            ax[0].plot([s["budget"] for s in ss], [s["slots_held"] for s in ss], marker="o", label=policy)
            ax[1].plot([s["budget"] for s in ss], [s["packing_efficiency"] for s in ss], marker="o", label=policy)
        ax[0].axhline(summary[0]["slots_held_none"], color="gray", ls="--", label="none (full cache)")
        ax[0].set(xlabel="budget", ylabel="slots held per request", yscale="log", title=f"{args.tokens}-token prompts")
        ax[1].set(xlabel="budget", ylabel="packing efficiency", title="kept cells / (K x heads x layers)")
        ax[0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / "memory.png", dpi=100)
    except ImportError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
