"""The start-up kernel self-check and its fallback (lava_sglang/kernels/selfcheck.py), on CPU.

On CPU tensors the Triton back-end runs in Triton's interpreter (``_triton_utils.kernel`` picks
it per device, as with ``TRITON_INTERPRET=1``; the variable itself is not set here, see the note
in tests/test_kernels_decode.py), so the self-check runs the real Triton kernels against the
torch twin. A deliberately broken back-end (wrong values, or an exception) must be disabled
with one warning line, after which dispatch's automatic choice on a CUDA device no longer
returns it; a broken back-end forced with ``LAVA_KERNEL_IMPL`` refuses to start instead. The
scheduler wiring (``engine.startup``) runs on a stand-in scheduler (no server).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from types import SimpleNamespace

import pytest
import torch

import lava_sglang.kernels._triton_decode as triton_decode
from lava_sglang.config import CompressionConfig
from lava_sglang.engine import startup
from lava_sglang.kernels import dispatch, selfcheck

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def clean(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    monkeypatch.delenv(selfcheck.ENV_VAR, raising=False)
    dispatch.enable_all()
    yield
    dispatch.enable_all()


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.warnings, self.infos = [], []

    def emit(self, record):
        (self.warnings if record.levelno >= logging.WARNING else self.infos).append(record.getMessage())


@pytest.fixture
def log():
    logger, handler = logging.getLogger("lava_sglang"), _Lines()  # SGLang's logging setup may stop propagation
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


def _drops_first_key(real):
    """A Triton decode with an off-by-one: every list loses its first cell."""

    def broken(q, k, v, indptr, indices, scale, **kw):
        lens = (indptr[1:] - indptr[:-1] - 1).clamp_min(0)
        keep = torch.ones(indices.numel(), dtype=torch.bool)
        keep[indptr[:-1].long()[indptr[1:] > indptr[:-1]]] = False
        shifted = torch.zeros_like(indptr)
        shifted[1:] = lens.cumsum(0)
        return real(q, k, v, shifted, indices[keep], scale)

    return broken


def _raises(*args, **kwargs):
    raise RuntimeError("CUDA error: no kernel image is available for execution on the device")


# ------------------------------------------------------------------------- (a) + (c)
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_interpreter_passes_against_the_torch_twin_and_is_timed(dtype, log):
    res = selfcheck.run_selfcheck("cpu", dtype, head_dim=64, group_size=4)
    for op in selfcheck.OPS:
        assert res[op]["checks"] == {"triton": "ok"}, res
        assert res[op]["impl"] == "torch"  # automatic choice on CPU tensors, whatever passed
        assert res[op]["ms"] > 0
    assert res["selfcheck"] == "ran" and res["device"] == "cpu" and res["kv_dtype"] == str(dtype)[6:]
    assert res["ms"] >= sum(res[op]["ms"] for op in selfcheck.OPS)
    assert dispatch.disabled() == {} and log.warnings == []
    assert len(log.infos) == 1 and log.infos[0].startswith("lava-sglang: kernel self-check on cpu")


def test_the_batch_has_uneven_per_head_lists_and_new_tokens():
    c = selfcheck.make_case(64, 4, torch.float16)
    lens = (c.pairs.kv_indptr[1:] - c.pairs.kv_indptr[:-1]).tolist()
    qo = (c.qo_indptr[1:] - c.qo_indptr[:-1]).tolist()
    assert len(lens) == 6 and len(set(lens)) >= 4 and max(lens) > 64  # several key tiles, per-head lengths
    assert lens[0] != lens[1] and lens[4] != lens[5]  # compressed requests: heads keep different counts
    assert all(0 < q <= n for q, n in zip(qo, lens)) and any(q < n for q, n in zip(qo, lens))
    assert torch.unique(c.dst).numel() == c.dst.numel() and bool((c.src[: c.dst.numel()] != c.dst).any())


# ------------------------------------------------------------------------- (b) fallback
@pytest.mark.parametrize("broken", ["wrong-values", "raises"])
def test_a_broken_backend_is_disabled_and_dispatch_falls_back(broken, monkeypatch, log):
    monkeypatch.setattr(dispatch, "flashinfer_available", lambda: False)  # CUDA choice: triton, else torch
    assert dispatch.resolve_impl("decode", "cuda", dtype=torch.float16) == "triton"
    fake = _drops_first_key(triton_decode.paged_decode_attention_triton) if broken == "wrong-values" else _raises
    monkeypatch.setattr(triton_decode, "paged_decode_attention_triton", fake)
    res = selfcheck.run_selfcheck("cpu", torch.float16, head_dim=64, group_size=2)
    why = res["decode"]["checks"]["triton"]
    assert why.startswith("failed: ")
    assert ("max |diff|" in why) if broken == "wrong-values" else ("RuntimeError: CUDA error" in why)
    assert res["extend"]["checks"] == {"triton": "ok"} and res["repack"]["checks"] == {"triton": "ok"}
    assert list(dispatch.disabled()) == [("decode", "triton")]
    assert dispatch.resolve_impl("decode", "cuda", dtype=torch.float16) == "torch"
    assert dispatch.resolve_impl("extend", "cuda", dtype=torch.float16) == "triton"
    assert dispatch.resolve_impl("decode", "cuda", "triton") == "triton"  # an explicit argument is honoured
    assert len(log.warnings) == 1
    assert log.warnings[0].startswith("lava-sglang: kernel self-check: decode 'triton' failed on cpu float16 "
                                      "(head_dim 64, group 2): ")
    # a second run does not retry it
    again = selfcheck.run_selfcheck("cpu", torch.float16, head_dim=64, group_size=2, ops=("decode",))
    assert again["decode"]["checks"]["triton"].startswith("disabled: ") and len(log.warnings) == 1


def test_fallback_goes_down_the_candidates_in_order(monkeypatch, log):
    """flashinfer cannot run on CPU tensors: as a failing first candidate it is disabled, triton
    is checked next and passes, and the automatic choice on CUDA becomes triton."""
    monkeypatch.setattr(dispatch, "flashinfer_available", lambda: True)
    assert dispatch.gpu_candidates("decode", torch.bfloat16) == ["flashinfer", "triton"]
    assert dispatch.gpu_candidates("decode", torch.float32) == ["triton"]
    assert dispatch.gpu_candidates("repack") == ["triton"]
    res = selfcheck.run_selfcheck("cpu", torch.bfloat16, head_dim=32, group_size=4,
                                  candidates={"decode": ["flashinfer", "triton"]}, ops=("decode",))
    checks = res["decode"]["checks"]
    assert list(checks) == ["flashinfer", "triton"] and checks["triton"] == "ok"
    assert checks["flashinfer"].startswith("failed: ValueError: decode: the flashinfer implementation needs CUDA")
    assert dispatch.resolve_impl("decode", "cuda", dtype=torch.bfloat16) == "triton"
    assert dispatch.resolve_impl("extend", "cuda", dtype=torch.bfloat16) == "flashinfer"
    assert len(log.warnings) == 1


def test_a_forced_backend_that_fails_refuses_instead_of_falling_back(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    monkeypatch.setattr(triton_decode, "paged_decode_attention_triton", _raises)
    with pytest.raises(selfcheck.SelfCheckError, match="decode 'triton', forced with LAVA_KERNEL_IMPL, failed on cpu"):
        selfcheck.run_selfcheck("cpu", torch.float32, head_dim=32, group_size=1)
    assert dispatch.disabled() == {}
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")  # forcing torch: nothing to check
    res = selfcheck.run_selfcheck("cpu", torch.float32, head_dim=32, group_size=1)
    assert all(res[op]["checks"] == {} and res[op]["impl"] == "torch" for op in selfcheck.OPS)


def test_disable_validates():
    with pytest.raises(ValueError):
        dispatch.disable("decode", "torch", "the twin is the last resort")
    with pytest.raises(ValueError):
        dispatch.disable("repack", "flashinfer", "no such implementation")


def test_when_it_runs(monkeypatch):
    assert selfcheck.should_run("cuda") and not selfcheck.should_run("cpu")
    monkeypatch.setenv(selfcheck.ENV_VAR, "1")
    assert selfcheck.should_run("cpu")
    monkeypatch.setenv(selfcheck.ENV_VAR, "0")
    assert not selfcheck.should_run("cuda:0")


# ------------------------------------------------------------------------- scheduler wiring
def _scheduler(policy="lava"):
    pool = SimpleNamespace(k_buffer=[torch.zeros(16, 2, 64, dtype=torch.bfloat16)])
    args = SimpleNamespace(device="cpu", _lava_kv_config=json.dumps(dataclasses.asdict(CompressionConfig(policy=policy))))
    return SimpleNamespace(server_args=args, tp_size=1,
                           token_to_kv_pool_allocator=SimpleNamespace(get_kvcache=lambda: pool),
                           model_config=SimpleNamespace(get_num_attention_heads=lambda tp: 8))


def test_startup_reports_the_backends_in_server_info(monkeypatch):
    sched = _scheduler()
    assert startup.after_scheduler_init(None, sched, sched.server_args, None) is None
    info = startup.after_get_init_info({}, sched)
    assert info["kv_compression"]["kv_policy"] == "lava"
    assert info["kv_kernels"] == {"decode": {"impl": "torch"}, "extend": {"impl": "torch"}, "repack": {"impl": "torch"},
                                  "device": "cpu", "kv_dtype": "bfloat16", "selfcheck": "not run"}
    monkeypatch.setenv(selfcheck.ENV_VAR, "1")  # forced on CPU: the Triton interpreter, the pool's shape and dtype
    startup.after_scheduler_init(None, sched, sched.server_args, None)
    kernels = startup.after_get_init_info({}, sched)["kv_kernels"]
    assert kernels["selfcheck"] == "ran" and all(kernels[op]["checks"] == {"triton": "ok"} for op in selfcheck.OPS)
    odd = _scheduler()
    del odd.model_config  # a scheduler the hook cannot read: reported, not fatal
    startup.after_scheduler_init(None, odd, odd.server_args, None)
    assert startup.after_get_init_info({}, odd)["kv_kernels"]["selfcheck"].startswith("skipped (KV pool shape unknown")
    off = _scheduler("none")
    startup.after_scheduler_init(None, off, off.server_args, None)
    assert "kv_kernels" not in startup.after_get_init_info({}, off)


def test_startup_refuses_a_failing_forced_backend(monkeypatch, capsys):
    monkeypatch.setenv(selfcheck.ENV_VAR, "1")
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    monkeypatch.setattr(triton_decode, "paged_decode_attention_triton", _raises)
    sched = _scheduler()
    with pytest.raises(SystemExit) as exc:
        startup.after_scheduler_init(None, sched, sched.server_args, None)
    assert exc.value.code == 1
    assert "forced with LAVA_KERNEL_IMPL" in capsys.readouterr().err
    monkeypatch.setenv(dispatch.ENV_VAR, "flashinfer")  # not runnable on CPU tensors: one line, not a traceback
    monkeypatch.delenv(selfcheck.ENV_VAR)
    with pytest.raises(SystemExit):
        startup.after_scheduler_init(None, sched, sched.server_args, None)
    assert "flashinfer implementation needs CUDA tensors" in capsys.readouterr().err
