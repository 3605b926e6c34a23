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

Our own kernels (``decode.py``, ``prefill.py``) read the cache in place and
avoid the window copy; these functions are the slow but portable fallback.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from . import common
from .reference import gather_window


@functools.partial(jax.jit, static_argnames=("sm_scale", "max_len", "implementation"))
def decode_attention_dpa(q, k_cache, v_cache, slots, lengths, *, sm_scale=None, max_len=None, implementation=None):
    """``decode_attention`` via ``jax.nn.dot_product_attention`` (no soft-cap).

    Requires ``lengths >= 1`` and valid slots (like the reference).
    """
    _, seq, hkv, d = common.check_cache(k_cache, v_cache)
    common.check_heads(q.shape[1], hkv)
    window = seq if max_len is None else min(int(max_len), seq)
    lengths = jnp.minimum(lengths, window).astype(jnp.int32)
    k, _ = gather_window(k_cache, slots, lengths, window)
    v, _ = gather_window(v_cache, slots, lengths, window)
    o = jax.nn.dot_product_attention(
        q[:, None].astype(k.dtype), k, v, scale=common.default_sm_scale(d, sm_scale),
        key_value_seq_lengths=lengths, implementation=implementation,
    )
    return o[:, 0].astype(q.dtype)


@functools.partial(jax.jit, static_argnames=("sm_scale", "max_len"))
def chunked_prefill_attention_dpa(q, k_cache, v_cache, slots, starts, q_lens, *, sm_scale=None, max_len=None):
    """``chunked_prefill_attention`` via ``jax.nn.dot_product_attention`` (xla, explicit mask)."""
    _, seq, hkv, d = common.check_cache(k_cache, v_cache)
    common.check_heads(q.shape[2], hkv)
    window = seq if max_len is None else min(int(max_len), seq)
    kv_lens = jnp.minimum(starts + q_lens, window).astype(jnp.int32)
    k, kv_ok = gather_window(k_cache, slots, kv_lens, window)
    v, _ = gather_window(v_cache, slots, kv_lens, window)
    t = jnp.arange(q.shape[1], dtype=jnp.int32)
    causal = jnp.arange(window, dtype=jnp.int32)[None, None, :] <= (starts[:, None] + t[None, :])[:, :, None]
    mask = (causal & kv_ok[:, None, :])[:, None]  # [B, 1, T, W]
    o = jax.nn.dot_product_attention(
        q.astype(k.dtype), k, v, mask=mask, scale=common.default_sm_scale(d, sm_scale), implementation="xla",
    )
    q_ok = t[None, :] < q_lens[:, None]
    return jnp.where(q_ok[:, :, None, None], o, jnp.zeros((), o.dtype)).astype(q.dtype)
