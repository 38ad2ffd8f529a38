"""Record greedy outputs of every policy under real compression, for the layout regression test.

Run it on the code *before* a layout change and commit the JSON; ``tests/test_layout_golden.py``
replays the same token ids on the current code and requires identical output ids (the attention
is mathematically the same whatever the memory layout). The recorded file names the commit it
was produced from. Uses only APIs that exist before exact packing (``launch.Server``, ``http_json``).

    PYTHONPATH=<worktree at the old commit> python tests/golden/record_layout_outputs.py --out tests/golden/layout_outputs.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

POLICIES = ("streamingllm", "snapkv", "pyramidkv", "adakv", "lava")
BUDGETS = (64, 128)
PROMPTS = ((900, 11, 0.4), (1500, 12, 0.7))  # (tokens, seed, passkey depth)
# The flags of tests/test_engine_server.py's LAVA server (conftest BASE_FLAGS + LAVA).
FLAGS = ("--max-total-tokens", "24576", "--log-level", "info", "--sleep-on-idle", "--kv-policy", "lava", "--kv-budget", "128")
MAX_NEW = 24


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)

    import lava_sglang
    from transformers import AutoTokenizer

    from lava_sglang.launch import Server, http_json
    from lava_sglang.models import default_model_path
    from lava_sglang.workloads import default_corpus_dir, load_corpus, passkey_task

    code_dir = Path(lava_sglang.__file__).resolve().parent.parent
    commit = subprocess.run(["git", "-C", str(code_dir), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    model = str(default_model_path())
    tok = AutoTokenizer.from_pretrained(model)
    corpus = load_corpus(default_corpus_dir())
    prompts = [tok.encode(passkey_task(n, seed=s, depth=d, corpus=corpus, tokenizer=tok).prompt) for n, s, d in PROMPTS]
    cases = []
    with Server(model, FLAGS) as server:
        for p, ids in enumerate(prompts):
            for policy in POLICIES:
                for budget in BUDGETS:
                    sp = {"max_new_tokens": MAX_NEW, "temperature": 0.0,
                          "custom_params": {"kv_policy": policy, "kv_budget": budget}}
                    out = http_json(server.url + "/generate", {"input_ids": ids, "sampling_params": sp})
                    rep = (out["meta_info"].get("kv_compression") or [None])[0]
                    if rep is None:
                        raise SystemExit(f"{policy}:{budget} on prompt {p} was not compressed: {out['meta_info']}")
                    cases.append({"prompt": p, "policy": policy, "budget": budget, "output_ids": out["output_ids"]})
                    print(f"prompt {p} ({len(ids)} tokens) {policy}:{budget} -> {out['output_ids'][:8]}...", flush=True)
    args.out.write_text(json.dumps({
        "recorded_from_commit": commit, "recorded_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "server_flags": list(FLAGS), "max_new_tokens": MAX_NEW, "corpus": corpus is not None,
        "prompts": prompts, "cases": cases}, indent=None) + "\n")
    print(f"wrote {len(cases)} cases to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
