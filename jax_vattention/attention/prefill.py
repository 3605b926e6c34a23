"""Chunked-prefill attention over the vAttention cache (Pallas, Triton backend).

The cache is one layer's K/V ``[MB, S, Hkv, D]``, or an interleaved group
``[MB, S, g, 2, Hkv, D]`` / ``[MB, S, E, Hkv, D]`` with static entries (see
common.py); read in place either way.

Two layouts of the new tokens, one kernel:

* **packed** (varlen, ``varlen_prefill_attention``): rows' tokens lie flat, one after the other, in one token
  axis, as the serving engine lays a step out (no per-row padding)::

    q          [N, Hq, D]   row p's chunk in q[q_offsets[p] : q_offsets[p] + q_lens[p]]
    slots      [P] int32    cache slot of row p (any order; < 0 = padding row)
    starts     [P] int32    tokens of row p already in the cache before this chunk
    q_lens     [P] int32    new tokens of row p (0 allowed)
    q_offsets  [P] int32    flat index of row p's first token (rows must not overlap)
    out        [N, Hq, D]   q.dtype; tokens of no row give 0

* **padded** batch-major (``chunked_prefill_attention``): ``q [B, Tmax, Hq, D]``, row b's chunk in
  ``q[b, :q_lens[b]]``, the same as packed rows at offsets ``b * Tmax``.

Query ``t`` of a row is the token at absolute position ``starts + t``; its K/V
were already written to the cache (``write(..., starts, q_lens)``), and it
attends causally to cache tokens ``[0, starts + t]``. Rows are independent,
so different sequences (different prefixes, chunk sizes) mix in one call.

Kernel: grid ``(query blocks, Hkv)`` over a block table computed on the device
(``block_table``): each row's chunk is cut into blocks of ``tokens_per_block``
tokens, so a step's grid follows its real tokens, ``sum(cdiv(q_lens, tpb))``
blocks (bounded by ``cdiv(N, tpb) + P``; the rest exit at once). GQA is packed
by folding the ``G`` query heads of a KV head into the M dimension (``q`` is
re-laid out to ``[Hkv, N * Gp, D]``, row ``r`` = token ``r // Gp``, head
``r % Gp``; only ``q`` and the output are moved, never the cache), so each
``[block_k, D]`` K/V tile is loaded once per group. A block's query tile starts
at its row's token (any offset); the output store is row-masked to the block's
own tokens. KV tiles strictly below the tile's first query position are
processed without masks; the diagonal / tail tiles are masked causally and by
length (row-masked loads on GPU, see ``common.load_kv_tile``).
Reads stop at ``starts + q_lens`` rounded up to ``block_k``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from . import common
from .common import MASK_VALUE, cdiv, next_pow2


@dataclasses.dataclass(frozen=True)
class PrefillConfig:
    block_m: int  # folded query rows per program (= tokens_per_block * group_pad)
    group_pad: int  # G rounded up to a power of two
    block_k: int
    num_warps: int
    num_stages: int

    @property
    def tokens_per_block(self) -> int:
        return self.block_m // self.group_pad


def choose_config(group, head_dim, *, block_m=None, block_k=None, num_warps=None, num_stages=None,
                  seq_len=None) -> PrefillConfig:
    gp = next_pow2(group)
    block_m = max(block_m or 128, gp, 16)
    if block_k is None:
        block_k = common.default_block_k(head_dim, seq_len)
    for name, x in (("block_m", block_m), ("block_k", block_k)):
        if x < 16 or x & (x - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {x}")
    num_warps = num_warps or (8 if block_m * head_dim >= 128 * 128 else 4)
    num_stages = num_stages or (3 if head_dim <= 128 else 2)
    return PrefillConfig(block_m, gp, block_k, num_warps, num_stages)


def _prefill_kernel(slots_ref, starts_ref, qlens_ref, offsets_ref, block_row_ref, block_q0_ref, q_ref, k_ref, v_ref,
                    o_ref, *, cfg: PrefillConfig, sm_scale: float, soft_cap, masked_loads: bool, k_entry: int,
                    v_entry: int):
    """Program ``(j, h)``: query block ``j`` of the block table (row ``block_row[j]``, its tokens
    ``[block_q0[j], + tokens_per_block)``) for KV head ``h``. ``q_ref``/``o_ref`` are the whole folded
    ``[Hkv, Nf, D]`` arrays; the block's rows start at ``(offset + q0) * group_pad``."""
    j, kv_head = pl.program_id(0), pl.program_id(1)
    row = block_row_ref[j]
    live = row >= 0
    r = jnp.maximum(row, 0)
    slot, start, qlen, offset = slots_ref[r], starts_ref[r], qlens_ref[r], offsets_ref[r]
    bm, bk, gp = cfg.block_m, cfg.block_k, cfg.group_pad
    head_dim = q_ref.shape[-1]

    t0 = jnp.where(live, block_q0_ref[j], 0)
    tile_tokens = jnp.where(live, jnp.clip(qlen - t0, 0, cfg.tokens_per_block), 0)  # real queries in this tile
    kv_len = start + qlen
    busy = tile_tokens > 0
    # Keys [0, start + t0] are visible to every query of the tile: no mask needed.
    n_full = jnp.where(busy, lax.div(start + t0 + 1, bk), 0)
    n_total = jnp.where(busy, lax.div(start + t0 + tile_tokens + bk - 1, bk), 0)

    row0 = jnp.where(live, (offset + t0) * gp, 0)  # first folded row of the tile
    q = q_ref[kv_head, pl.ds(row0, bm), :]  # [bm, D]
    qrow = lax.div(lax.broadcasted_iota(jnp.int32, (bm,), 0), gp)  # folded row -> token of the tile
    qpos = start + t0 + qrow

    def full_block(j, carry):
        pos0 = j * bk
        k = k_ref[common.kv_index(k_ref, slot, pl.ds(pos0, bk), k_entry, kv_head, slice(None))]  # [bk, D]
        v = v_ref[common.kv_index(v_ref, slot, pl.ds(pos0, bk), v_entry, kv_head, slice(None))]
        return common.online_softmax_step(carry, common.qk_logits(q, k, sm_scale, soft_cap), v, None)

    def edge_block(j, carry):
        pos0 = j * bk
        pos = pos0 + lax.broadcasted_iota(jnp.int32, (bk,), 0)
        row_ok = pos < kv_len
        k = common.load_kv_tile(k_ref, slot, pos0, k_entry, kv_head, row_ok, masked_loads)
        v = common.load_kv_tile(v_ref, slot, pos0, v_entry, kv_head, row_ok, masked_loads)
        valid = (pos[None, :] <= qpos[:, None]) & row_ok[None, :]
        return common.online_softmax_step(carry, common.qk_logits(q, k, sm_scale, soft_cap), v, valid)

    carry = (
        jnp.zeros((bm, head_dim), jnp.float32),
        jnp.full((bm,), MASK_VALUE, jnp.float32),
        jnp.zeros((bm,), jnp.float32),
    )
    carry = lax.fori_loop(0, n_full, full_block, carry)
    acc, _, row_sum = lax.fori_loop(n_full, n_total, edge_block, carry)
    out = (acc / jnp.where(row_sum > 0.0, row_sum, 1.0)[:, None]).astype(o_ref.dtype)
    # Only the tile's own tokens: the rows past them belong to the next packed row (another program).
    store_ok = jnp.broadcast_to((qrow < tile_tokens)[:, None], (bm, head_dim))
    pl_triton.store(o_ref.at[kv_head, pl.ds(row0, bm), :], out, mask=store_ok)


def block_table(q_lens, num_blocks: int, tokens_per_block: int):
    """``(block_row [NB], block_q0 [NB])``: query block ``j`` of the grid is tokens
    ``[block_q0[j], block_q0[j] + tokens_per_block)`` of row ``block_row[j]`` (-1: no block).

    Rows' last blocks come first (the grid runs the blocks with the most keys first: a shorter tail).
    ``num_blocks`` must be at least ``sum(cdiv(q_lens, tokens_per_block))``.
    """
    nblk = (q_lens + tokens_per_block - 1) // tokens_per_block  # [P]
    cum = jnp.cumsum(nblk)  # [P]
    jj = cum[-1] - 1 - jnp.arange(num_blocks, dtype=jnp.int32)  # [NB], last block first
    row = jnp.minimum(jnp.searchsorted(cum, jj, side="right"), q_lens.shape[0] - 1).astype(jnp.int32)
    q0 = (jj - (cum[row] - nblk[row])) * tokens_per_block
    live = jj >= 0
    return jnp.where(live, row, -1), jnp.where(live, q0, 0).astype(jnp.int32)


@functools.partial(
    jax.jit,
    static_argnames=("sm_scale", "soft_cap", "max_len", "interpret", "block_m", "block_k", "num_warps",
                     "num_stages", "masked_loads", "k_entry", "v_entry"),
)
def _varlen_prefill_attention(q, k_cache, v_cache, slots, starts, q_lens, q_offsets, *, sm_scale=None,
                              soft_cap=None, max_len=None, interpret=False, block_m=None, block_k=None,
                              num_warps=None, num_stages=None, masked_loads=None, k_entry=0, v_entry=0):
    """Causal attention of packed rows ``q [N, Hq, D]`` over cached prefixes (module docstring).

    Row p's queries are ``q[q_offsets[p] : q_offsets[p] + q_lens[p]]``, the tokens at positions
    ``starts[p] + t``. The cache is ``[MB, S, Hkv, D]`` or an interleaved group with static entries
    ``k_entry``/``v_entry`` (common.py). ``max_len`` (static, optional) bounds ``starts + q_lens``; rows are
    clamped to it. Padding rows (negative slot) read nothing; tokens of no row give 0. Mapping requirement:
    tokens ``[0, ceil((starts + q_lens) / block_k) * block_k)`` of each slot are mapped (common.py).
    """
    mb, seq, hkv, d = common.check_cache(k_cache, v_cache, k_entry=k_entry, v_entry=v_entry)
    if q.ndim != 3 or q.shape[-1] != d:
        raise ValueError(f"q must be [N, Hq, {d}], got {q.shape}")
    n_tok, hq, _ = q.shape
    group = common.check_heads(hq, hkv)
    rows = jnp.shape(slots)[0]
    for name, x in (("slots", slots), ("starts", starts), ("q_lens", q_lens), ("q_offsets", q_offsets)):
        common.check_rows(name, x, rows)
    limit = seq if max_len is None else min(int(max_len), seq)
    cfg = choose_config(group, d, block_m=block_m, block_k=block_k, num_warps=num_warps, num_stages=num_stages,
                        seq_len=seq)
    masked_loads = (not interpret) if masked_loads is None else masked_loads
    common.check_tiles_fit_slot(seq, cfg.block_k, masked_loads)
    scale = common.default_sm_scale(d, sm_scale)

    live = (slots >= 0) & (slots < mb)  # a slot past the cache (only possible under jit) is a padding row
    offs_c = jnp.where(live, jnp.clip(q_offsets, 0, n_tok), 0).astype(jnp.int32)
    starts_c = jnp.where(live, jnp.clip(starts, 0, limit), 0).astype(jnp.int32)
    qlens_c = jnp.where(live, jnp.clip(q_lens, 0, jnp.minimum(limit - starts_c, n_tok - offs_c)), 0).astype(jnp.int32)
    slots_c = jnp.clip(slots, 0, mb - 1).astype(jnp.int32)

    tpb, gp = cfg.tokens_per_block, cfg.group_pad
    num_blocks = cdiv(n_tok, tpb) + rows  # each row adds at most one partial block
    block_row, block_q0 = block_table(qlens_c, num_blocks, tpb)
    folded = n_tok * gp + cfg.block_m  # a tile starting at any token stays in bounds
    qf = jnp.pad(q.reshape(n_tok, hkv, group, d), ((0, 0), (0, 0), (0, gp - group), (0, 0)))
    qf = qf.transpose(1, 0, 2, 3).reshape(hkv, n_tok * gp, d)
    qf = jnp.pad(qf, ((0, 0), (0, folded - n_tok * gp), (0, 0))).astype(k_cache.dtype)  # [Hkv, Nf, D]

    kernel = functools.partial(_prefill_kernel, cfg=cfg, sm_scale=scale, soft_cap=soft_cap,
                               masked_loads=masked_loads, k_entry=int(k_entry), v_entry=int(v_entry))
    whole = pl.no_block_spec
    of = pl.pallas_call(
        kernel,
        grid=(num_blocks, hkv),
        in_specs=[whole] * 9,
        out_specs=whole,
        out_shape=jax.ShapeDtypeStruct((hkv, folded, d), q.dtype),
        compiler_params=pl_triton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name=f"vattn_prefill_bm{cfg.block_m}_bk{cfg.block_k}",
    )(slots_c, starts_c, qlens_c, offs_c, block_row, block_q0, qf, k_cache, v_cache)
    o = of[:, :n_tok * gp].reshape(hkv, n_tok, gp, d)[:, :, :group].transpose(1, 0, 2, 3).reshape(n_tok, hq, d)
    return jnp.where(covered(offs_c, qlens_c, n_tok)[:, None, None], o, jnp.zeros((), o.dtype))


def covered(offsets, lengths, num_tokens: int):
    """``[N] bool``: whether token n lies in some row ``[offsets[p], offsets[p] + lengths[p])``."""
    edges = jnp.zeros(num_tokens + 1, jnp.int32).at[offsets].add(lengths > 0, mode="drop")
    edges = edges.at[offsets + lengths].add(-(lengths > 0).astype(jnp.int32), mode="drop")
    return jnp.cumsum(edges)[:num_tokens] > 0


@functools.partial(jax.jit, static_argnames=("max_len", "interpret", "sm_scale", "soft_cap", "block_m",
                                             "block_k", "num_warps", "num_stages", "masked_loads", "k_entry",
                                             "v_entry"))
def _chunked_prefill_attention(q, k_cache, v_cache, slots, starts, q_lens, **kwargs):
    """Causal attention of new chunks ``q [B, Tmax, Hq, D]`` over cached prefixes: the padded rows as packed ones
    (row b at offset ``b * Tmax``). Padding rows (negative slot) and padding queries read nothing and give 0."""
    if q.ndim != 4:
        raise ValueError(f"q must be [B, Tmax, Hq, D], got {q.shape}")
    batch, tmax, hq, d = q.shape
    for name, x in (("slots", slots), ("starts", starts), ("q_lens", q_lens)):
        common.check_rows(name, x, batch)
    offsets = jnp.arange(batch, dtype=jnp.int32) * tmax
    q_lens = jnp.clip(q_lens, 0, tmax)
    o = _varlen_prefill_attention(q.reshape(batch * tmax, hq, d), k_cache, v_cache, slots, starts, q_lens, offsets,
                                  **kwargs)
    return o.reshape(batch, tmax, hq, d)


def chunked_prefill_attention(q, k_cache, v_cache, slots, starts, q_lens, **kwargs):
    """Causal attention of new chunks ``q [B, Tmax, Hq, D]`` (module docstring; the padded form of
    ``varlen_prefill_attention``).

    Concrete rows are checked here, before jit: a slot past the cache, or starts, q_lens or
    their sum outside ``[0, S]``, is a ``ValueError``.
    """
    mb, seq = jnp.shape(k_cache)[:2]
    common.check_row_values(mb, seq, slots, starts=starts, q_lens=q_lens, **{"starts + q_lens": starts + q_lens})
    return _chunked_prefill_attention(q, k_cache, v_cache, slots, starts, q_lens, **kwargs)


def varlen_prefill_attention(q, k_cache, v_cache, slots, starts, q_lens, q_offsets, **kwargs):
    """Causal attention of packed rows ``q [N, Hq, D]`` (module docstring); ``[N, Hq, D]`` in q's dtype.

    Concrete rows are checked here, before jit: a slot past the cache, starts, q_lens or their sum outside
    ``[0, S]``, or a row outside ``[0, N)``, is a ``ValueError``.
    """
    mb, seq = jnp.shape(k_cache)[:2]
    common.check_row_values(mb, seq, slots, starts=starts, q_lens=q_lens, **{"starts + q_lens": starts + q_lens})
    common.check_packed_rows(jnp.shape(q)[0], q_offsets, q_lens)
    return _varlen_prefill_attention(q, k_cache, v_cache, slots, starts, q_lens, q_offsets, **kwargs)
