"""Every ``sgl_kernel`` CPU entry point SGLang's CPU engine imports, in pure torch: what the
stand-in package ``stubs/sgl_kernel`` exports (see :mod:`lava_sglang.cpu`).

SGLang 0.5.23 imports these names from ``sgl_kernel`` at import time when its CPU engine is
selected (``SGLANG_USE_CPU_ENGINE=1``). Each function takes exactly the arguments SGLang
passes at its CPU call site (the same ones the GPU path gives its Triton kernel or CUDA op)
and writes its outputs in place. They are grouped by what they stand in for:

* :mod:`lava_sglang.cpu.kv_ops`: KV-cache bookkeeping, used by every CPU server;
* :mod:`lava_sglang.cpu.spec_tree`, :mod:`lava_sglang.cpu.spec_locs`: speculative decoding
  (EAGLE). They exist only because SGLang's CPU engine imports them at start-up whatever the
  decoding mode; KV-cache compression refuses speculative decoding.

Index tensors may have any integer dtype; values written are cast to the destination's dtype;
out-of-bounds ranges or indices raise ``ValueError`` instead of touching other rows.
"""

from __future__ import annotations

from lava_sglang.cpu.kv_ops import assign_req_to_token_pool_cpu, copy_all_layer_kv_cache_cpu
from lava_sglang.cpu.spec_locs import (
    assign_draft_cache_locs_contiguous_cpu,
    assign_extend_cache_locs_cpu,
    fill_accept_out_cache_loc_cpu,
    fill_bonus_tokens_cpu,
    rotate_input_ids_cpu,
)
from lava_sglang.cpu.spec_tree import build_tree_kernel_efficient_cpu, verify_tree_greedy_cpu

__all__ = [
    "assign_req_to_token_pool_cpu",
    "copy_all_layer_kv_cache_cpu",
    "build_tree_kernel_efficient_cpu",
    "verify_tree_greedy_cpu",
    "fill_accept_out_cache_loc_cpu",
    "fill_bonus_tokens_cpu",
    "assign_draft_cache_locs_contiguous_cpu",
    "assign_extend_cache_locs_cpu",
    "rotate_input_ids_cpu",
]
