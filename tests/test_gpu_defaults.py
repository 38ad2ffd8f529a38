"""GPU defaults compression cannot run with: CUDA graphs (issue 32, item 5). CPU, no server.

SGLang 0.5.23 captures a decode CUDA graph by default and, on CUDA, a breakable prefill graph
(``cuda_graph_config.default_prefill_backend``); a replay runs the captured kernels, not the
``RadixAttention.forward`` the plugin wraps. The server arguments are built as the CLI builds
them (``prepare_server_args``, with the plugin's hooks), then SGLang's own resolution step
``parse_cuda_graph_config`` runs with ``sglang.srt.utils.is_cuda`` patched to True, which is what
makes ``default_prefill_backend`` choose the breakable prefill graph on a CUDA machine. (The
whole ``handle_cuda_graph_config`` cannot run here: its compatibility step loads the model's
config.) The first test shows the simulation does produce both graphs without compression.
"""

from __future__ import annotations

import logging

import pytest

from lava_sglang.engine.startup_checks import unsupported_settings


@pytest.fixture(scope="module")
def prepare():
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import prepare_server_args

    load_plugins()
    return lambda *flags: prepare_server_args(["--model-path", "dummy", "--device", "cuda", *flags])


@pytest.fixture
def resolve_on_cuda(monkeypatch):
    """The resolved view of a ServerArgs' CUDA-graph config as SGLang resolves it on CUDA."""
    import sglang.srt.utils
    from sglang.srt.arg_groups.cuda_graph_hook import parse_cuda_graph_config
    from sglang.srt.arg_groups.model_override_base import resolving_view

    monkeypatch.setattr(sglang.srt.utils, "is_cuda", lambda: True)

    def resolve(server_args):
        parse_cuda_graph_config(server_args)
        return resolving_view(server_args)

    return resolve


def backends(view):
    return view.cuda_graph_config.decode.backend, view.cuda_graph_config.prefill.backend


def test_without_compression_cuda_captures_both_graphs_and_nothing_is_refused(prepare, resolve_on_cuda):
    args = prepare("--kv-policy", "none")
    assert not args.disable_decode_cuda_graph and not args.disable_prefill_cuda_graph
    view = resolve_on_cuda(args)
    assert backends(view) == ("full", "breakable")  # SGLang's CUDA defaults, untouched


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_compression_turns_both_graphs_off_with_one_line_each(prepare, resolve_on_cuda):
    logger, handler = logging.getLogger("lava_sglang"), _Lines()  # (SGLang's logging setup may stop propagation)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        args = prepare("--kv-policy", "lava")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert args.disable_decode_cuda_graph and args.disable_prefill_cuda_graph
    view = resolve_on_cuda(args)
    assert backends(view) == ("disabled", "disabled")
    assert view.device == "cuda"
    assert unsupported_settings(view) == []
    lines = [line for line in handler.lines if "CUDA graph" in line]
    assert lines == [
        "lava-sglang: --kv-policy lava: decode CUDA graphs disabled (decode over compressed caches runs eagerly)",
        "lava-sglang: --kv-policy lava: prefill CUDA graph disabled (prefill runs eagerly, so the plugin sees "
        "every layer's attention)",
    ]
    assert all("v1" not in line for line in lines)


@pytest.mark.parametrize("flags", [
    ["--cuda-graph-backend-prefill", "breakable"],
    ["--cuda-graph-backend-prefill", "full"],
    ["--cuda-graph-config", '{"prefill": {"backend": "breakable"}}'],
    # the explicit backend wins over the plugin's off-switch (SGLang's precedence)
    ["--cuda-graph-backend-prefill", "breakable", "--disable-prefill-cuda-graph"],
])
def test_an_explicit_prefill_graph_is_refused(prepare, resolve_on_cuda, flags):
    view = resolve_on_cuda(prepare("--kv-policy", "snapkv", *flags))
    assert view.cuda_graph_config.decode.backend == "disabled"
    problems = unsupported_settings(view)
    assert len(problems) == 1, problems
    backend = view.cuda_graph_config.prefill.backend
    assert problems[0] == (f"prefill CUDA graphs (backend {backend}, asked for explicitly; a graph replay would bypass "
                           "compression: drop --cuda-graph-backend-prefill / the --cuda-graph-config entry, or pass "
                           "--disable-prefill-cuda-graph)")


def test_an_explicit_decode_graph_is_refused_and_explicit_off_is_kept(prepare, resolve_on_cuda):
    problems = unsupported_settings(resolve_on_cuda(prepare("--kv-policy", "lava", "--cuda-graph-backend-decode", "full")))
    assert len(problems) == 1 and problems[0].startswith("decode CUDA graphs (backend full") \
        and "--disable-decode-cuda-graph" in problems[0]
    args = prepare("--kv-policy", "lava", "--cuda-graph-backend-prefill", "disabled", "--cuda-graph-backend-decode", "disabled")
    assert not args.disable_prefill_cuda_graph and not args.disable_decode_cuda_graph  # asked for: left as given
    view = resolve_on_cuda(args)
    assert backends(view) == ("disabled", "disabled") and unsupported_settings(view) == []


def test_policy_none_leaves_explicit_graphs_and_flags_untouched(prepare, resolve_on_cuda):
    args = prepare("--cuda-graph-backend-prefill", "full", "--enable-mixed-chunk")
    assert args.cuda_graph_backend_prefill == "full" and args.enable_mixed_chunk
    assert not args.disable_prefill_cuda_graph and not args.disable_decode_cuda_graph
    assert backends(resolve_on_cuda(args)) == ("full", "full")


def test_no_graph_refusal_on_cpu(prepare, resolve_on_cuda):
    """The CPU engine has no CUDA graphs: whatever the config says, nothing to refuse there."""
    from types import SimpleNamespace

    view = resolve_on_cuda(prepare("--kv-policy", "lava", "--cuda-graph-backend-prefill", "breakable"))
    on_cpu = SimpleNamespace(cuda_graph_config=view.cuda_graph_config, device="cpu")
    assert unsupported_settings(on_cpu) == []
