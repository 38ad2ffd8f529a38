"""The demo's plot (``lava_sglang.demo``): correctness and slots held against the budget, the
burst's peak running requests, and the long output's private slots over generated tokens."""

from __future__ import annotations

from pathlib import Path


def plot(data: dict, path: Path) -> str | None:
    """Correctness and slots held vs budget, and the burst; returns a reason when it cannot plot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib)"
    rows = [r for r in data["rows"] if r["budget"] is not None]
    full = next(r for r in data["rows"] if r["budget"] is None)
    rows.sort(key=lambda r: r["budget"])
    budgets = [r["budget"] for r in rows]
    panels = 1 + bool(data.get("burst")) + bool(data.get("decode"))
    fig, ax = plt.subplots(1, panels, figsize=(6 * panels if panels > 1 else 7, 4.2), squeeze=False)
    a = ax[0][0]
    a.plot(budgets, [r["slots_held"] for r in rows], color="tab:blue", marker="o", label="LAVa: KV slots held")
    a.axhline(full["slots_held"], color="black", linestyle="--", label=f"full cache: {full['slots_held']} slots, passkey {'right' if full['right'] else 'wrong'}")
    for r in rows:
        a.scatter([r["budget"]], [r["slots_held"]], s=160, zorder=3, color="tab:green" if r["right"] else "tab:red",
                  marker="o" if r["right"] else "X")
        a.annotate(f"{r['answer'][:10]!r}", (r["budget"], r["slots_held"]), textcoords="offset points", xytext=(0, 10),
                   ha="center", fontsize=8)
    a.scatter([], [], color="tab:green", marker="o", label="passkey right")
    a.scatter([], [], color="tab:red", marker="X", label="passkey wrong")
    a.set(xscale="log", xlabel="budget (kv_budget, tokens per KV head)", ylabel="KV slots held after prefill",
          ylim=(0, full["slots_held"] * 1.15), title=f"One {full['prompt_tokens']}-token passkey prompt, {data['model']}")
    a.set_xticks(budgets, [str(b) for b in budgets])
    a.minorticks_off()
    a.margins(x=0.12)
    a.legend(fontsize=8, loc="center left")
    if data.get("burst"):
        b = ax[0][1]
        names = list(data["burst"])
        burst = [data["burst"][n] for n in names]
        xs = range(len(names))
        bars = b.bar(xs, [r["peak_running_requests"] for r in burst], color=["gray", "tab:blue"][:len(names)])
        for bar, r in zip(bars, burst):
            b.annotate(f"{r['peak_running_requests']} running\n{r['wall_s']:.0f} s wall", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                       textcoords="offset points", xytext=(0, 3), ha="center", fontsize=9)
        b.set_xticks(list(xs), names)
        b.set(ylabel="peak running requests", ylim=(0, max(r["requests"] for r in burst) * 1.35),
              title=f"Burst of {burst[0]['requests']} requests, pool of {data['pool_tokens']} tokens")
    if data.get("decode"):
        d = ax[0][panels - 1]
        for r in data["decode"]:
            xs, ys = zip(*r["trace"])
            d.plot(xs, ys, label=f"compressed {r['name']}")
            if r["bound"] is not None:
                d.axhline(r["bound"], color="gray", linestyle=":", label=f"bound {r['bound']}")
        d.set(xlabel="generated tokens", ylabel="private KV slots", title="One long output")
        d.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None
