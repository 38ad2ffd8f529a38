"""Quality benchmark: the plots of a result.

``quality.png`` (mean accuracy, fidelity and KL vs budget, one line per policy; grouped bars when
there is one budget), ``quality_tasks.png`` (one panel per task) and ``quality_memory.png``
(accuracy, fidelity and KL vs the mean KV slots held).
"""

from __future__ import annotations

import math
from pathlib import Path

from benchmarks.quality_bench.metrics import AGNOSTIC, memory_rows, run_key
from benchmarks.quality_bench.report import result_protocols


def _pyplot():
    """matplotlib's pyplot on the Agg backend (imported on first use: plotting is optional)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plots(result: dict, out_dir: Path) -> list[Path]:
    plt = _pyplot()

    runs, budgets, tasks = result["runs"], result["config"]["budgets"], result["config"]["tasks"]
    policies = result["config"]["policies"]
    length = result["config"]["lengths"][0]
    paths = []

    protocols = result_protocols(result)
    colors = {p: f"C{i}" for i, p in enumerate(x for x in policies if x != "none")}

    def series(policy, task, field, protocol="query-aware"):
        ys = []
        for b in budgets:
            run = runs.get(run_key(policy, b, protocol))
            v = run["summary"].get(str(length), {}).get(task, {}).get(field) if run else None
            ys.append(float("nan") if v is None else v)
        return ys

    has_fid = "fidelity" in tasks
    fig, axes = plt.subplots(1, 3 if has_fid else 1, figsize=(15 if has_fid else 6, 4), squeeze=False)

    # One budget: grouped bars (x: the policies, one bar per protocol) instead of lines over budgets.
    bars = len(budgets) == 1
    compressed = [x for x in policies if x != "none"]
    width = 0.8 / max(1, len(protocols))

    def draw(ax, policy, task, field, protocol="query-aware", **kw):
        """query-aware: solid lines, circles; query-agnostic: dashed, squares (labels say which when both ran).
        Bars: one colour per protocol."""
        ys = series(policy, task, field, protocol)
        agnostic = protocol == AGNOSTIC
        suffix = f" ({protocol})" if len(protocols) > 1 else ""
        if policy == "none":  # no budget: a horizontal reference line
            if ys and not math.isnan(ys[0]):
                ax.axhline(ys[0], linestyle=":" if agnostic else "--", color="gray" if agnostic else "black",
                           label="none" + suffix)
        elif bars:
            i = compressed.index(policy)
            j = protocols.index(protocol) if protocol in protocols else 0
            ax.bar(i - 0.4 + width * (j + 0.5), ys[0], width, color=f"C{j}",
                   label=(protocol if i == 0 else None), hatch="//" if agnostic else None, edgecolor="white")
        else:
            ax.plot(budgets, ys, marker="s" if agnostic else "o", linestyle="--" if agnostic else "-",
                    color=colors[policy], label=policy + suffix, **kw)

    plotted = [(policy, protocol) for protocol in protocols for policy in policies]
    if "query-aware" not in protocols and "none" in runs:
        plotted.insert(0, ("none", "query-aware"))  # the fidelity reference
    for policy, protocol in plotted:
        draw(axes[0][0], policy, "mean", "accuracy", protocol)
        if has_fid:
            draw(axes[0][1], policy, "fidelity", "token_match", protocol)
            if policy != "none":  # KL 0 has no place on a log axis
                draw(axes[0][2], policy, "fidelity", "kl", protocol)
    xscale = "linear" if bars else "log"
    xlabel = f"policy (--kv-budget {budgets[0]})" if bars else "--kv-budget"

    def set_x(ax):
        if bars:
            ax.set_xticks(range(len(compressed)), compressed)
        else:
            ax.set_xticks(budgets, [str(b) for b in budgets])
            ax.minorticks_off()

    axes[0][0].set(xscale=xscale, xlabel=xlabel if bars else "--kv-budget (tokens per layer and KV head, window included)",
                   ylabel="mean accuracy over tasks (%)", title=f"accuracy, {length}-token prompts")
    if has_fid:
        axes[0][1].set(xscale=xscale, xlabel=xlabel, ylabel="% greedy tokens = uncompressed",
                       title="fidelity (32 tokens)")
        kls = [v for policy, protocol in plotted if policy != "none" for v in series(policy, "fidelity", "kl", protocol)]
        log_kl = any(v > 0 for v in kls if not math.isnan(v)) and not bars  # a log axis needs a positive value
        axes[0][2].set(xscale=xscale, yscale="log" if log_kl else "linear", xlabel=xlabel,
                       ylabel="mean KL to uncompressed (nats, lower is better)", title="next-token KL (fidelity task)")
    for i, ax in enumerate(axes[0]):
        if i < 2:
            ax.set_ylim(-5, 105)
        set_x(ax)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"SmolLM2-135M, {result['config']['samples']} samples/task, {' and '.join(protocols)}"
                 + (" (dashed: query-agnostic)" if len(protocols) > 1 and not bars else ""), fontsize=9)
    fig.tight_layout()
    p = out_dir / "quality.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)

    n = len(tasks)
    cols = min(4, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), squeeze=False)
    for i, task in enumerate(tasks):
        ax = axes[i // cols][i % cols]
        field = "token_match" if task == "fidelity" else "accuracy"
        for policy, protocol in plotted:
            draw(ax, policy, task, field, protocol, markersize=3)
        ax.set(xscale=xscale, title=task, ylim=(-5, 105))
        set_x(ax)
        if bars:
            ax.tick_params(axis="x", labelsize=6)
        ax.grid(alpha=0.3)
    for j in range(n, rows * cols):
        axes[j // cols][j % cols].axis("off")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    p = out_dir / "quality_tasks.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
    paths.append(write_memory_plot(result, out_dir))
    return paths


def write_memory_plot(result: dict, out_dir: Path) -> Path:
    """``quality_memory.png``: tasks mean, fidelity and KL against the mean KV slots held (log x), one
    line per policy through its budgets (:func:`memory_rows`, first length): solid at the exact-packing
    slots, faint dotted at the slots recorded; ``none``: a star and a dashed line."""
    plt = _pyplot()

    length, protocols = result["config"]["lengths"][0], result_protocols(result)
    panels = [("accuracy", "mean accuracy over tasks (%)"), ("token_match", "fidelity: % greedy tokens = uncompressed"),
              ("kl", "next-token KL to uncompressed (nats)")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), squeeze=False)
    compressed = [x for x in result["config"]["policies"] if x != "none"]
    ticks, kls = set(result["config"]["budgets"]), []
    for protocol in protocols:
        rows = [r for r in memory_rows(result, length, protocol) if r["slots_held"] is not None]
        suffix, style = (f" ({protocol})", "--") if len(protocols) > 1 and protocol != "query-aware" else ("", "-")
        for ax, (field, ylabel) in zip(axes[0], panels):
            for p in compressed:
                rs = [r for r in rows if r["policy"] == p and not math.isnan(r[field])]
                xs = [r["exact_slots_held"] if r["exact_slots_held"] is not None else r["slots_held"] for r in rs]
                ys = [r[field] for r in rs]
                kls += ys if field == "kl" else []
                color = f"C{compressed.index(p)}"
                ax.plot(xs, ys, marker="o", linestyle=style, color=color, label=p + suffix)
                ax.plot([r["slots_held"] for r in rs], ys, marker="o", linestyle=":", color=color, alpha=0.45,
                        markerfacecolor="none")
            for r in rows:
                if r["policy"] == "none":
                    ticks.add(round(r["slots_held"]))
                    if not math.isnan(r[field]) and (field != "kl" or r[field] > 0):  # KL 0: not on a log axis
                        ax.axhline(r[field], linestyle="--", color="black", linewidth=0.8)
                        ax.plot([r["slots_held"]], [r[field]], marker="*", markersize=10, color="black",
                                linestyle="none", label="none (full cache)" + suffix)
    for i, (ax, (_, ylabel)) in enumerate(zip(axes[0], panels)):
        ax.set(xscale="log", xlim=(min(ticks) / 1.25, max(ticks) * 1.25), ylabel=ylabel,
               xlabel=f"mean KV slots held per request ({length}-token prompts)")
        ax.set_xticks(sorted(ticks), [str(t) for t in sorted(ticks)])
        ax.minorticks_off()
        if i < 2:
            ax.set_ylim(-5, 105)
        elif any(v > 0 for v in kls):
            ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{result['config']['model']}, {result['config']['samples']} samples/task: quality per KV memory "
                 "(solid: slots under exact packing; faint dotted: slots recorded)", fontsize=9)
    fig.tight_layout()
    p = out_dir / "quality_memory.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p
