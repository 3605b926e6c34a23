"""The engine's kernel dispatch: attention over a cache ``[MB, S, Hkv, D]``, kernels or jnp, chosen statically.

Either cache layout (see common.py): one layer's ``[MB, S, Hkv, D]``, or an
interleaved group ``[MB, S, g, 2, Hkv, D]`` passed as both K and V with static
``k_entry``/``v_entry``.

Two implementations, one contract (read slot ``slots[b]`` only below the row's
length, which must come from ``KVCache.write``):

* ``"kernel"``: ``jax_vattention.attention.decode_attention`` (one query per
  row) and ``chunked_prefill_attention`` (Pallas; ``interpret=True`` on CPU).
  They take bf16/fp16 caches with ``head_dim`` 64 or 128.
* ``"reference"``: the jnp functions below, fp32 maths, any cache dtype and
  head_dim. They gather a ``[B, Hkv, W, D]`` window whose positions are clipped
  below each row's length, so they never touch an unmapped page; ``W`` is
  ``AttentionSpec.max_len`` (a static bound on the context) or the cache length.
  The attention package's own ``*_reference`` functions do the same but accept
  only bf16/fp16 caches with head_dim 64/128, and the fp32 parity tests need
  fp32 caches, hence this generalisation (cross-checked against them in tests).

``"auto"`` picks the kernels on a GPU when the dtype and head_dim allow, else the
reference.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from ..manager import default_device
from . import common, reference
from .decode import decode_attention
from .prefill import chunked_prefill_attention, varlen_prefill_attention

KERNEL_DTYPES = ("bfloat16", "float16")
KERNEL_HEAD_DIMS = (64, 128)


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """Static choice of attention implementation (a jit static argument)."""

    impl: str = "auto"  # "auto" | "kernel" | "reference"
    interpret: bool = False  # run the Pallas kernels in the HLO interpreter (CPU)
    max_len: int | None = None  # static bound on any row's cached length (window / grid size)
    # KV tile of the kernels. In interpret mode over a sparsely mapped cache it must divide the tokens per page
    # (common.py; 16 for an interleaved Llama-3-8B with g=32 and 2 MiB pages); None: the kernels' default.
    block_k: int | None = None

    def __post_init__(self):
        if self.impl not in ("auto", "kernel", "reference"):
            raise ValueError(f"AttentionSpec.impl must be 'auto', 'kernel' or 'reference', got {self.impl!r}")

    def resolve(self, dtype, head_dim: int, platform: str) -> AttentionSpec:
        """Replace ``"auto"`` by what runs on ``platform`` for this dtype and head_dim."""
        kernel_ok = jnp.dtype(dtype).name in KERNEL_DTYPES and head_dim in KERNEL_HEAD_DIMS
        if self.impl == "kernel" and not kernel_ok:
            raise ValueError(
                f"the attention kernels need a {KERNEL_DTYPES} cache with head_dim in {KERNEL_HEAD_DIMS}; "
                f"got {jnp.dtype(dtype).name}, head_dim={head_dim} (use impl='reference')")
        if self.impl != "auto":
            return self
        impl = "kernel" if (platform == "gpu" and kernel_ok) else "reference"
        return dataclasses.replace(self, impl=impl)

    def kernel_block_k(self, head_dim: int, seq_len: int, tokens_per_page: int | None = None) -> int:
        """The KV tile the kernels use on slots of ``seq_len`` tokens: ``block_k``, else their default, which with
        ``tokens_per_page`` (``CacheConfig.tokens_per_page``) is also capped to divide it (common.py).
        Callers pass the result as ``block_k`` so the kernels use exactly it."""
        if self.block_k:
            return self.block_k
        return common.default_block_k(head_dim, seq_len, tokens_per_page)

    def with_max_len(self, max_len: int | None) -> AttentionSpec:
        return dataclasses.replace(self, max_len=max_len)


def default_platform() -> str:
    """Platform of the device jit places computations on (honours ``jax.default_device``)."""
    return default_device().platform


# -- jnp reference (any dtype, fp32 maths) -------------------------------------
def gather_window(cache: jax.Array, slots: jax.Array, lengths: jax.Array, window: int, entry: int = 0) -> jax.Array:
    """``cache[slots[b], min(t, len_b - 1), entry, h]`` for ``t < window``: ``[B, Hkv, W, D]``, below lengths only.

    ``cache`` is ``[MB, S, Hkv, D]`` (``entry`` 0) or a group (common.py); only the
    entry's rows are read. Gathered head-major, the layout the score and value
    products consume, so XLA needs no transposed copy of the window (which, for a
    full batch at a full-length window, is as large as a cache tensor).
    """
    pos = jnp.arange(window, dtype=jnp.int32)[None, :]  # [1, W]
    idx = jnp.minimum(pos, jnp.maximum(lengths[:, None], 1) - 1)  # [B, W]
    heads = jnp.arange(cache.shape[-2], dtype=jnp.int32)
    return cache[common.kv_index(cache, slots[:, None, None], idx[:, None, :], entry,  # [B, Hkv, W, D]
                                 heads[None, :, None])]


def _attend(q, k, v, mask, scale):
    """q [B, T, Hq, D]; k/v [B, Hkv, W, D]; mask [B, T, W] -> [B, T, Hq, D] fp32."""
    b, t, hq, d = q.shape
    hkv = k.shape[1]
    qf = q.astype(jnp.float32).reshape(b, t, hkv, hq // hkv, d).transpose(0, 2, 3, 1, 4)  # [B, Hkv, G, T, D]
    s = jnp.einsum("bkgtd,bkwd->bkgtw", qf, k.astype(jnp.float32), precision="highest") * scale
    s = jnp.where(mask[:, None, None], s, -jnp.inf)  # [B, Hkv, G, T, W]
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("bkgtw,bkwd->bkgtd", p, v.astype(jnp.float32), precision="highest")
    return o.transpose(0, 3, 1, 2, 4).reshape(b, t, hq, d)


def prefill_attention_reference(q, k_cache, v_cache, slots, starts, q_lens, *, window: int, k_entry: int = 0,
                                v_entry: int = 0):
    """Causal attention of ``q [B, T, Hq, D]`` (tokens ``starts + t``) over cache tokens ``[0, starts + q_lens)``."""
    common.check_layout(k_cache, v_cache, k_entry, v_entry)
    kv_lens = starts + q_lens  # [B]
    k = gather_window(k_cache, slots, kv_lens, window, k_entry)  # [B, Hkv, W, D]
    v = gather_window(v_cache, slots, kv_lens, window, v_entry)
    t = jnp.arange(q.shape[1], dtype=jnp.int32)
    w = jnp.arange(window, dtype=jnp.int32)
    qpos = starts[:, None] + t[None, :]  # [B, T]
    mask = (w[None, None, :] <= qpos[:, :, None]) & (w[None, None, :] < kv_lens[:, None, None])  # [B, T, W]
    o = _attend(q, k, v, mask, 1.0 / math.sqrt(q.shape[-1]))
    q_ok = t[None, :] < q_lens[:, None]
    return jnp.where(q_ok[:, :, None, None], o, 0.0).astype(q.dtype)


def decode_attention_reference(q, k_cache, v_cache, slots, lengths, *, window: int, k_entry: int = 0,
                               v_entry: int = 0):
    """Attention of one query per row ``q [B, Hq, D]`` over cache tokens ``[0, lengths)``."""
    ones = jnp.ones_like(lengths)
    return prefill_attention_reference(q[:, None], k_cache, v_cache, slots, lengths - 1, ones, window=window,
                                       k_entry=k_entry, v_entry=v_entry)[:, 0]


def dense_causal_attention(q, k, v):
    """No cache: ``q [B, T, Hq, D]`` over ``k/v [B, T, Hkv, D]`` of the same tokens, causal by index."""
    t = q.shape[1]
    causal = jnp.tril(jnp.ones((t, t), bool))
    mask = jnp.broadcast_to(causal, (q.shape[0], t, t))
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, Hkv, T, D]
    return _attend(q, k, v, mask, 1.0 / math.sqrt(q.shape[-1])).astype(q.dtype)


# -- dispatch ------------------------------------------------------------------
def cache_attention(q, k_cache, v_cache, slots, lengths, num_new, spec: AttentionSpec, *, k_entry: int = 0,
                    v_entry: int = 0):
    """Attention of the pending tokens over the cache after their K/V were written.

    ``k_cache``/``v_cache``: ``[MB, S, Hkv, D]``, or the interleaved group
    ``[MB, S, g, 2, Hkv, D]`` (or ``[MB, S, E, Hkv, D]``) twice, with this layer's K and
    V at the static entries ``k_entry = 2*(l % g)`` and ``v_entry = k_entry + 1``.
    Pass the views as they are (no reshape: common.py says why).

    q: ``[B, T, Hq, D]``; row b's first ``num_new[b]`` queries are the tokens at
    positions ``[lengths[b] - num_new[b], lengths[b])`` (``lengths`` as returned
    by the write). With ``T == 1`` this is a decode step: each row's query sits
    at ``lengths - 1`` (rows with ``num_new == 0`` give a result that is ignored).
    Returns ``[B, T, Hq, D]`` in q's dtype; padding queries give 0.
    """
    if spec.impl == "auto":
        spec = spec.resolve(k_cache.dtype, q.shape[-1], default_platform())
    window = min(spec.max_len or k_cache.shape[1], k_cache.shape[1])
    decode = q.shape[1] == 1
    entries = dict(k_entry=k_entry, v_entry=v_entry)
    if spec.impl == "kernel":
        kw = dict(max_len=spec.max_len, interpret=spec.interpret, block_k=spec.block_k, **entries)
        if decode:
            return decode_attention(q[:, 0], k_cache, v_cache, slots, lengths, **kw)[:, None]
        return chunked_prefill_attention(q, k_cache, v_cache, slots, lengths - num_new, num_new, **kw)
    if decode:
        return decode_attention_reference(q[:, 0], k_cache, v_cache, slots, lengths, window=window, **entries)[:, None]
    return prefill_attention_reference(q, k_cache, v_cache, slots, lengths - num_new, num_new, window=window,
                                       **entries)


def packed_prefill(q, k_cache, v_cache, slots, starts, q_lens, q_offsets, spec: AttentionSpec, *, max_row_tokens: int,
                   window: int, k_entry: int = 0, v_entry: int = 0):
    """Causal attention of packed rows ``q [N, Hq, D]`` (``slots/starts/q_lens/q_offsets [P]``, see
    ``prefill.varlen_prefill_attention``) with a resolved ``spec``: the varlen kernel, or the jnp reference on
    the rows unpacked to ``[P, max_row_tokens]``. Tokens of no row give 0."""
    entries = dict(k_entry=k_entry, v_entry=v_entry)
    if spec.impl == "kernel":
        return varlen_prefill_attention(q, k_cache, v_cache, slots, starts, q_lens, q_offsets, max_len=spec.max_len,
                                        interpret=spec.interpret, block_k=spec.block_k, **entries)
    qp = reference.unpack_rows(q, q_offsets, q_lens, max_row_tokens)  # [P, T, Hq, D]
    o = prefill_attention_reference(qp, k_cache, v_cache, slots, starts, q_lens, window=window, **entries)
    return reference.pack_rows(o, q_offsets, q_lens, q.shape[0])


def packed_cache_attention(q, k_cache, v_cache, slots, lengths, num_new, rows, spec: AttentionSpec, *,
                           k_entry: int = 0, v_entry: int = 0):
    """``cache_attention`` for a packed step: ``q [N, Hq, D]`` holds the rows' pending tokens flat, as
    ``rows`` (``packing.PackedRows``) lays them out; ``slots/lengths/num_new [R]`` as in ``cache_attention``.

    Rows of one token go through the decode kernel (their last query), rows of more through the varlen prefill
    kernel; neither pads a row to another's length. Returns ``[N, Hq, D]`` in q's dtype; padding tokens give 0.
    """
    if spec.impl == "auto":
        spec = spec.resolve(k_cache.dtype, q.shape[-1], default_platform())
    window = min(spec.max_len or k_cache.shape[1], k_cache.shape[1])
    entries = dict(k_entry=k_entry, v_entry=v_entry)
    q_dec, is_dec = rows.decode_queries(q, num_new)  # [R, Hq, D], [R]
    if spec.impl == "kernel":
        o_dec = decode_attention(q_dec, k_cache, v_cache, jnp.where(is_dec, slots, -1), jnp.where(is_dec, lengths, 0),
                                 max_len=spec.max_len, interpret=spec.interpret, block_k=spec.block_k, **entries)
    else:
        o_dec = decode_attention_reference(q_dec, k_cache, v_cache, slots, lengths, window=window, **entries)
    p_slots, p_starts, p_lens, p_offsets = rows.prefill_coords(slots, lengths - num_new, num_new)  # [P] each
    o_pre = packed_prefill(q, k_cache, v_cache, p_slots, p_starts, p_lens, p_offsets, spec,
                           max_row_tokens=rows.max_row_tokens, window=window, k_entry=k_entry, v_entry=v_entry)
    return rows.merge(o_pre, o_dec, is_dec)
