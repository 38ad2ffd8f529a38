"""GPU kernels and their torch twins (engine-free: never imports SGLang).

* :mod:`.pair_indices`: the CSR cell lists of (request, KV head) pairs, the one index
  builder of every implementation and of the engine's layouts.
* :mod:`.decode_attention`: per-(request, KV head) decode attention over those lists.
* :mod:`.extend_attention`: the extend (prefill) counterpart, many queries per pair, causal
  aligned to the end of each list.
* :mod:`.repack`: in-place gather-then-scatter of kept cells.
* :mod:`.flashinfer_decode`, :mod:`.flashinfer_extend`: FlashInfer glue (lazy import;
  untested on hardware).
* :mod:`.dispatch`: which implementation runs (``LAVA_KERNEL_IMPL`` forces one).
* :mod:`.threads`: small CPU work on one intra-op thread.

Importing this package imports neither Triton nor FlashInfer; the Triton kernels live in
the private ``_triton_*`` modules, imported on first use.
"""

from .decode_attention import paged_decode_attention, paged_decode_attention_torch
from .dispatch import resolve_impl
from .extend_attention import paged_extend_attention, paged_extend_attention_torch
from .pair_indices import PairIndices, build_pair_indices, build_pair_indices_from_lists, gather_row_ranges
from .repack import repack_cells, repack_cells_torch, repack_layers

__all__ = [
    "PairIndices",
    "build_pair_indices",
    "build_pair_indices_from_lists",
    "gather_row_ranges",
    "paged_decode_attention",
    "paged_decode_attention_torch",
    "paged_extend_attention",
    "paged_extend_attention_torch",
    "resolve_impl",
    "repack_cells",
    "repack_cells_torch",
    "repack_layers",
]
