"""Every Triton kernel compiles for real NVIDIA targets (sm_80: all variants; sm_90: bf16) to a cubin,
without a GPU: ``triton.compile`` with an explicit ``GPUTarget`` runs the whole Triton ->
TTGIR -> LLVM -> PTX -> ptxas pipeline on the CPU. This catches what the interpreter does
not (constexpr/global rules, ``tl.dot`` shape and dtype constraints, type errors of the
compiled dialect). It does not run the code: numerical checks on hardware are the
``gpu``-marked tests (``pytest -m gpu tests/test_kernels*.py`` on a CUDA machine).

The compilation runs in one subprocess without ``TRITON_INTERPRET`` (the other kernel
test modules set it before importing Triton, and then Triton's standard-library helpers
are interpreter objects that cannot be compiled). ``python tests/test_kernels_compile.py``
runs the same compilation directly and prints one JSON line per variant.
"""

import inspect
import json
import os
import subprocess
import sys

import pytest
import torch


def _variants():
    """(name, kernel body, signature of the non-constexpr args, constexprs, (backend, arch))."""
    from lava_sglang.kernels import _triton_decode as dec
    from lava_sglang.kernels import _triton_repack as rep

    ty = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}
    out = []
    for arch in (80, 90):
        # every dtype on sm_80 (Ampere: mma); bf16 only on sm_90 (Hopper: wgmma lowering)
        for dt in (("fp16", "bf16", "fp32") if arch == 80 else ("bf16",)):
            t = ty[dt]
            for D in ((64, 128) if arch == 80 else (128,)):
                sig = dict(Q=t, K=t, V=t, Indptr="*i32", Indices="*i64", MidO="*fp32", MidM="*fp32", MidL="*fp32",
                           sm_scale="fp32", G="i32", D="i32", stride_qp="i32", stride_qg="i32", stride_k="i32",
                           stride_v="i32")
                out.append((f"decode_stage1-{dt}-D{D}-sm{arch}", dec._decode_stage1, sig,
                            dict(NUM_SPLITS=4, BLOCK_G=16, BLOCK_N=32, BLOCK_D=D, FP32_DOT=dt == "fp32"), arch))
                sig = dict(MidO="*fp32", MidM="*fp32", MidL="*fp32", Out=t, G="i32", D="i32", stride_op="i32",
                           stride_og="i32")
                out.append((f"decode_stage2-{dt}-D{D}-sm{arch}", dec._decode_stage2, sig,
                            dict(NUM_SPLITS=4, BLOCK_G=16, BLOCK_D=D), arch))
            sig = dict(SrcK=t, SrcV=t, DstK=t, DstV=t, SrcIdx="*i64", DstIdx="*i64", n="i32", D="i32",
                       stride_sk="i32", stride_sv="i32", stride_dk="i32", stride_dv="i32")
            for si, di in ((True, False), (False, True)):
                out.append((f"repack-{dt}-{'gather' if si else 'scatter'}-sm{arch}", rep._move_cells, sig,
                            dict(SRC_INDEXED=si, DST_INDEXED=di, BLOCK_R=16, BLOCK_D=128), arch))
    return out


def _compile_all():
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    for name, fn, sig, constexprs, arch in _variants():
        full = {n: ("constexpr" if n in constexprs else sig[n]) for n in inspect.signature(fn).parameters}
        try:
            k = triton.compile(ASTSource(fn=JITFunction(fn), signature=full, constexprs=constexprs),
                               target=GPUTarget("cuda", arch, 32))
            res = {"name": name, "ok": len(k.asm.get("cubin", b"")) > 0, "error": ""}
        except Exception as e:  # reported per variant
            res = {"name": name, "ok": False, "error": f"{type(e).__name__}: {e}"[-2000:]}
        print(json.dumps(res), flush=True)


@pytest.fixture(scope="module")
def compiled():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, os.path.abspath(__file__)], capture_output=True, text=True, env=env,
                         timeout=900, cwd=root)
    results = {}
    for line in res.stdout.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            results[r["name"]] = r
    assert results, f"compilation subprocess failed:\n{res.stderr[-4000:]}"
    return results


def test_every_kernel_compiles_for_sm80_and_sm90(compiled):
    names = [v[0] for v in _variants()]
    missing = [n for n in names if n not in compiled]
    failed = {n: compiled[n]["error"] for n in names if n in compiled and not compiled[n]["ok"]}
    assert not missing, missing
    assert not failed, json.dumps(failed, indent=1)[:6000]


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("run without TRITON_INTERPRET=1")
    torch.set_num_threads(1)
    _compile_all()
