"""Portability check (issue 3, part 3): third-party attention on the vAttention cache.

``jax.nn.dot_product_attention`` takes ``BTNH`` keys, and one slot of the
token-major cache ``[MB, S, Hkv, D]`` *is* an ``[S, Hkv, D]`` = ``TNH`` array, so
GQA attention over it needs no transpose. What it cannot do is stop at each
row's length: both implementations read the full key range they are given.
The functions here therefore hand it a ``[B, W, Hkv, D]`` window gathered with
positions clipped below each row's length (``reference.gather_window``, which
never touches unmapped memory) plus ``key_value_seq_lengths`` (decode) or an
explicit causal mask (prefill).

Which third-party kernels work on the cache, and why:

* ``jax.nn.dot_product_attention(implementation="xla")``: correct on the
  gathered window (tested on CPU). Fed the cache directly (``k_cache[slots]``)
  it would read, and XLA would copy, whole slots including unmapped pages.
* ``implementation="cudnn"`` (GPU only; bf16/fp16, D <= 128 and a multiple of
  8): same layout, works on the gathered window with ``key_value_seq_lengths``
  (padding mask). Its causal mask is top-left aligned only, so a prefill chunk
  with a prefix needs ``mask``/``bias`` or the window trick. Direct use on the
  cache is safe only when every slot is mapped up to the window (then
  ``k_cache[:B, :W]`` is a contiguous slice, i.e. slots 0..B-1 in order).
* ``jax.experimental.pallas.ops.gpu.decode_attention.gqa`` (deprecated):
  ``jnp.swapaxes`` to head-major inside, i.e. a full copy of every slot it is
  given; usable only on a gathered or dense copy, never on the sparse cache.
* ``jax.experimental.pallas.ops.gpu.paged_attention`` (deprecated): needs
  head-major pages ``[Hkv, num_pages, page_size, D]`` plus a block table;
  incompatible with the token-major layout without a copy.
* Pallas TPU ragged/paged attention: TPU only (and page-table based).

The interleaved layout (``[MB, S, g, 2, Hkv, D]``, a layer's K is entry ``2*(l%g)``
of each token, token stride ``2g * Hkv * D * itemsize``): only our kernels read it
in place. Every third-party kernel reachable from JAX takes a *dense* array:

* cuDNN through ``jax.nn.dot_product_attention(implementation="cudnn")``: the
  custom call declares Q/K/V as rank-4 BTNH/BNTH operands with the default dense
  row-major layout (``jax._src.cudnn.fused_attention_stablehlo``:
  ``operand_layouts=default_layouts(...)``), and XLA derives cuDNN's strides from
  that layout. A jax array has no strides, so ``group[:, :, entry]`` is a slice
  XLA materialises before the call: a copy of the whole layer (of the sparse
  cache: a fault or a read of unmapped pages). cuDNN's own graph API takes
  arbitrary strides, but JAX does not expose them. Usable, as for the per-layer
  layout, only on the gathered in-length window (these functions; the gather
  picks the entry, so it is the same copy as per-layer).
* FlashAttention-3 through ``flash-attn3-jax`` (``flash_mha_with_kvcache``): the
  FA3 kernel itself takes batch/row/head strides (PyTorch's
  ``flash_attn_with_kvcache`` passes ``k_cache.stride(...)`` and only needs a
  unit last stride), so it *could* read one entry of an interleaved token in
  place. The JAX binding cannot: it takes rank-4 ``k_cache``/``v_cache`` of equal
  shape through ``jax.ffi.ffi_call`` with default (dense) layouts, and its C++
  side computes ``compact_row_major`` strides from the shape ("assuming dense,
  row-major layout from JAX"). Passing an entry means slicing it out: a dense
  copy. It would need a binding that takes the whole group array plus the
  entry's offset and the token stride. Its paged mode (``page_table``) wants
  ``[num_blocks, page_size, Hkv, D]`` blocks of one layer, not interleaved tokens.
* ``jax.experimental.pallas.ops.gpu`` decode/paged attention: head-major copies
  or head-major pages, as above; no better on the interleaved layout.

Our own kernels (``decode.py``, ``prefill.py``) read the cache in place and
avoid the window copy; these functions are the slow but portable fallback.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from . import common
from .reference import gather_window


@functools.partial(jax.jit, static_argnames=("sm_scale", "max_len", "implementation", "k_entry", "v_entry"))
def decode_attention_dpa(q, k_cache, v_cache, slots, lengths, *, sm_scale=None, max_len=None, implementation=None,
                         k_entry=0, v_entry=0):
    """``decode_attention`` via ``jax.nn.dot_product_attention`` (no soft-cap; either cache layout).

    Requires ``lengths >= 1`` and valid slots (like the reference).
    """
    _, seq, hkv, d = common.check_cache(k_cache, v_cache, k_entry=k_entry, v_entry=v_entry)
    common.check_heads(q.shape[1], hkv)
    window = seq if max_len is None else min(int(max_len), seq)
    lengths = jnp.minimum(lengths, window).astype(jnp.int32)
    k, _ = gather_window(k_cache, slots, lengths, window, k_entry)  # [B, W, Hkv, D], a dense copy
    v, _ = gather_window(v_cache, slots, lengths, window, v_entry)
    o = jax.nn.dot_product_attention(
        q[:, None].astype(k.dtype), k, v, scale=common.default_sm_scale(d, sm_scale),
        key_value_seq_lengths=lengths, implementation=implementation,
    )
    return o[:, 0].astype(q.dtype)


@functools.partial(jax.jit, static_argnames=("sm_scale", "max_len", "k_entry", "v_entry"))
def chunked_prefill_attention_dpa(q, k_cache, v_cache, slots, starts, q_lens, *, sm_scale=None, max_len=None,
                                  k_entry=0, v_entry=0):
    """``chunked_prefill_attention`` via ``jax.nn.dot_product_attention`` (xla, explicit mask; either layout)."""
    _, seq, hkv, d = common.check_cache(k_cache, v_cache, k_entry=k_entry, v_entry=v_entry)
    common.check_heads(q.shape[2], hkv)
    window = seq if max_len is None else min(int(max_len), seq)
    kv_lens = jnp.minimum(starts + q_lens, window).astype(jnp.int32)
    k, kv_ok = gather_window(k_cache, slots, kv_lens, window, k_entry)  # [B, W, Hkv, D]
    v, _ = gather_window(v_cache, slots, kv_lens, window, v_entry)
    t = jnp.arange(q.shape[1], dtype=jnp.int32)
    causal = jnp.arange(window, dtype=jnp.int32)[None, None, :] <= (starts[:, None] + t[None, :])[:, :, None]
    mask = (causal & kv_ok[:, None, :])[:, None]  # [B, 1, T, W]
    o = jax.nn.dot_product_attention(
        q.astype(k.dtype), k, v, mask=mask, scale=common.default_sm_scale(d, sm_scale), implementation="xla",
    )
    q_ok = t[None, :] < q_lens[:, None]
    return jnp.where(q_ok[:, :, None, None], o, jnp.zeros((), o.dtype)).astype(q.dtype)
