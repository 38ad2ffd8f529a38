"""The KV pool in one piece when a policy is active (``engine.cells``: exact packing).

``MHATokenToKVPool._create_buffers_normal`` (AROUND): with compression on and SGLang's plain
token-major layout, every layer's K and V buffers are allocated as views into one allocation,
laid out as SGLang lays out each layer (K and V halves of one block), blocks one after another:
the same bytes, the same per-layer tensors, so SGLang's own reads and writes are unchanged.
With ``--kv-policy none`` the hook calls SGLang's allocation untouched. After the allocation,
the pool's cell space is built and checked against the GPU kernels' int32 indices: a setting
that cannot work stops the scheduler at start-up with one line.

Never run on a GPU: the CUDA path differs only by ``torch.cuda.use_mem_pool`` and the memory
saver region, both kept as SGLang has them.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext

from lava_sglang.engine.settings import refuse_to_start, server_config

logger = logging.getLogger("lava_sglang")

MHA_POOL = "sglang.srt.mem_cache.memory_pool.MHATokenToKVPool"


def _refuse(message: str) -> None:
    refuse_to_start("lava-sglang: " + message)


def around_create_buffers_normal(original, self, *args, **kwargs):
    if not server_config().enabled:
        return original(self, *args, **kwargs)
    layout = getattr(self, "kv_cache_layout", "nhd")
    if layout != "nhd" or getattr(self, "use_hnd", False) or getattr(self, "is_quantized_kv_cache", False):
        _refuse(f"--kv-policy {server_config().policy} needs the token-major KV layout (this pool: {layout!r}"
                f"{', quantized' if getattr(self, 'is_quantized_kv_cache', False) else ''})")
    import torch
    from sglang.srt.constants import GPU_MEMORY_TYPE_KV_CACHE

    from lava_sglang.engine.cells import contiguous_kv_buffers

    k_shape, v_shape = self._kv_buffer_shapes()
    rows = k_shape[0]
    padded = -(-rows // self.page_size) * self.page_size
    mem_pool = torch.cuda.use_mem_pool(self.custom_mem_pool) if getattr(self, "enable_custom_mem_pool", False) else nullcontext()
    with self.memory_saver_adapter.region(GPU_MEMORY_TYPE_KV_CACHE), mem_pool:
        self.k_buffer, self.v_buffer = contiguous_kv_buffers(self.layer_num, rows, k_shape[1:], v_shape[1:],
                                                             self.store_dtype, self.device, padded_rows=padded)
    logger.info("lava-sglang: KV pool in one allocation: %d layers x %d slots x %d KV heads",
                self.layer_num, rows, k_shape[1])
    return None


def after_create_buffers(result, self, *args, **kwargs):
    """``MHATokenToKVPool._create_buffers`` (AFTER), every MHA pool class: its cell space must
    exist and fit the kernels' indices, or the scheduler stops here with one line."""
    if not server_config().enabled:
        return result
    import torch

    from lava_sglang.engine.cells import index_overflow, pool_cells

    try:
        space = pool_cells(self)
    except ValueError as exc:
        _refuse(f"--kv-policy {server_config().policy} cannot lay out this KV pool ({type(self).__name__}): {exc}")
    why = index_overflow(space.n_cells, torch.device(self.device).type)
    if why:
        _refuse(f"--kv-policy {server_config().policy} cannot run: {why}")
    return result


HOOKS = [
    (f"{MHA_POOL}._create_buffers_normal", around_create_buffers_normal, "AROUND", True),
    (f"{MHA_POOL}._create_buffers", after_create_buffers, "AFTER", True),
]
