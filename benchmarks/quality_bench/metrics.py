"""Quality benchmark: run keys, protocols and the metrics computed from the records.

Fidelity (greedy-token match and KL of the next-token distributions from top-k logprobs), task
accuracy summaries, KV slots held (recorded and under exact packing), and run-against-run
comparisons. No server, no model: numbers from records.
"""

from __future__ import annotations

import json
import math
from typing import Optional

from benchmarks.tasks import TASKS
from lava_sglang.config import CompressionConfig
from lava_sglang.models import default_model_path

WINDOW = CompressionConfig().window  # the plugin's default observation window
TOP_LOGPROBS = 20
PROTOCOLS = ("query-aware", "query-agnostic")
AGNOSTIC = "query-agnostic"
# The whole prompt in one request, compressed during chunked prefill (``--prefill-compression``):
# query-aware at the last chunk only, earlier chunks selected with their own last tokens.
CHUNKED = "chunked"
ORDER = PROTOCOLS + (CHUNKED,)


def small_window(budget: int) -> int:
    """Window used at budgets that do not exceed the default window (budget 32 -> window 16)."""
    return max(1, budget // 2)


def protocol_of(run: dict) -> str:
    """A run's protocol; runs written before the field existed are query-aware."""
    return run.get("protocol") or "query-aware"


def run_key(policy: str, budget: Optional[int], protocol: str = "query-aware") -> str:
    """``none`` / ``<policy>@<budget>`` (query-aware, as in every earlier file), ``... query-agnostic``."""
    base = "none" if policy == "none" else f"{policy}@{budget}"
    return base if protocol == "query-aware" else f"{base} {protocol}"


# ----------------------------------------------------------------------------------------------
# fidelity: greedy-token match and KL of the next-token distributions (from top-k logprobs)
# ----------------------------------------------------------------------------------------------

def topk_kl(ref: list, other: list) -> float:
    """KL(p_ref || p_other) from two top-k lists of ``[logprob, token_id, ...]``.

    Exact on the reference's top-k tokens plus one bucket for the rest of the vocabulary. A
    reference token missing from the other top-k gets the other's residual mass spread over
    the missing tokens, capped by its k-th probability (an upper bound on that token's
    probability, so the KL is not overestimated)."""
    p = {int(t[1]): math.exp(t[0]) for t in ref}
    q_top = {int(t[1]): math.exp(t[0]) for t in other}
    q_kth = min(q_top.values()) if q_top else 1e-10
    missing = [t for t in p if t not in q_top]
    q_resid = max(1.0 - sum(q_top.values()), 1e-10)
    q = {t: q_top[t] if t in q_top else min(q_kth, q_resid / max(1, len(missing))) for t in p}
    p_rest = max(1.0 - sum(p.values()), 1e-10)
    q_rest = max(1.0 - sum(q.values()), 1e-10)
    kl = sum(pv * (math.log(pv) - math.log(max(q[t], 1e-10))) for t, pv in p.items() if pv > 0)
    kl += p_rest * (math.log(p_rest) - math.log(q_rest))
    return max(kl, 0.0)


def fidelity(ref_ids: list[int], ref_top: list, ids: list[int], top: list) -> dict:
    """Token match (position by position over the reference's tokens) and the mean KL over the
    steps whose generated prefix is still identical (only there the distributions condition on
    the same text). Step 0 comes from the (uncompressed) prefill logits on both sides."""
    n = len(ref_ids)
    match = sum(1 for i in range(n) if i < len(ids) and ids[i] == ref_ids[i]) / max(1, n)
    same_prefix = 0
    while same_prefix < min(len(ids), n) and ids[same_prefix] == ref_ids[same_prefix]:
        same_prefix += 1
    steps = min(same_prefix + 1, len(ref_top), len(top))  # the first differing step is still comparable
    kls = [topk_kl(ref_top[i], top[i]) for i in range(steps)]
    return {"token_match": match, "kl": (sum(kls) / len(kls)) if kls else float("nan"), "kl_steps": steps,
            "first_divergence": same_prefix if same_prefix < n else None}


def add_fidelity(records: list[dict], reference: list[dict]) -> None:
    ref = {(r["task"], r["seed"], r["n_tokens"]): r for r in reference}
    for r in records:
        if r["task"] != "fidelity":
            continue
        base = ref[(r["task"], r["seed"], r["n_tokens"])]
        r.update(fidelity(base["output_ids"], base.get("top_logprobs") or [], r["output_ids"], r.get("top_logprobs") or []))


# ----------------------------------------------------------------------------------------------
# summaries, memory, comparisons
# ----------------------------------------------------------------------------------------------

def summarize(records: list[dict]) -> dict:
    """Per task: accuracy in % (mean score x 100), or fidelity token match % and mean KL."""
    out = {}
    for task in sorted({r["task"] for r in records}, key=lambda t: TASKS.index(t) if t in TASKS else 99):
        rs = [r for r in records if r["task"] == task]
        if task == "fidelity":
            kls = [r["kl"] for r in rs if "kl" in r and not math.isnan(r["kl"])]
            out[task] = {"n": len(rs), "token_match": 100 * sum(r.get("token_match", 1.0) for r in rs) / len(rs),
                         "kl": (sum(kls) / len(kls)) if kls else 0.0}
        else:
            out[task] = {"n": len(rs), "accuracy": 100 * sum(r["score"] for r in rs) / len(rs)}
    accs = [v["accuracy"] for k, v in out.items() if "accuracy" in v]
    slots = [x for x in (slots_held(r) for r in records) if x is not None]
    out["mean"] = {"accuracy": sum(accs) / len(accs) if accs else float("nan"),
                   "slots_held": sum(slots) / len(slots) if slots else float("nan")}
    return out


def summary_row(summary: Optional[dict]) -> tuple:
    """(tasks mean %, fidelity token match %, fidelity KL) of one run at one length (NaN: not run)."""
    nan = float("nan")
    if not summary:
        return nan, nan, nan
    fid = summary.get("fidelity") or {}
    return summary.get("mean", {}).get("accuracy", nan), fid.get("token_match", nan), fid.get("kl", nan)


def slots_held(rec: dict) -> Optional[int]:
    """KV slots the request's row held once compressed (its prompt's length when nothing was
    compressed); query-agnostic: after the context turn. Records of older files have only the report."""
    if rec.get("slots_held") is not None:
        return rec["slots_held"]
    report = rec.get("kv_compression")
    return report.get("slots_held") if report else rec.get("prompt_tokens")


def model_cells_per_slot() -> int:
    """``n_layers * n_kv_heads`` of the default model (from its ``config.json``)."""
    config = json.loads((default_model_path() / "config.json").read_text())
    return config["num_hidden_layers"] * config["num_key_value_heads"]


def exact_slots_held(rec: dict) -> Optional[int]:
    """KV slots the request holds under exact packing across layers (the engine since
    ``engine/cells.py``): ``shared_prefix_tokens + ceil(kept_cells / (n_layers * n_kv_heads))``;
    files recorded before it held ``max_l ceil(kept_cells_l / Hkv)`` private slots (:func:`slots_held`).
    ``n_layers * n_kv_heads`` is the report's ``private_cells / private_tokens`` (``compressed_tokens``
    in results recorded before the rename) (else the default
    model's). A prompt that was not compressed: :func:`slots_held`; a report without ``kept_cells``: None."""
    report = rec.get("kv_compression")
    if not report:
        return slots_held(rec)
    if report.get("kept_cells") is None:
        return None
    private = report.get("private_tokens", report.get("compressed_tokens"))
    per_slot = (report["private_cells"] // private if report.get("private_cells") and private
                else model_cells_per_slot())
    return report.get("shared_prefix_tokens", 0) + -(-report["kept_cells"] // per_slot)


def memory_rows(result: dict, length: int, protocol: str = "query-aware") -> list[dict]:
    """Per policy and budget (``none`` once, budget None): tasks mean %, fidelity %, KL and the mean
    slots held, recorded (:func:`slots_held`) and under exact packing (:func:`exact_slots_held`; None
    when a record has no ``kept_cells``)."""
    rows = []
    for p in result["config"]["policies"]:
        for b in [None] if p == "none" else result["config"]["budgets"]:
            run = result["runs"].get(run_key(p, b, protocol))
            recs = [r for r in (run or {}).get("records", []) if r["n_tokens"] == length]
            if not recs:
                continue
            held, exact = [slots_held(r) for r in recs], [exact_slots_held(r) for r in recs]
            acc, tm, kl = summary_row(run["summary"].get(str(length)))
            rows.append({"policy": p, "budget": b, "accuracy": acc, "token_match": tm, "kl": kl,
                         "slots_held": sum(held) / len(held) if None not in held else None,
                         "exact_slots_held": sum(exact) / len(exact) if None not in exact else None})
    return rows


def reference_samples(samples: list, per_task: Optional[int], seed0: int) -> list:
    """The first ``per_task`` samples of every task and length (all when ``None``)."""
    return [s for s in samples if per_task is None or s.seed - seed0 < per_task]


def same_outputs(a: list[dict], b: list[dict]) -> dict:
    """How often two runs produced the same greedy token ids on the same prompts."""
    bi = {(r["task"], r["seed"], r["n_tokens"]): r for r in b}
    pairs = [(r, bi.get((r["task"], r["seed"], r["n_tokens"]))) for r in a]
    pairs = [(x, y) for x, y in pairs if y is not None]
    same = sum(1 for x, y in pairs if x["output_ids"] == y["output_ids"])
    return {"identical": same, "of": len(pairs)}


def paired(a: list[dict], b: list[dict]) -> dict:
    """Sample by sample, run ``a`` against run ``b`` on the same prompts: how often ``a`` scores
    higher / the same / lower on the scored tasks, and has lower / equal / higher KL on fidelity."""
    bi = {(r["task"], r["seed"], r["n_tokens"]): r for r in b}
    out = {"score": [0, 0, 0], "kl": [0, 0, 0]}
    for r in a:
        o = bi.get((r["task"], r["seed"], r["n_tokens"]))
        if o is None:
            continue
        if "score" in r and "score" in o and not (math.isnan(r["score"]) or math.isnan(o["score"])):
            out["score"][0 if r["score"] > o["score"] else 1 if r["score"] == o["score"] else 2] += 1
        elif "kl" in r and "kl" in o and not (math.isnan(r["kl"]) or math.isnan(o["kl"])):
            out["kl"][0 if r["kl"] < o["kl"] - 1e-9 else 1 if abs(r["kl"] - o["kl"]) <= 1e-9 else 2] += 1
    return out
