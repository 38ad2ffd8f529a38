"""The --kv-* flags: parsing, validation (exit status 2, message names the flag), --help."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lava_sglang.config import CompressionConfig, ConfigError


@pytest.fixture(scope="module")
def prepare():
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import prepare_server_args

    load_plugins()
    return lambda *flags: prepare_server_args(["--model-path", "dummy", *flags])


def test_defaults_reach_the_record(prepare):
    from lava_sglang.server_args_patch import config_of

    config = config_of(prepare())
    assert config == CompressionConfig()
    assert config.policy == "none"


def test_values_reach_the_record(prepare):
    from lava_sglang.server_args_patch import config_of

    args = prepare("--kv-policy", "lava", "--kv-budget", "256", "--kv-window", "16", "--kv-pooling", "avg",
                   "--kv-kernel-size", "5", "--kv-floor-alpha", "0.5", "--kv-pyramid-beta", "10",
                   "--kv-min-prompt-len", "100")
    config = config_of(args)
    assert config == CompressionConfig("lava", 256, 16, "avg", 5, 0.5, 10.0, 100)
    # Survives the pickling SGLang does to hand the record to the scheduler process.
    import pickle

    assert config_of(pickle.loads(pickle.dumps(args))) == config


def test_parking_flags_reach_the_record_and_stay_server_wide(prepare):
    from lava_sglang.server_args_patch import config_of

    assert config_of(prepare("--kv-policy", "lava")).park is True
    config = config_of(prepare("--kv-policy", "lava", "--no-kv-park", "--kv-park-max-slots", "5000"))
    assert config.park is False and config.park_max_slots == 5000
    assert config.with_overrides({"kv_park": True}).park is True
    with pytest.raises(ConfigError, match="kv_park_max_slots.*server-wide"):
        config.with_overrides({"kv_park_max_slots": 10})
    with pytest.raises(ConfigError, match="kv_park: must be true or false"):
        config.with_overrides({"kv_park": "yes"})


def test_compression_turns_off_what_it_cannot_run_with(prepare):
    assert prepare("--kv-policy", "snapkv").disable_decode_cuda_graph is True
    assert prepare("--kv-policy", "snapkv", "--enable-mixed-chunk").enable_mixed_chunk is False
    assert prepare().disable_decode_cuda_graph is False
    assert prepare("--enable-mixed-chunk").enable_mixed_chunk is True  # policy none: SGLang unchanged


def test_unsupported_settings_are_named():
    from types import SimpleNamespace

    from lava_sglang.engine.startup_checks import unsupported_settings

    ok = SimpleNamespace(tp_size=1, pp_size=1, speculative_algorithm=None, page_size=1, enable_hierarchical_cache=False,
                         enable_mixed_chunk=False, enable_streaming_session=False, cuda_graph_config=None, device="cpu")
    assert unsupported_settings(ok) == []
    for field, value, words in (("tp_size", 2, "tensor parallelism"), ("pp_size", 2, "pipeline parallelism"),
                                ("speculative_algorithm", "EAGLE", "speculative decoding"), ("page_size", 16, "page size"),
                                ("enable_hierarchical_cache", True, "hierarchical cache"), ("enable_mixed_chunk", True, "mixed chunk")):
        bad = SimpleNamespace(**{**vars(ok), field: value})
        problems = unsupported_settings(bad)
        assert len(problems) == 1 and words in problems[0], problems
    # streaming sessions continue over the compressed cache (engine.continuation): allowed
    assert unsupported_settings(SimpleNamespace(**{**vars(ok), "enable_streaming_session": True})) == []
    graphs = SimpleNamespace(decode=SimpleNamespace(backend="full"))
    cuda = SimpleNamespace(**{**vars(ok), "device": "cuda", "cuda_graph_config": graphs})
    assert "decode CUDA graphs" in unsupported_settings(cuda)[0]


@pytest.mark.parametrize(
    "flags, flag, words",
    [
        (["--kv-budget", "32"], "--kv-budget", "larger than the window"),
        (["--kv-budget", "16", "--kv-window", "16"], "--kv-budget", "larger than the window"),
        (["--kv-window", "-1"], "--kv-window", "negative"),
        (["--kv-budget", "-5"], "--kv-budget", "negative"),
        (["--kv-min-prompt-len", "-1"], "--kv-min-prompt-len", "negative"),
        (["--kv-park-max-slots", "-1"], "--kv-park-max-slots", "negative"),
        (["--kv-floor-alpha", "1.5"], "--kv-floor-alpha", "[0, 1]"),
        (["--kv-floor-alpha", "-0.1"], "--kv-floor-alpha", "[0, 1]"),
        (["--kv-kernel-size", "4"], "--kv-kernel-size", "odd"),
        (["--kv-pyramid-beta", "0.5"], "--kv-pyramid-beta", "[1, 1000]"),
        (["--kv-window", "0"], "--kv-window", "at least 1"),
        (["--kv-kernel-size", "0"], "--kv-kernel-size", "odd"),
        (["--kv-kernel-size", "-3"], "--kv-kernel-size", "negative"),
    ],
)
def test_invalid_values_exit_2_naming_the_flag(prepare, capsys, flags, flag, words):
    with pytest.raises(SystemExit) as exc:
        prepare(*flags)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and words in err, err


@pytest.mark.parametrize("flags, flag", [(["--kv-policy", "h2o"], "--kv-policy"), (["--kv-pooling", "min"], "--kv-pooling"),
                                         (["--kv-budget", "many"], "--kv-budget"),
                                         (["--kv-floor-alpha", "abc"], "--kv-floor-alpha")])
def test_unknown_choices_and_types_exit_2(prepare, capsys, flags, flag):
    with pytest.raises(SystemExit) as exc:
        prepare(*flags)
    assert exc.value.code == 2
    assert flag in capsys.readouterr().err


def test_help_lists_the_flags():
    out = subprocess.run([sys.executable, "-m", "sglang.launch_server", "--help"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    for flag in ("--kv-policy", "--kv-budget", "--kv-window", "--kv-pooling", "--kv-kernel-size", "--kv-floor-alpha",
                 "--kv-pyramid-beta", "--kv-min-prompt-len"):
        assert flag in out.stdout
    assert "{none,streamingllm,snapkv,pyramidkv,adakv,lava}" in out.stdout


def test_per_request_overrides_validate_with_request_keys():
    base = CompressionConfig(policy="lava")
    assert base.with_overrides({"kv_budget": 256}).budget == 256
    with pytest.raises(ConfigError, match="kv_budget"):
        base.with_overrides({"kv_budget": 8})
    with pytest.raises(ConfigError, match="kv_bugdet"):
        base.with_overrides({"kv_bugdet": 256})
    with pytest.raises(ConfigError, match="kv_policy"):
        base.with_overrides({"kv_policy": "h2o"})
    with pytest.raises(ConfigError, match="kv_budget"):
        base.with_overrides({"kv_budget": "256"})


def test_hooks_needed_only_with_compression_leave_sglang_alone_under_none(monkeypatch):
    """``plugin.gated``: under ``--kv-policy none`` an AROUND hook calls SGLang's original and a
    BEFORE or AFTER hook changes nothing; with a policy the hook runs."""
    import json

    from lava_sglang.plugin import gated, hook_specs
    from lava_sglang.server_args_patch import ENV_VAR

    calls = []
    around = gated(lambda original, x: calls.append("hook") or "hooked", "AROUND")
    after = gated(lambda result, x: calls.append("after") or "changed", "AFTER")
    before = gated(lambda x: calls.append("before") or ((x + 1,), {}), "BEFORE")
    for policy, expected in (("none", ("original", None, None)), ("lava", ("hooked", "changed", ((2,), {})))):
        monkeypatch.setenv(ENV_VAR, json.dumps({"policy": policy}))
        assert (around(lambda x: "original", 1), after("result", 1), before(1)) == expected
    assert calls == ["hook", "after", "before"]
    always = {target.rsplit(".", 2)[-2] + "." + target.rsplit(".", 1)[-1] for target, _, _, gate in hook_specs() if not gate}
    # what runs under none: the flags, the start-up report, the tokenizer-side checks that protect the scheduler
    assert always == {"ServerArgs.add_cli_args", "ServerArgs.from_cli_args", "ServerArgs.resolve_once",
                      "SamplingParams.verify", "TokenizerManager._validate_one_request", "Scheduler.__init__",
                      "Scheduler.get_init_info", "SchedulerInternalStateController.get_internal_state"}, always
