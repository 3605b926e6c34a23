"""Attention kernels over the vAttention cache (issues 3 and 15).

* ``decode_attention``: one query token per row, GQA-packed, split-K (flash
  decoding) with a combine step; Pallas kernel (Triton backend, see decode.py).
* ``varlen_prefill_attention``: causal chunks over cached prefixes, packed
  rows ``[N, Hq, D]`` (the engine's steps); ``chunked_prefill_attention``: the
  same kernel on the padded ``[B, Tmax, Hq, D]`` layout (see prefill.py).
* ``*_reference``: plain-jnp fp32 references that read only within lengths.
* ``*_dpa``: the same through ``jax.nn.dot_product_attention`` (portability).
* ``dispatch``: ``AttentionSpec`` and ``cache_attention``, the static choice
  between the kernels and jnp that the caches' ``attention`` method makes.

Cache layouts (common.py): every function takes one layer's K/V as today's
per-layer ``[MB, S, Hkv, D]`` tensors, or an interleaved group
(``CacheConfig.layers_per_group = g``) ``[MB, S, g, 2, Hkv, D]`` (or flattened to
``[MB, S, E, Hkv, D]``) passed as both K and V with the static entries
``k_entry=2*(l % g)``, ``v_entry=k_entry + 1``. A layer's K is then a strided
tensor (token stride ``2g * Hkv * D * itemsize``) that the kernels read in place.
Pass the views as they are: a reshape around a unit axis can make XLA copy the
whole cache.

All of them read each slot only below its length (rounded up to the KV block
for the kernels), and of an interleaved token only the layer's own entries; see
``common.py`` for the page-size requirement.

Third-party kernels and the interleaved layout (details in portable.py): only
our kernels read it in place. cuDNN through ``jax.nn.dot_product_attention`` and
FlashAttention-3 through ``flash-attn3-jax`` both take dense rank-4 arrays: the
cuDNN custom call declares default (row-major) operand layouts and XLA derives
cuDNN's strides from them; the FA3 binding computes ``compact_row_major`` strides
from the shape in C++. A jax array carries no strides, so handing either a
layer's entry means slicing it out of the group: a copy of the layer (of a
sparse cache, a read of its unmapped pages). Both underlying kernels do take
strides (cuDNN's graph API; FA3's ``k_row_stride``/``k_batch_stride``), so a
binding that passed the group array, an entry offset and the token stride could
read it in place; neither JAX binding does. As with per-layer tensors, they work
on a gathered in-length window (``*_dpa``), which is a copy either way.
"""

from .common import check_block_fits_pages, tokens_per_page
from .decode import DecodeConfig, decode_attention
from .dispatch import AttentionSpec, cache_attention, dense_causal_attention
from .portable import chunked_prefill_attention_dpa, decode_attention_dpa
from .prefill import PrefillConfig, chunked_prefill_attention, varlen_prefill_attention
from .reference import (
    chunked_prefill_attention_reference,
    decode_attention_reference,
    varlen_prefill_attention_reference,
)
from .tolerances import TOLERANCES, assert_close

__all__ = [
    "TOLERANCES",
    "AttentionSpec",
    "DecodeConfig",
    "PrefillConfig",
    "assert_close",
    "cache_attention",
    "check_block_fits_pages",
    "chunked_prefill_attention",
    "chunked_prefill_attention_dpa",
    "chunked_prefill_attention_reference",
    "decode_attention",
    "decode_attention_dpa",
    "decode_attention_reference",
    "dense_causal_attention",
    "tokens_per_page",
    "varlen_prefill_attention",
    "varlen_prefill_attention_reference",
]
