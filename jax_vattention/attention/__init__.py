"""Attention kernels over the vAttention cache ``[MB, S, Hkv, D]`` (issue 3).

* ``decode_attention``: one query token per row, GQA-packed, split-K (flash
  decoding) with a combine step; Pallas kernel (Triton backend, see decode.py).
* ``chunked_prefill_attention``: causal chunks over cached prefixes, padded
  ``[B, Tmax, Hq, D]`` layout (see prefill.py).
* ``*_reference``: plain-jnp fp32 references that read only within lengths.
* ``*_dpa``: the same through ``jax.nn.dot_product_attention`` (portability).
* ``dispatch``: ``AttentionSpec`` and ``cache_attention``, the static choice
  between the kernels and jnp that the caches' ``attention`` method makes.

All of them read each slot only below its length (rounded up to the KV block
for the kernels); see ``common.py`` for the page-size requirement.
"""

from .common import check_block_fits_pages, tokens_per_page
from .decode import DecodeConfig, decode_attention
from .dispatch import AttentionSpec, cache_attention, dense_causal_attention
from .portable import chunked_prefill_attention_dpa, decode_attention_dpa
from .prefill import PrefillConfig, chunked_prefill_attention
from .reference import chunked_prefill_attention_reference, decode_attention_reference
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
]
