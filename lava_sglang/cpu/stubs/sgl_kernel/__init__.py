"""Pure-torch stand-in for the CPU entry points of ``sgl_kernel`` (installed by lava-sglang).

Only loaded when SGLang's CPU engine is selected and the real ``sgl_kernel`` cannot load
(see ``lava_sglang.cpu``). Everything here is implemented in :mod:`lava_sglang.cpu.sgl_kernel_ops`.
"""

from lava_sglang.cpu.sgl_kernel_ops import (  # noqa: F401
    assign_draft_cache_locs_contiguous_cpu,
    assign_extend_cache_locs_cpu,
    assign_req_to_token_pool_cpu,
    build_tree_kernel_efficient_cpu,
    copy_all_layer_kv_cache_cpu,
    fill_accept_out_cache_loc_cpu,
    fill_bonus_tokens_cpu,
    rotate_input_ids_cpu,
    verify_tree_greedy_cpu,
)

__version__ = "0.0.0+lava-sglang-cpu-stand-in"
LAVA_SGLANG_STAND_IN = True


def __getattr__(name):
    raise AttributeError(
        f"sgl_kernel.{name} is not available: this is lava-sglang's CPU stand-in for sgl_kernel, "
        "which implements only the entry points SGLang's CPU engine uses"
    )
