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


class _PressFanOut:
    """Forward hooks that give every press its own copy of each layer's prefill keys and values
    and run that press's own ``forward_hook`` (kvpress's code) on it, so one prefill serves
    several presses and budgets.

    Exact because kvpress compresses a layer's cache *after* the layer's attention ran over the
    full prompt: the prefill's hidden states, and the logits of its last token, do not depend on
    the press; only the cache left behind does. AdaKV keeps every key and records
    ``module.masked_key_indices`` (module state): it is saved per press and layer here and put
    back on the modules while that press decodes. Checked against one ``with press(model)``
    prefill per press in ``tests/test_kvpress_reference.py``."""

    def __init__(self, model, presses: dict):
        from transformers import DynamicCache

        self.presses = presses  # key -> kvpress press, or None for the uncompressed cache
        self.caches = {k: DynamicCache() for k in presses}
        self.masks: dict = {k: {} for k in presses}
        for press in presses.values():
            if press is not None:
                press.post_init_from_model(model)
        self.handles = [layer.self_attn.register_forward_hook(self._hook, with_kwargs=True)
                        for layer in model.model.layers]

    def _hook(self, module, input, kwargs, output):
        layer = module.layer_idx
        full = kwargs["past_key_values"].layers[layer]
        for key, press in self.presses.items():
            cache = self.caches[key]
            cache.update(full.keys, full.values, layer)  # the first write of this layer: the full prefill
            if press is None:
                continue
            module.masked_key_indices = None
            press.forward_hook(module, input, dict(kwargs, past_key_values=cache), output)
            self.masks[key][layer] = getattr(module, "masked_key_indices", None)
            module.masked_key_indices = None
        return output

    def remove(self):
        for h in self.handles:
            h.remove()


def _forward(model, cache, tokens: list[int], start: int):
    # Explicit positions: a physically compressed cache is shorter than the logical sequence
    # (kvpress's own pipeline does the same); ``cache_position`` is what kvpress's hook reads.
    pos = torch.arange(start, start + len(tokens))
    return model(input_ids=torch.tensor([tokens]), position_ids=pos[None], cache_position=pos,
                 past_key_values=cache, use_cache=True)


def _set_masks(model, masks: Optional[dict]) -> None:
    """kvpress's head-wise key masks per layer (``None``: no mask)."""
    for i, layer in enumerate(model.model.layers):
        layer.self_attn.masked_key_indices = (masks or {}).get(i)


def _greedy(model, tok, cache, logits, start: int, max_new_tokens: int, top_logprobs: int) -> tuple[list, list]:
    """Greedy decoding from the prefill's last logits; token ``i`` is fed at position ``start + i``."""
    generated, tops = [], []
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
        logits = _forward(model, cache, [nxt], start + step).logits[0, -1]
    return generated, tops


def _split_protocol(tok, context: str, question: str, protocol: str) -> tuple[list[int], list[int], list[int]]:
    """(all ids, the part compressed, the part fed afterwards uncompressed)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    ids, n_ctx = split_ids(tok, context, question)
    if protocol == "query-agnostic" and n_ctx < len(ids):
        return ids, ids[:n_ctx], ids[n_ctx:]
    return ids, ids, []


@torch.no_grad()
def hf_generate_many(model, tok, context: str, question: str, max_new_tokens: int, runs: dict,
                     protocol: str = "query-aware", window: int = 32, kernel_size: int = 7, alpha: float = 0.2,
                     top_logprobs: int = 0) -> dict:
    """One prefill, then greedy generation for every ``runs`` entry ``key -> (mode, budget)`` or
    ``(mode, budget, window)`` (default ``window``) with mode ``none``, ``kvpress-snapkv`` or
    ``kvpress-adakv``; returns ``key -> result`` (the :func:`hf_generate` shape). Same outputs
    as one :func:`hf_generate` call per entry."""
    from transformers import DynamicCache

    ids, first, rest = _split_protocol(tok, context, question, protocol)
    n = len(first)
    presses = {}
    for key, (mode, budget, *w) in runs.items():
        if mode != "none" and not mode.startswith("kvpress-"):
            raise ValueError(f"hf_generate_many: unsupported mode {mode!r} (none, kvpress-snapkv, kvpress-adakv)")
        presses[key] = None if mode == "none" else make_press(mode, budget, n, w[0] if w else window, kernel_size, alpha)
    t0 = time.perf_counter()
    fan = _PressFanOut(model, presses)
    try:
        out = _forward(model, DynamicCache(), first, 0)
    finally:
        fan.remove()
        _set_masks(model, None)
    prefill_s = time.perf_counter() - t0
    results = {}
    for key in runs:
        t1 = time.perf_counter()
        cache = fan.caches[key]
        _set_masks(model, fan.masks[key])
        try:
            logits = (_forward(model, cache, rest, n) if rest else out).logits[0, -1]
            generated, tops = _greedy(model, tok, cache, logits, len(ids), max_new_tokens, top_logprobs)
        finally:
            _set_masks(model, None)  # never leak masks into the next run
        info = {"prompt_tokens": len(ids), "compressed_tokens": n if presses[key] is not None else 0,
                "protocol": protocol, "prefill_s": round(prefill_s, 3), "decode_s": round(time.perf_counter() - t1, 3)}
        results[key] = {"text": tok.decode(generated, skip_special_tokens=True), "output_ids": generated,
                        "top_logprobs": tops, "info": info}
    return results


@torch.no_grad()
def hf_generate(model, tok, context: str, question: str, max_new_tokens: int, mode: str = "none", budget: int = 128,
                protocol: str = "query-aware", window: int = 32, kernel_size: int = 7, alpha: float = 0.2,
                pooling: str = "avg", top_logprobs: int = 0) -> dict:
    """Greedy generation with the given compression; returns text, ids, kept info, timings.

    ``top_logprobs > 0`` also returns, per generated token, the top-k (logprob, token id) of the
    distribution it was drawn from (the server's ``output_top_logprobs`` shape)."""
    from transformers import DynamicCache

    from lava_sglang.config import CompressionConfig

    ids, first, rest = _split_protocol(tok, context, question, protocol)
    n = len(first)
    cache = DynamicCache()
    t0 = time.perf_counter()
    info = {"prompt_tokens": len(ids), "compressed_tokens": 0, "protocol": protocol}
    press = make_press(mode, budget, n, window, kernel_size, alpha) if mode.startswith("kvpress-") else None
    masks = None
    if press is not None:
        with press(model):
            out = _forward(model, cache, first, 0)
        masks = {i: getattr(layer.self_attn, "masked_key_indices", None) for i, layer in enumerate(model.model.layers)}
        info["compressed_tokens"] = n
    elif mode.startswith("ours-") and n > budget:
        cfg = CompressionConfig(policy=mode[len("ours-"):], budget=budget, window=window, pooling=pooling,
                                kernel_size=kernel_size, floor_alpha=alpha).validate()
        capture = _QueryCapture(model, window)
        try:
            out = _forward(model, cache, first, 0)
        finally:
            capture.remove()
        sel, mask_list = _ours_select(model, cache, capture, cfg)
        masks = dict(enumerate(mask_list))
        info["compressed_tokens"] = n
        info["kept_cells"] = sel.kept_cells
    else:
        if mode != "none" and not mode.startswith(("ours-", "kvpress-")):
            raise ValueError(f"unknown mode {mode!r}")
        out = _forward(model, cache, first, 0)
    _set_masks(model, masks)
    try:
        if rest:
            out = _forward(model, cache, rest, n)
        prefill_s = time.perf_counter() - t0
        generated, tops = _greedy(model, tok, cache, out.logits[0, -1], len(ids), max_new_tokens, top_logprobs)
    finally:
        _set_masks(model, None)  # never leak masks into the next prompt
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
