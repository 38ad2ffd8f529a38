"""Offline ``sglang.Engine`` users (issue 35, item 5): the same adjustments as the CLI's, and an
in-process engine that compresses and frees memory.

* ServerArgs built without the CLI (as ``sglang.Engine(**kwargs)`` builds them) with
  ``LAVA_SGLANG_KV_CONFIG`` set get exactly the CLI's adjustments, CUDA simulated (no server).
* ``lava_sglang.offline.Engine(kv_policy="lava", ...)`` on the CPU engine, in a child process
  (an engine owns scheduler processes for its lifetime): a ~700-token prompt is compressed to
  the budget, the slots are freed, and the engine's own ``/server_info`` counters say so.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import pytest

from lava_sglang.config import CompressionConfig, ConfigError
from lava_sglang.offline import split_kwargs
from lava_sglang.server_args_patch import ATTR, ENV_VAR

GRAPH_FLAGS = ("disable_decode_cuda_graph", "disable_prefill_cuda_graph", "enable_mixed_chunk")


def test_kwargs_split_and_validated():
    config, rest = split_kwargs({"kv_policy": "lava", "kv_budget": 96, "model_path": "m", "device": "cpu"})
    assert (config.policy, config.budget) == ("lava", 96) and rest == {"model_path": "m", "device": "cpu"}
    with pytest.raises(ConfigError, match="kv_budget"):
        split_kwargs({"kv_policy": "lava", "kv_budget": 0})
    with pytest.raises(ConfigError, match="kv_bugdet"):
        split_kwargs({"kv_bugdet": 64})


def test_engine_server_args_get_the_cli_adjustments(monkeypatch):
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import ServerArgs, prepare_server_args

    load_plugins()
    monkeypatch.delenv(ENV_VAR, raising=False)
    cli = prepare_server_args(["--model-path", "dummy", "--device", "cuda", "--kv-policy", "lava", "--kv-budget", "96",
                               "--enable-mixed-chunk"])
    monkeypatch.setenv(ENV_VAR, json.dumps(dataclasses.asdict(CompressionConfig(policy="lava", budget=96))))
    engine = ServerArgs(model_path="dummy", device="cuda", enable_mixed_chunk=True)  # what Engine(**kwargs) builds
    engine.resolve_once()  # what every launcher calls first
    assert {f: getattr(engine, f) for f in GRAPH_FLAGS} == {f: getattr(cli, f) for f in GRAPH_FLAGS} == {
        "disable_decode_cuda_graph": True, "disable_prefill_cuda_graph": True, "enable_mixed_chunk": False}
    assert json.loads(getattr(engine, ATTR)) == json.loads(getattr(cli, ATTR))
    monkeypatch.setenv(ENV_VAR, json.dumps(dataclasses.asdict(CompressionConfig(policy="none"))))
    plain = ServerArgs(model_path="dummy", device="cuda")
    plain.resolve_once()
    assert not plain.disable_decode_cuda_graph and not plain.disable_prefill_cuda_graph


SCRIPT = textwrap.dedent('''
    import json, sys
    from lava_sglang.offline import Engine
    from lava_sglang.workloads import default_corpus_dir, haystack, load_corpus
    from transformers import AutoTokenizer

    model = sys.argv[1]
    tok = AutoTokenizer.from_pretrained(model)
    ids = tok.encode(haystack(750, load_corpus(default_corpus_dir()), seed=33101, tokenizer=tok))[:700]
    engine = Engine(model_path=model, device="cpu", attention_backend="torch_native", dtype="float32",
                    max_total_tokens=4096, kv_policy="lava", kv_budget=64)
    try:
        out = engine.generate(input_ids=ids, sampling_params={"max_new_tokens": 8, "temperature": 0.0,
                                                               "ignore_eos": True})
        info = engine.get_server_info()
        print("RESULT " + json.dumps({"meta": out["meta_info"], "kv": info["internal_states"][0]["kv_compression"],
                                      "config": info.get("kv_compression")}))
    finally:
        engine.shutdown()
''')


@pytest.mark.server
def test_offline_engine_compresses_and_frees(model_path):
    env = {**os.environ, "SGLANG_USE_CPU_ENGINE": "1"}
    env.pop(ENV_VAR, None)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, model_path], env=env, capture_output=True, text=True,
                          timeout=600)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert proc.returncode == 0 and line, (proc.stdout[-2000:], proc.stderr[-4000:])
    result = json.loads(line[len("RESULT "):])
    rep = result["meta"]["kv_compression"][0]
    assert rep["policy"] == "lava" and rep["slots_held"] <= 64 + 1 and rep["slots_freed"] >= 700 - 64 - 1, rep
    assert len(result["meta"].get("output_ids", [])) == 8 or result["meta"]["completion_tokens"] == 8, result["meta"]
    assert result["kv"]["compressed_requests"] >= 1, result["kv"]
