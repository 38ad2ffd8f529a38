"""What compression cannot run with is refused at start-up, one line each (issue 35, item 1). CPU,
no server: the settings as the CLI builds them (``prepare_server_args`` with the plugin's hooks)
and SGLang's own resolved view; the model checks on SGLang's real ``RadixAttention`` layers in a
stand-in model, through the scheduler start hook (``engine.startup.after_scheduler_init``) on a
stand-in scheduler. ``--kv-policy none`` is never refused.
"""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch

from lava_sglang.config import CompressionConfig
from lava_sglang.engine import startup
from lava_sglang.engine.startup_checks import attention_layers, unsupported_model, unsupported_settings


@pytest.fixture(scope="module")
def settings_problems():
    from sglang.srt.arg_groups.model_override_base import resolving_view
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import prepare_server_args

    load_plugins()
    return lambda *flags: unsupported_settings(resolving_view(prepare_server_args(
        ["--model-path", "dummy", "--device", "cpu", "--kv-policy", "lava", *flags])))


@pytest.mark.parametrize("dtype", ["fp8_e4m3", "fp8_e5m2", "mxfp8", "nvfp4", "fp4_mx_block16"])
def test_a_quantized_kv_cache_is_refused(settings_problems, dtype):
    problems = settings_problems("--kv-cache-dtype", dtype)
    assert len(problems) == 1 and f"--kv-cache-dtype {dtype}" in problems[0] and "quantized" in problems[0], problems


@pytest.mark.parametrize("dtype", ["auto", "bf16", "bfloat16"])
def test_float_kv_caches_are_not_refused(settings_problems, dtype):
    assert settings_problems("--kv-cache-dtype", dtype) == []


def test_dfs_weight_schedule_policy_is_refused(settings_problems):
    """Found by the soak: SGLang's dfs-weight sort hands the tree core the virtual node of a request
    that continues a parked conversation (or a session), which raises and kills the scheduler."""
    problems = settings_problems("--schedule-policy", "dfs-weight")
    assert len(problems) == 1 and "--schedule-policy dfs-weight" in problems[0], problems
    assert settings_problems("--schedule-policy", "lof") == []


def test_a_bad_kernel_choice_is_refused(settings_problems, monkeypatch):
    monkeypatch.setenv("LAVA_KERNEL_IMPL", "cuda")
    problems = settings_problems()
    assert len(problems) == 1 and "LAVA_KERNEL_IMPL='cuda'" in problems[0] and "triton" in problems[0], problems
    monkeypatch.setenv("LAVA_KERNEL_IMPL", "torch")
    assert settings_problems() == []


def test_pd_disaggregation_is_refused(settings_problems):
    problems = settings_problems("--disaggregation-mode", "prefill")
    assert len(problems) == 1 and "PD disaggregation (--disaggregation-mode prefill" in problems[0], problems


def _model(logit_cap=0.0, window=None, n_layers=4):
    from sglang.srt.layers.radix_attention import RadixAttention

    return torch.nn.ModuleList([torch.nn.ModuleDict({"attn": RadixAttention(
        4, 16, 0.25, 2, layer_id=i, logit_cap=logit_cap, sliding_window_size=window if i % 2 else None)})
        for i in range(n_layers)])


def test_model_checks_find_softcap_and_sliding_windows():
    assert len(attention_layers(_model())) == 4
    assert unsupported_model(attention_layers(_model())) == []
    capped = unsupported_model(attention_layers(_model(logit_cap=50.0)))
    assert len(capped) == 1 and "logit soft-capping (logit_cap 50 in 4 layer(s)" in capped[0], capped
    windowed = unsupported_model(attention_layers(_model(window=4096)))
    assert len(windowed) == 1 and "sliding-window attention (window 4096 in 2 layer(s)" in windowed[0], windowed
    assert len(unsupported_model(attention_layers(_model(logit_cap=30.0, window=4096)))) == 2
    hybrid = unsupported_model([], hybrid_swa=True)
    assert len(hybrid) == 1 and "hybrid sliding-window KV pool" in hybrid[0], hybrid


def _scheduler(model, policy="lava", hybrid=False):
    pool = SimpleNamespace(k_buffer=[torch.zeros(16, 2, 16, dtype=torch.float32)])
    args = SimpleNamespace(device="cpu", _lava_kv_config=json.dumps(dataclasses.asdict(CompressionConfig(policy=policy))))
    return SimpleNamespace(server_args=args, tp_size=1, tp_worker=SimpleNamespace(model_runner=SimpleNamespace(model=model)),
                           token_to_kv_pool_allocator=SimpleNamespace(get_kvcache=lambda: pool),
                           model_config=SimpleNamespace(get_num_attention_heads=lambda tp: 4, is_hybrid_swa=hybrid))


def test_scheduler_start_refuses_such_a_model_with_one_line(capsys):
    sched = _scheduler(_model(logit_cap=50.0, window=4096))
    with pytest.raises(SystemExit) as exc:
        startup.after_scheduler_init(None, sched, sched.server_args, None)
    assert exc.value.code == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("lava-sglang: --kv-policy lava cannot run with: attention logit soft-capping")
    assert "sliding-window attention" in lines[0]
    hybrid = _scheduler(_model(), hybrid=True)
    with pytest.raises(SystemExit):
        startup.after_scheduler_init(None, hybrid, hybrid.server_args, None)


def test_scheduler_start_accepts_a_plain_model_and_none_anything():
    plain = _scheduler(_model())
    startup.after_scheduler_init(None, plain, plain.server_args, None)
    assert startup.after_get_init_info({}, plain)["kv_kernels"]["decode"] == {"impl": "torch"}
    off = _scheduler(_model(logit_cap=50.0, window=4096), policy="none", hybrid=True)
    startup.after_scheduler_init(None, off, off.server_args, None)  # --kv-policy none: never refused
    assert "kv_kernels" not in startup.after_get_init_info({}, off)
