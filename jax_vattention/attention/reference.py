"""Plain-jnp references for the kernels, safe on a sparsely mapped cache.

They never touch memory past a row's length: positions ``[0, W)`` of a fixed
window are *clipped* to ``length - 1`` before the gather (so every gathered token
is a valid one) and the clipped duplicates are masked out of the softmax. Only
the ``[B, W, Hkv, D]`` window is gathered, never a whole slot, and all maths is
fp32. Requirements: ``lengths >= 1`` and valid (non-negative) slots.

Caches are ``[MB, S, Hkv, D]`` or an interleaved group ``[MB, S, g, 2, Hkv, D]`` /
``[MB, S, E, Hkv, D]`` with static ``k_entry``/``v_entry`` (see common.py); the
gather reads only the layer's own entry of each token.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from . import common


def gather_window(cache, slots, lengths, window: int, entry: int = 0):
    """``cache[slots[b], min(t, len_b - 1), entry]`` for ``t < window``: ``[B, W, Hkv, D]``.

    ``cache`` is ``[MB, S, Hkv, D]`` (``entry`` 0) or a group (common.py). Reads only
    tokens below each row's length, and of them only ``entry``. Also returns the
    ``[B, W]`` mask of positions that are real (``t < len_b``).
    """
    pos = jnp.arange(window, dtype=jnp.int32)[None, :]
    idx = jnp.minimum(pos, jnp.maximum(lengths[:, None], 1) - 1)  # [B, W]
    return cache[common.kv_index(cache, slots[:, None], idx, entry)], pos < lengths[:, None]


def _attend(q, k, v, mask, sm_scale, soft_cap):
    """q [B, T, Hq, D]; k/v [B, W, Hkv, D]; mask [B, T, W] -> [B, T, Hq, D] fp32."""
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    qf = q.astype(jnp.float32).reshape(b, t, hkv, g, d)
    s = jnp.einsum("btkgd,bwkd->bkgtw", qf, k.astype(jnp.float32), precision="highest") * sm_scale
    s = common.capped_logits(s, soft_cap)
    s = jnp.where(mask[:, None, None], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("bkgtw,bwkd->btkgd", p, v.astype(jnp.float32), precision="highest")
    return o.reshape(b, t, hq, d)


def decode_attention_reference(q, k_cache, v_cache, slots, lengths, *, sm_scale=None, soft_cap=None, max_len=None,
                               k_entry=0, v_entry=0):
    """Reference for ``decode_attention`` (same arguments and semantics; also fp32 caches, any head_dim)."""
    mb, seq, _, _ = common.check_cache(k_cache, v_cache, kernel=False, k_entry=k_entry, v_entry=v_entry)
    common.check_rows("slots", slots, q.shape[0])
    common.check_rows("lengths", lengths, q.shape[0])
    common.check_row_values(mb, seq, slots, padding_rows=False, lengths=lengths)
    return _decode_reference(q, k_cache, v_cache, slots, lengths, sm_scale=sm_scale, soft_cap=soft_cap,
                             max_len=max_len, k_entry=int(k_entry), v_entry=int(v_entry))


def chunked_prefill_attention_reference(q, k_cache, v_cache, slots, starts, q_lens, *, sm_scale=None,
                                        soft_cap=None, max_len=None, k_entry=0, v_entry=0):
    """Reference for ``chunked_prefill_attention`` (padded ``q [B, Tmax, Hq, D]``; also fp32 caches).

    Query ``t < q_lens[b]`` of row b sits at absolute position ``starts[b] + t``
    and attends to cache tokens ``[0, starts[b] + t]``. Padding queries
    (``t >= q_lens[b]``) give zeros. ``max_len`` bounds ``starts + q_lens``.
    """
    mb, seq, _, _ = common.check_cache(k_cache, v_cache, kernel=False, k_entry=k_entry, v_entry=v_entry)
    for name, x in (("slots", slots), ("starts", starts), ("q_lens", q_lens)):
        common.check_rows(name, x, q.shape[0])
    common.check_row_values(mb, seq, slots, padding_rows=False, starts=starts, q_lens=q_lens,
                            **{"starts + q_lens": starts + q_lens})
    return _prefill_reference(q, k_cache, v_cache, slots, starts, q_lens, sm_scale=sm_scale, soft_cap=soft_cap,
                              max_len=max_len, k_entry=int(k_entry), v_entry=int(v_entry))


@functools.partial(jax.jit, static_argnames=("sm_scale", "soft_cap", "max_len", "k_entry", "v_entry"))
def _decode_reference(q, k_cache, v_cache, slots, lengths, *, sm_scale=None, soft_cap=None, max_len=None,
                      k_entry=0, v_entry=0):
    _, seq, hkv, d = common.check_cache(k_cache, v_cache, kernel=False, k_entry=k_entry, v_entry=v_entry)
    common.check_heads(q.shape[1], hkv)
    window = seq if max_len is None else min(int(max_len), seq)
    lengths = jnp.minimum(lengths, window)
    k, mask = gather_window(k_cache, slots, lengths, window, k_entry)  # [B, W, Hkv, D]
    v, _ = gather_window(v_cache, slots, lengths, window, v_entry)
    o = _attend(q[:, None], k, v, mask[:, None, :], common.default_sm_scale(d, sm_scale), soft_cap)
    return o[:, 0].astype(q.dtype)


@functools.partial(jax.jit, static_argnames=("sm_scale", "soft_cap", "max_len", "k_entry", "v_entry"))
def _prefill_reference(q, k_cache, v_cache, slots, starts, q_lens, *, sm_scale=None, soft_cap=None, max_len=None,
                       k_entry=0, v_entry=0):
    _, seq, hkv, d = common.check_cache(k_cache, v_cache, kernel=False, k_entry=k_entry, v_entry=v_entry)
    common.check_heads(q.shape[2], hkv)
    window = seq if max_len is None else min(int(max_len), seq)
    kv_lens = jnp.minimum(starts + q_lens, window)
    k, kv_mask = gather_window(k_cache, slots, kv_lens, window, k_entry)  # [B, W, Hkv, D]
    v, _ = gather_window(v_cache, slots, kv_lens, window, v_entry)
    t = jnp.arange(q.shape[1], dtype=jnp.int32)
    qpos = starts[:, None] + t[None, :]  # [B, T]
    causal = jnp.arange(window, dtype=jnp.int32)[None, None, :] <= qpos[:, :, None]
    mask = causal & kv_mask[:, None, :]
    o = _attend(q, k, v, mask, common.default_sm_scale(d, sm_scale), soft_cap)
    q_ok = t[None, :] < q_lens[:, None]
    return jnp.where(q_ok[:, :, None, None], o, 0.0).astype(q.dtype)


def unpack_rows(x, offsets, lengths, max_tokens: int):
    """Packed ``x [N, ...]`` -> padded ``[P, T, ...]`` (``T = max_tokens``): row p's tokens
    ``x[offsets[p] : offsets[p] + lengths[p]]`` first, zeros after."""
    t = jnp.arange(max_tokens, dtype=jnp.int32)
    idx = jnp.clip(offsets[:, None] + t[None, :], 0, x.shape[0] - 1)  # [P, T]
    ok = t[None, :] < lengths[:, None]
    rows = x[idx]
    return jnp.where(ok.reshape(ok.shape + (1,) * (x.ndim - 1)), rows, jnp.zeros((), x.dtype))


def pack_rows(rows, offsets, lengths, num_tokens: int):
    """Padded ``rows [P, T, ...]`` -> packed ``[N, ...]``: the inverse of ``unpack_rows``; tokens of no row are 0."""
    p, t = rows.shape[:2]
    pos = jnp.arange(t, dtype=jnp.int32)
    dst = jnp.where(pos[None, :] < lengths[:, None], offsets[:, None] + pos[None, :], num_tokens)  # [P, T]
    out = jnp.zeros((num_tokens,) + rows.shape[2:], rows.dtype)
    return out.at[dst.reshape(-1)].set(rows.reshape((p * t,) + rows.shape[2:]), mode="drop")


def varlen_prefill_attention_reference(q, k_cache, v_cache, slots, starts, q_lens, q_offsets, *, max_tokens=None,
                                       sm_scale=None, soft_cap=None, max_len=None, k_entry=0, v_entry=0):
    """Reference for ``varlen_prefill_attention`` (packed ``q [N, Hq, D]``; also fp32 caches).

    The rows are unpacked to ``[P, max_tokens]`` (default ``N``; a static bound on ``q_lens``), attended as
    ``chunked_prefill_attention_reference`` does, and packed back. Tokens of no row give 0.
    """
    mb, seq, _, _ = common.check_cache(k_cache, v_cache, kernel=False, k_entry=k_entry, v_entry=v_entry)
    for name, x in (("slots", slots), ("starts", starts), ("q_lens", q_lens), ("q_offsets", q_offsets)):
        common.check_rows(name, x, jnp.shape(slots)[0])
    common.check_row_values(mb, seq, slots, padding_rows=False, starts=starts, q_lens=q_lens,
                            **{"starts + q_lens": starts + q_lens})
    common.check_packed_rows(q.shape[0], q_offsets, q_lens)
    t = q.shape[0] if max_tokens is None else int(max_tokens)
    qp = unpack_rows(q, q_offsets, q_lens, t)  # [P, T, Hq, D]
    o = _prefill_reference(qp, k_cache, v_cache, slots, starts, q_lens, sm_scale=sm_scale, soft_cap=soft_cap,
                           max_len=max_len, k_entry=int(k_entry), v_entry=int(v_entry))
    return pack_rows(o, q_offsets, q_lens, q.shape[0])
