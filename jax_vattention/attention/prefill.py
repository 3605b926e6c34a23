"""Chunked-prefill attention over the vAttention cache (Pallas, Triton backend).

The cache is one layer's K/V ``[MB, S, Hkv, D]``, or an interleaved group
``[MB, S, g, 2, Hkv, D]`` / ``[MB, S, E, Hkv, D]`` with static entries (see
common.py); read in place either way.

Packed layout (documented choice): **padded batch-major**, the same layout
``jax_vattention.write`` takes for the new K/V, so one forward pass projects
``[B, Tmax, ...]`` tokens once and uses them for both::

    q       [B, Tmax, Hq, D]   row b's chunk in q[b, :q_lens[b]], rest padding
    slots   [B] int32          cache slot of row b (any order; < 0 = padding row)
    starts  [B] int32          tokens of row b already in the cache before this chunk
    q_lens  [B] int32          new tokens of row b (0 allowed)
    out     [B, Tmax, Hq, D]   q.dtype; padding queries give 0

Query ``t`` of row b is the token at absolute position ``starts[b] + t``; its K/V
were already written to the cache (``write(..., starts, q_lens)``), and it
attends causally to cache tokens ``[0, starts[b] + t]``. Rows are independent,
so different sequences (different prefixes, chunk sizes, even decode rows with
``q_lens = 1``) mix in one call.

Kernel: grid ``(q_blocks, Hkv, B)``. GQA is packed by folding the ``G`` query
heads of a KV head into the M dimension (``q`` is re-laid out to
``[B, Hkv, Tpad * Gp, D]``, row ``r`` = token ``r // Gp``, head ``r % Gp``; only
``q`` and the output are moved, never the cache), so each ``[block_k, D]`` K/V
tile is loaded once per group. KV tiles strictly below the tile's first query
position are processed without masks; the diagonal / tail tiles are masked
causally and by length (row-masked loads on GPU, see ``common.load_kv_tile``).
Reads stop at ``starts[b] + q_lens[b]`` rounded up to ``block_k``.
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


def _prefill_kernel(slots_ref, starts_ref, qlens_ref, q_ref, k_ref, v_ref, o_ref, *, cfg: PrefillConfig,
                    sm_scale: float, soft_cap, masked_loads: bool, k_entry: int, v_entry: int):
    num_qb = pl.num_programs(0)
    i = num_qb - 1 - pl.program_id(0)  # longest (last) query tiles first: shorter tail
    kv_head, b = pl.program_id(1), pl.program_id(2)
    slot, start, qlen = slots_ref[b], starts_ref[b], qlens_ref[b]
    bm, bk, gp = cfg.block_m, cfg.block_k, cfg.group_pad
    head_dim = q_ref.shape[-1]

    t0 = i * cfg.tokens_per_block
    tile_tokens = jnp.clip(qlen - t0, 0, cfg.tokens_per_block)  # real queries in this tile
    kv_len = start + qlen
    busy = tile_tokens > 0
    # Keys [0, start + t0] are visible to every query of the tile: no mask needed.
    n_full = jnp.where(busy, lax.div(start + t0 + 1, bk), 0)
    n_total = jnp.where(busy, lax.div(start + t0 + tile_tokens + bk - 1, bk), 0)

    q = q_ref[...]  # [bm, D]
    qpos = start + t0 + lax.div(lax.broadcasted_iota(jnp.int32, (bm,), 0), gp)  # row -> token

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
    o_ref[...] = (acc / jnp.where(row_sum > 0.0, row_sum, 1.0)[:, None]).astype(o_ref.dtype)


@functools.partial(
    jax.jit,
    static_argnames=("sm_scale", "soft_cap", "max_len", "interpret", "block_m", "block_k", "num_warps",
                     "num_stages", "masked_loads", "k_entry", "v_entry"),
)
def _chunked_prefill_attention(q, k_cache, v_cache, slots, starts, q_lens, *, sm_scale=None, soft_cap=None,
                               max_len=None, interpret=False, block_m=None, block_k=None, num_warps=None,
                               num_stages=None, masked_loads=None, k_entry=0, v_entry=0):
    """Causal attention of new chunks ``q [B, Tmax, Hq, D]`` over cached prefixes.

    See the module docstring for the layout. The cache is ``[MB, S, Hkv, D]`` or an
    interleaved group with static entries ``k_entry``/``v_entry`` (see
    ``decode._decode_attention`` and common.py). ``max_len`` (static, optional)
    bounds ``starts + q_lens``; rows are clamped to it. Padding rows (negative
    slot) and padding queries read nothing and give 0. Mapping requirement:
    tokens ``[0, ceil((starts + q_lens) / block_k) * block_k)`` of each slot are
    mapped (holds when ``block_k`` divides tokens-per-page, see common.py).
    """
    mb, seq, hkv, d = common.check_cache(k_cache, v_cache, k_entry=k_entry, v_entry=v_entry)
    if q.ndim != 4 or q.shape[-1] != d:
        raise ValueError(f"q must be [B, Tmax, Hq, {d}], got {q.shape}")
    batch, tmax, hq, _ = q.shape
    group = common.check_heads(hq, hkv)
    for name, x in (("slots", slots), ("starts", starts), ("q_lens", q_lens)):
        common.check_rows(name, x, batch)
    limit = seq if max_len is None else min(int(max_len), seq)
    cfg = choose_config(group, d, block_m=block_m, block_k=block_k, num_warps=num_warps, num_stages=num_stages,
                        seq_len=seq)
    masked_loads = (not interpret) if masked_loads is None else masked_loads
    common.check_tiles_fit_slot(seq, cfg.block_k, masked_loads)
    scale = common.default_sm_scale(d, sm_scale)

    live = (slots >= 0) & (slots < mb)  # a slot past the cache (only possible under jit) is a padding row
    starts_c = jnp.where(live, jnp.clip(starts, 0, limit), 0).astype(jnp.int32)
    qlens_c = jnp.where(live, jnp.clip(q_lens, 0, jnp.minimum(tmax, limit - starts_c)), 0).astype(jnp.int32)
    slots_c = jnp.clip(slots, 0, mb - 1).astype(jnp.int32)

    tpb, gp = cfg.tokens_per_block, cfg.group_pad
    num_qb = cdiv(tmax, tpb)
    tpad = num_qb * tpb
    qf = q.reshape(batch, tmax, hkv, group, d)
    qf = jnp.pad(qf, ((0, 0), (0, tpad - tmax), (0, 0), (0, gp - group), (0, 0)))
    qf = qf.transpose(0, 2, 1, 3, 4).reshape(batch, hkv, tpad * gp, d).astype(k_cache.dtype)

    kernel = functools.partial(_prefill_kernel, cfg=cfg, sm_scale=scale, soft_cap=soft_cap,
                               masked_loads=masked_loads, k_entry=int(k_entry), v_entry=int(v_entry))
    whole = pl.no_block_spec
    tile = pl.BlockSpec((None, None, cfg.block_m, d), lambda i, h, b: (b, h, num_qb - 1 - i, 0))
    of = pl.pallas_call(
        kernel,
        grid=(num_qb, hkv, batch),
        in_specs=[whole, whole, whole, tile, whole, whole],
        out_specs=tile,
        out_shape=jax.ShapeDtypeStruct((batch, hkv, tpad * gp, d), q.dtype),
        compiler_params=pl_triton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name=f"vattn_prefill_bm{cfg.block_m}_bk{cfg.block_k}",
    )(slots_c, starts_c, qlens_c, qf, k_cache, v_cache)
    o = of.reshape(batch, hkv, tpad, gp, d)[:, :, :tmax, :group].transpose(0, 2, 1, 3, 4)
    o = o.reshape(batch, tmax, hq, d)
    q_ok = jnp.arange(tmax, dtype=jnp.int32)[None, :] < qlens_c[:, None]
    return jnp.where(q_ok[:, :, None, None], o, jnp.zeros((), o.dtype))


def chunked_prefill_attention(q, k_cache, v_cache, slots, starts, q_lens, **kwargs):
    """Causal attention of new chunks ``q [B, Tmax, Hq, D]`` (see ``_chunked_prefill_attention``).

    Concrete rows are checked here, before jit: a slot past the cache, or starts, q_lens or
    their sum outside ``[0, S]``, is a ``ValueError``.
    """
    mb, seq = jnp.shape(k_cache)[:2]
    common.check_row_values(mb, seq, slots, starts=starts, q_lens=q_lens, **{"starts + q_lens": starts + q_lens})
    return _chunked_prefill_attention(q, k_cache, v_cache, slots, starts, q_lens, **kwargs)
