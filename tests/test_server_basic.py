"""End to end on the real SGLang server (CPU engine, default model): the plugin serves and is visible."""

from __future__ import annotations

import pytest

from lava_sglang.launch import http_json, run_cli_and_capture

pytestmark = pytest.mark.server

LAVA = ("--kv-policy", "lava", "--kv-budget", "128")


def test_generate_and_chat_completions(servers):
    server = servers.get(*LAVA)
    out = server.generate("The capital of France is", max_new_tokens=8)
    assert "Paris" in out["text"]
    assert out["meta_info"]["completion_tokens"] == 8
    chat = http_json(server.url + "/v1/chat/completions", {
        "model": "default", "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 16, "temperature": 0,
    })
    assert "Paris" in chat["choices"][0]["message"]["content"]


def test_knobs_visible_in_server_info(servers):
    info = servers.get(*LAVA).server_info()
    assert info["kv_compression"]["kv_policy"] == "lava"
    assert info["kv_compression"]["kv_budget"] == 128
    assert info["kv_compression"]["kv_window"] == 32
    # the kernel back-ends in use (the start-up self-check runs on CUDA only): torch on the CPU engine
    kernels = info["kv_kernels"]
    assert {op: kernels[op]["impl"] for op in ("decode", "extend", "repack")} == dict.fromkeys(
        ("decode", "extend", "repack"), "torch") and kernels["selfcheck"] == "not run", kernels


@pytest.mark.parametrize("flags, words", [
    (["--page-size", "16"], "page size > 1"),
    (["--enable-hierarchical-cache"], "hierarchical cache"),
])
def test_unsupported_setting_is_refused(model_path, flags, words):
    proc = run_cli_and_capture(["--model-path", model_path, "--device", "cpu", "--attention-backend", "torch_native",
                                "--dtype", "float32", "--kv-policy", "lava", *flags], timeout=300)
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert "lava-sglang: --kv-policy lava cannot run with:" in text and words in text, text[-3000:]
