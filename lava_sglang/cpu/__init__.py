"""CPU mode support: pure-torch stand-ins for the CPU entry points of ``sgl_kernel``.

SGLang's CPU engine (``SGLANG_USE_CPU_ENGINE=1``) imports a few CPU functions from
``sgl_kernel`` at import time. Only the CUDA build of ``sglang-kernel`` is on the package
index, and it cannot load without ``libcuda.so.1``. :func:`install_if_needed` puts the
directory ``stubs/`` (which holds a package named ``sgl_kernel``) first on ``sys.path`` and
``PYTHONPATH`` so every SGLang process (spawned children inherit both) imports the stand-in.
What the stand-in exports is gathered in :mod:`lava_sglang.cpu.sgl_kernel_ops`, from
:mod:`lava_sglang.cpu.kv_ops` (KV-cache ops), :mod:`lava_sglang.cpu.spec_tree`
and :mod:`lava_sglang.cpu.spec_locs` (speculative decoding), sharing :mod:`lava_sglang.cpu.tensor_utils`.

Why speculative stand-ins: the CPU engine imports those entry points too, speculative decoding or
not, so without them no CPU server starts. KV-cache compression refuses speculative decoding (a
compressed request never runs them); they are complete implementations nonetheless, tested
against SGLang's Triton kernels (``tests/test_cpu_kernels.py``), so a plain CPU server
(``--kv-policy none``) can use EAGLE.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from pathlib import Path

logger = logging.getLogger("lava_sglang")

STUBS_DIR = str(Path(__file__).resolve().parent / "stubs")


def cpu_engine_selected() -> bool:
    return os.environ.get("SGLANG_USE_CPU_ENGINE", "").strip().lower() in ("1", "true", "yes", "on")


def _real_sgl_kernel_loads() -> bool:
    """True when an ``sgl_kernel`` that has the CPU entry points imports in this process."""
    try:
        module = importlib.import_module("sgl_kernel")
        usable = hasattr(module, "assign_req_to_token_pool_cpu")
    except Exception:  # ImportError, OSError (missing libcuda.so.1), RuntimeError...
        usable = False
    if not usable:
        # Forget the failed or partial import so the stand-in is imported afresh.
        for name in [n for n in sys.modules if n == "sgl_kernel" or n.startswith("sgl_kernel.")]:
            sys.modules.pop(name, None)
    return usable


def install_if_needed() -> bool:
    """Make the stand-in importable when the CPU engine is selected and no usable sgl_kernel exists.

    Returns True when the stand-in is (now) in use.
    """
    if not cpu_engine_selected():
        return False
    if STUBS_DIR in sys.path:
        return True
    if _real_sgl_kernel_loads():
        return False
    sys.path.insert(0, STUBS_DIR)
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if STUBS_DIR not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([STUBS_DIR, *parts])
    logger.info("lava-sglang: CPU engine without a usable sgl_kernel: using pure-torch stand-ins from %s", STUBS_DIR)
    return True
