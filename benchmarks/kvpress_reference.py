"""The research-harness reference: the same prompts through HF transformers + kvpress on CPU.

Runs the float32 default model directory (the one SGLang serves) with ``attn_implementation
="sdpa"`` and greedy decoding, in one of these modes:

* ``none``          -- full cache (checks that HF and the SGLang server agree without compression)
* ``kvpress-snapkv`` -- ``SnapKVPress(window_size=w, kernel_size=k)`` (kvpress SnapKV avg-pools)
* ``kvpress-adakv``  -- ``AdaKVPress(SnapKVPress(...), alpha_safeguard=alpha)``
* ``ours-<policy>``  -- our engine-free selection (:func:`lava_sglang.policies.select_request`)
  computed from the HF prefill's post-RoPE window queries, keys and values, applied to the HF
  cache with kvpress's head-wise key masking. Same algorithm as the server, different engine:
  it separates "what the algorithm does on this model" from "what our SGLang engine does".

Budget equivalence: kvpress keeps ``n_kept = int(N * (1 - compression_ratio))`` tokens per
head *window included*, like ``--kv-budget``; ``compression_ratio = (N - budget - 0.5) / N``
makes ``n_kept == budget`` exactly. Prompts with ``N <= budget`` are not compressed (as on the
server).

Protocols: ``query-aware`` compresses the whole prompt (question inside the window, what the
server does); ``query-agnostic`` compresses the context alone, then feeds the question
uncompressed (kvpress's pipeline protocol).

Command line (a quick look at a few passkeys)::

    python benchmarks/kvpress_reference.py --modes none kvpress-snapkv ours-snapkv ours-lava --budget 128 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROTOCOLS = ("query-aware", "query-agnostic")


def load_hf(model_path: str, threads: Optional[int] = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import kvpress  # noqa: F401  (patches the attention functions for head-wise masking)

    if threads:
        torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, attn_implementation="sdpa").eval()
    return model, tok


def compression_ratio_for(budget: int, n: int) -> float:
    return (n - budget - 0.5) / n


def make_press(mode: str, budget: int, n: int, window: int = 32, kernel_size: int = 7, alpha: float = 0.2):
    from kvpress import AdaKVPress, SnapKVPress
    from kvpress.utils import compute_n_kept

    if n <= budget:
        return None
    cr = compression_ratio_for(budget, n)
    assert compute_n_kept(n, cr) == budget
    snap = SnapKVPress(compression_ratio=cr, window_size=window, kernel_size=kernel_size)
    if mode == "kvpress-snapkv":
        return snap
    if mode == "kvpress-adakv":
        return AdaKVPress(press=snap, alpha_safeguard=alpha)
    raise ValueError(mode)


def split_ids(tok, context: str, question: str) -> tuple[list[int], int]:
    """Token ids of ``context + question`` (tokenized together, as the server does) and the
    number of leading tokens that belong to the context."""
    enc = tok(context + question, return_offsets_mapping=True)
    ids = enc["input_ids"]
    n_ctx = len(ids)
    for i, (start, _end) in enumerate(enc["offset_mapping"]):
        if start >= len(context) and _end > start:
            n_ctx = i
            break
    return ids, n_ctx


class _QueryCapture:
    """Forward pre-hooks that keep each layer's attention input (last ``window`` rows) and RoPE."""

    def __init__(self, model, window: int):
        self.window = window
        self.hidden = {}
        self.pe = {}
        self.handles = []
        for i, layer in enumerate(model.model.layers):
            self.handles.append(layer.self_attn.register_forward_pre_hook(self._hook(i), with_kwargs=True))

    def _hook(self, i):
        def hook(module, args, kwargs):
            h = kwargs.get("hidden_states", args[0] if args else None)
            if h.shape[1] > 1 and i not in self.hidden:
                self.hidden[i] = h[:, -self.window:].detach()
                cos, sin = kwargs["position_embeddings"]
                self.pe[i] = (cos[:, -self.window:], sin[:, -self.window:])
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def _ours_select(model, cache, capture: _QueryCapture, cfg):
    """Our selection from the HF prefill; returns kvpress-style masked key indices per layer."""
    from kvpress.utils import get_prerope_query_states
    from transformers.models.llama.modeling_llama import rotate_half

    from lava_sglang.policies import select_request

    queries, keys, values = [], [], []
    for i, layer in enumerate(model.model.layers):
        q = get_prerope_query_states(layer.self_attn, capture.hidden[i])  # [1, Hq, w, D]
        cos, sin = capture.pe[i]
        q = q * cos.unsqueeze(1) + rotate_half(q) * sin.unsqueeze(1)
        queries.append(q[0].transpose(0, 1).contiguous())
        keys.append(cache.layers[i].keys[0].transpose(0, 1).contiguous())
        values.append(cache.layers[i].values[0].transpose(0, 1).contiguous())
    sel = select_request(cfg, queries, keys, values, 0)
    n = keys[0].shape[0]
    masks = []
    for l, heads in enumerate(sel.keep):
        hs, ss = [], []
        for h, kept in enumerate(heads):
            drop = torch.ones(n, dtype=torch.bool)
            drop[kept] = False
            idx = drop.nonzero().flatten()
            hs.append(torch.full_like(idx, h))
            ss.append(idx)
        head_idx, seq_idx = torch.cat(hs), torch.cat(ss)
        masks.append((torch.zeros_like(seq_idx), head_idx, seq_idx))
    return sel, masks


@torch.no_grad()
def hf_generate(model, tok, context: str, question: str, max_new_tokens: int, mode: str = "none", budget: int = 128,
                protocol: str = "query-aware", window: int = 32, kernel_size: int = 7, alpha: float = 0.2,
                pooling: str = "avg", top_logprobs: int = 0) -> dict:
    """Greedy generation with the given compression; returns text, ids, kept info, timings.

    ``top_logprobs > 0`` also returns, per generated token, the top-k (logprob, token id) of the
    distribution it was drawn from (the server's ``output_top_logprobs`` shape)."""
    from transformers import DynamicCache

    from lava_sglang.config import CompressionConfig

    if protocol not in PROTOCOLS:
        raise ValueError(protocol)
    ids, n_ctx = split_ids(tok, context, question)
    if protocol == "query-agnostic" and n_ctx < len(ids):
        first, rest = ids[:n_ctx], ids[n_ctx:]
    else:
        first, rest = ids, []
    n = len(first)
    cache = DynamicCache()
    t0 = time.perf_counter()

    def forward(tokens, start):
        # Explicit positions: a physically compressed cache is shorter than the logical sequence
        # (kvpress's own pipeline does the same); ``cache_position`` is what kvpress's hook reads.
        pos = torch.arange(start, start + len(tokens))
        return model(input_ids=torch.tensor([tokens]), position_ids=pos[None], cache_position=pos,
                     past_key_values=cache, use_cache=True)

    info = {"prompt_tokens": len(ids), "compressed_tokens": 0, "protocol": protocol}
    press = None
    if mode.startswith("kvpress-"):
        press = make_press(mode, budget, n, window, kernel_size, alpha)
    if press is not None:
        with press(model):
            out = forward(first, 0)
        info["compressed_tokens"] = n
    elif mode.startswith("ours-") and n > budget:
        cfg = CompressionConfig(policy=mode[len("ours-"):], budget=budget, window=window, pooling=pooling,
                                kernel_size=kernel_size, floor_alpha=alpha).validate()
        capture = _QueryCapture(model, window)
        try:
            out = forward(first, 0)
        finally:
            capture.remove()
        sel, masks = _ours_select(model, cache, capture, cfg)
        for layer, m in zip(model.model.layers, masks):
            layer.self_attn.masked_key_indices = m
        info["compressed_tokens"] = n
        info["kept_cells"] = sel.kept_cells
    else:
        if mode != "none" and not mode.startswith(("ours-", "kvpress-")):
            raise ValueError(f"unknown mode {mode!r}")
        out = forward(first, 0)
    if rest:
        out = forward(rest, n)
    prefill_s = time.perf_counter() - t0
    generated, tops = [], []
    logits = out.logits[0, -1]
    eos = tok.eos_token_id
    for step in range(max_new_tokens):
        logp = torch.log_softmax(logits.float(), dim=-1)
        nxt = int(torch.argmax(logp))
        if top_logprobs:
            v, i = torch.topk(logp, top_logprobs)
            tops.append([[float(a), int(b)] for a, b in zip(v, i)])
        generated.append(nxt)
        if nxt == eos or step == max_new_tokens - 1:
            break
        out = forward([nxt], len(ids) + step)
        logits = out.logits[0, -1]
    for layer in model.model.layers:  # never leak masks into the next prompt
        if hasattr(layer.self_attn, "masked_key_indices"):
            layer.self_attn.masked_key_indices = None
    info.update(prefill_s=round(prefill_s, 3), total_s=round(time.perf_counter() - t0, 3))
    return {"text": tok.decode(generated, skip_special_tokens=True), "output_ids": generated,
            "top_logprobs": tops, "info": info}


def main(argv=None) -> int:
    from lava_sglang.models import default_model_path
    from lava_sglang.workloads import default_corpus_dir, load_corpus

    from benchmarks.tasks import make_samples, score

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", default=None)
    ap.add_argument("--modes", nargs="+", default=["none", "kvpress-snapkv", "ours-snapkv"],
                    help="none | kvpress-snapkv | kvpress-adakv | ours-<policy>[:max|:avg] (pooling; default --pooling)")
    ap.add_argument("--budget", type=int, default=128)
    ap.add_argument("--pooling", default="avg", help="default pooling of the ours-* modes (kvpress SnapKV avg-pools)")
    ap.add_argument("--tasks", nargs="+", default=["passkey"])
    ap.add_argument("--tokens", type=int, default=1500)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--protocol", default="query-aware", choices=PROTOCOLS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--corpus", default=None)
    ap.add_argument("--out", default=None, help="write every record (ids, text, top-20 logprobs for fidelity) as JSON")
    args = ap.parse_args(argv)
    model_path = args.model_path or str(default_model_path())
    model, tok = load_hf(model_path, args.threads)
    records = []
    started = time.time()
    for task in args.tasks:
        corpus_name = "pg19" if task == "fidelity" else "paul_graham_essays"
        corpus = load_corpus(args.corpus or default_corpus_dir(corpus_name))
        for seed in args.seeds:
            s = make_samples(task, args.tokens, 1, corpus, tok, seed0=seed)[0]
            for mode in args.modes:
                name, _, pooling = mode.partition(":")
                r = hf_generate(model, tok, s.context, s.question, s.max_new_tokens, mode=name, budget=args.budget,
                                protocol=args.protocol, pooling=pooling or args.pooling,
                                top_logprobs=20 if task == "fidelity" else 0)
                rec = {"task": task, "seed": seed, "n_tokens": args.tokens, "mode": mode, "budget": args.budget,
                       "answers": s.answers, "text": r["text"], "output_ids": r["output_ids"], **r["info"]}
                if task == "fidelity":
                    rec["top_logprobs"] = r["top_logprobs"]
                else:
                    rec["score"] = score(s, r["text"])
                records.append(rec)
                print(json.dumps({k: v for k, v in rec.items() if k not in ("top_logprobs", "output_ids")}), flush=True)
                if args.out:
                    Path(args.out).write_text(json.dumps({
                        "command": "python benchmarks/kvpress_reference.py " + " ".join(sys.argv[1:] if argv is None else argv),
                        "seconds": round(time.time() - started, 1), "records": records}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
