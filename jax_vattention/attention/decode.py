"""Decode attention (one query token per row) straight over the vAttention cache.

Backend choice (jax/jaxlib 0.11.2)
----------------------------------
This kernel is written in Pallas and lowered by the **Triton backend** (the GPU
lowering ``pallas_call`` uses with ``jax.experimental.pallas.triton.CompilerParams``).
That backend is deprecated in 0.11 (a DeprecationWarning at lowering) in favour
of Mosaic GPU (``jax.experimental.pallas.mosaic_gpu``), but it is the pragmatic
choice today, because:

* It is what JAX's own GPU decode / paged-attention kernels use in 0.11.2, and
  this kernel only uses the patterns those do (dynamic scalar loads, row-masked
  tile loads, ``fori_loop`` with a data-dependent trip count, ``dot_general``
  with fp32 accumulation on power-of-two tiles of >= 16 rows). A CPU test lowers
  both kernels to Triton IR for an abstract H100; only the PTX compilation and
  the timing need the GPU.
* It tests on CPU: the generic HLO interpreter (``interpret=True``) reads the
  cache operand in place, so the subprocess test over a real, partly PROT_NONE
  host cache proves the kernel's access pattern (a stray read segfaults).
  Mosaic GPU's interpreter (``plgpu.InterpretGPUParams``) does run on CPU in
  0.11.2, but only for whole-array refs (it asserts trivial BlockSpec windows),
  and it allocates a simulated GMEM buffer per operand and copies each input
  into it: it reads the *whole* sparse cache, so it cannot run on it at all.
* Mosaic GPU on Hopper wants warpgroup-sized (M=64) wgmma tiles, TMA boxes with
  swizzled SMEM layouts, and explicit barriers; decode has 1-8 query rows per
  KV head, so it needs the transposed formulation (K.q^T, then V^T.P) plus a
  TMA/mbarrier pipeline. None of the layout/lowering constraints can be checked
  without a GPU, so that kernel is future work; the public functions below take
  no backend-specific arguments beyond tuning knobs so it can replace this one.

The Triton backend has no scalar prefetch and no BlockSpec pipelining: a tile is
read only where the kernel body loads it. So instead of BlockSpec index-map
clamping, each program loads ``slots[b]``/``lengths[b]`` itself, loops only over
the ``ceil(len/block_k)`` blocks of its split, and masks each tile's rows to
``position < length`` (see ``common.py`` for the resulting mapping requirement).

Kernel design (memory bound: every KV byte is read exactly once)
----------------------------------------------------------------
Grid ``(B, Hkv * head_blocks, num_splits)``. Program ``(b, h, s)`` owns all
``G = Hq/Hkv`` query heads of KV head ``h`` (GQA packing, padded to a power of
two >= 16 rows because Triton dots need M >= 16), and the token range
``[s * chunk, (s + 1) * chunk) & [0, len_b)`` of slot ``slots[b]``. Each
``[block_k, D]`` K/V tile (rows strided by ``E * Hkv * D`` in the token-major cache:
``Hkv * D`` per-layer, the whole interleaved token otherwise; no transpose, no
copy) is loaded once and used by all G heads. Softmax is fp32
online softmax (exp2 domain). With ``num_splits > 1`` (flash decoding) each
split writes unnormalised partials ``(acc, m, l)`` that a small XLA combine
merges; with one split the kernel normalises and writes ``q.dtype`` directly.
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
class DecodeConfig:
    block_k: int  # tokens per KV tile
    num_splits: int  # programs along the sequence per (row, kv-head)
    blocks_per_split: int  # KV tiles per split (chunk = blocks_per_split * block_k)
    block_h: int  # query rows per program (power of two >= 16)
    head_blocks: int  # programs along the group (1 unless G > 64)
    num_warps: int
    num_stages: int

    @property
    def chunk(self) -> int:
        return self.blocks_per_split * self.block_k


def choose_config(batch, kv_heads, group, max_len, head_dim, *, block_k=None, num_splits=None,
                  num_warps=None, num_stages=None, num_sms=None, min_blocks_per_split=4,
                  seq_len=None) -> DecodeConfig:
    """Tile and split-K parameters from the batch size and the length bucket.

    Splits are added until there is about one program per SM (B * Hkv programs
    already suffice at large batch), but a split never gets fewer than
    ``min_blocks_per_split`` tiles, so short contexts keep one split.
    """
    block_h = max(16, next_pow2(group))
    head_blocks = 1
    if block_h > 64:
        head_blocks, block_h = cdiv(group, 64), 64
    if block_k is None:
        block_k = common.default_block_k(head_dim, seq_len)
    if block_k < 16 or block_k & (block_k - 1):
        raise ValueError(f"block_k must be a power of two >= 16, got {block_k}")
    num_blocks = cdiv(max(int(max_len), 1), block_k)
    if num_splits is None:
        num_sms = num_sms or common.gpu_core_count()
        base = batch * kv_heads * head_blocks
        # About one program per SM: at B*Hkv >= #SMs that is one split and no combine
        # kernel (H100 sweep, benchmarks/tune_decode.py: B=32 ctx=4K best at 1 split).
        num_splits = min(cdiv(num_sms, base), cdiv(num_blocks, min_blocks_per_split))
    num_splits = max(1, min(int(num_splits), num_blocks))
    blocks_per_split = cdiv(num_blocks, num_splits)
    num_splits = cdiv(num_blocks, blocks_per_split)
    if num_warps is None:
        num_warps = 4 if block_h * head_dim <= 32 * 128 else 8
    if num_stages is None:
        num_stages = 4 if block_k * head_dim <= 64 * 128 else 2
    return DecodeConfig(block_k, num_splits, blocks_per_split, block_h, head_blocks, num_warps, num_stages)


def _decode_kernel(slots_ref, lens_ref, q_ref, k_ref, v_ref, *out_refs, cfg: DecodeConfig,
                   sm_scale: float, soft_cap, normalize: bool, masked_loads: bool, k_entry: int, v_entry: int):
    b, hb, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    kv_head = lax.div(hb, cfg.head_blocks) if cfg.head_blocks > 1 else hb
    slot = slots_ref[b]
    length = lens_ref[b]  # already clamped to [0, max_len]; 0 for padding rows
    head_dim = q_ref.shape[-1]
    bk = cfg.block_k

    start = split * cfg.chunk
    n_blocks = jnp.clip(lax.div(length - start + bk - 1, bk), 0, cfg.blocks_per_split)
    q = q_ref[...]  # [block_h, D], stays in registers

    def body(j, carry):
        pos0 = start + j * bk
        pos = pos0 + lax.broadcasted_iota(jnp.int32, (bk,), 0)
        row_ok = pos < length
        k = common.load_kv_tile(k_ref, slot, pos0, k_entry, kv_head, row_ok, masked_loads)  # [bk, D]
        v = common.load_kv_tile(v_ref, slot, pos0, v_entry, kv_head, row_ok, masked_loads)
        s = common.qk_logits(q, k, sm_scale, soft_cap)
        valid = jnp.broadcast_to(row_ok[None, :], s.shape)
        return common.online_softmax_step(carry, s, v, valid)

    init = (
        jnp.zeros((cfg.block_h, head_dim), jnp.float32),
        jnp.full((cfg.block_h,), MASK_VALUE, jnp.float32),
        jnp.zeros((cfg.block_h,), jnp.float32),
    )
    acc, m, row_sum = lax.fori_loop(0, n_blocks, body, init)
    if normalize:
        (o_ref,) = out_refs
        l_safe = jnp.where(row_sum > 0.0, row_sum, 1.0)  # empty rows (length 0) give 0, not nan
        o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
    else:
        o_ref, m_ref, l_ref = out_refs
        o_ref[...] = acc
        m_ref[...] = m
        l_ref[...] = row_sum


def combine_splits(acc, m, row_sum):
    """Merge flash-decoding partials: acc [..., S, M, D], m/row_sum [..., S, M] (m in log2 units)."""
    m_max = jnp.max(m, axis=-2, keepdims=True)
    w = jnp.exp2(m - m_max)  # empty splits have m = MASK_VALUE -> weight 0
    l_tot = jnp.sum(w * row_sum, axis=-2)
    o = jnp.sum(w[..., None] * acc, axis=-3)
    return o / jnp.where(l_tot > 0.0, l_tot, 1.0)[..., None]


@functools.partial(
    jax.jit,
    static_argnames=("sm_scale", "soft_cap", "max_len", "interpret", "block_k", "num_splits",
                     "num_warps", "num_stages", "num_sms", "masked_loads", "k_entry", "v_entry"),
)
def _decode_attention(q, k_cache, v_cache, slots, lengths, *, sm_scale=None, soft_cap=None, max_len=None,
                      interpret=False, block_k=None, num_splits=None, num_warps=None, num_stages=None,
                      num_sms=None, masked_loads=None, k_entry=0, v_entry=0):
    """Single-token attention of ``q [B, Hq, D]`` over the cache rows ``slots``.

    Args:
      q: ``[B, Hq, D]``, one query token per row.
      k_cache, v_cache: ``[MB, S, Hkv, D]`` bf16/fp16 (e.g. ``manager.k[layer]``), or an
        interleaved group ``[MB, S, g, 2, Hkv, D]`` / ``[MB, S, E, Hkv, D]`` (the same
        array for both; see common.py); read in place, only tiles below each row's
        length, only entries ``k_entry``/``v_entry``.
      slots: ``[B] int32``; row b reads slot ``slots[b]`` (any order, repeats ok).
        A negative slot marks a padding row: it reads nothing and outputs 0.
      lengths: ``[B] int32`` valid tokens per row (>= 1; 0 gives a zero output).
        Pass the lengths returned by ``jax_vattention.write`` so the reads are
        ordered after the write.
      sm_scale: logit scale, default ``1/sqrt(D)``.
      soft_cap: if set, logits become ``soft_cap * tanh(logits / soft_cap)``.
      max_len: static upper bound on ``lengths`` (a bucket); sizes the grid.
        Defaults to ``S``. Tokens past ``max_len`` are ignored.
      interpret: run the Pallas kernel in the HLO interpreter (CPU testing).
      block_k, num_splits, num_warps, num_stages, num_sms: tuning overrides.
      masked_loads: row-masked tile loads (default: on GPU, off in interpret
        mode, see ``common.load_kv_tile``); exposed for tests.
      k_entry, v_entry: static entries (flat, in ``[0, E)``) holding this layer's K and
        V: ``2 * (layer % g)`` and ``+ 1`` interleaved; 0 for rank 4.
    Returns:
      ``[B, Hq, D]`` in ``q.dtype``.

    Mapping requirement: tokens ``[0, ceil(len/block_k)*block_k)`` of each slot
    are mapped, which holds when ``block_k`` divides tokens-per-page (common.py).
    """
    mb, seq, hkv, d = common.check_cache(k_cache, v_cache, k_entry=k_entry, v_entry=v_entry)
    if q.ndim != 3 or q.shape[-1] != d:
        raise ValueError(f"q must be [B, Hq, {d}], got {q.shape}")
    batch, hq, _ = q.shape
    group = common.check_heads(hq, hkv)
    common.check_rows("slots", slots, batch)
    common.check_rows("lengths", lengths, batch)
    max_len = seq if max_len is None else min(int(max_len), seq)
    scale = common.default_sm_scale(d, sm_scale)
    cfg = choose_config(batch, hkv, group, max_len, d, block_k=block_k, num_splits=num_splits,
                        num_warps=num_warps, num_stages=num_stages, num_sms=num_sms, seq_len=seq)
    masked_loads = (not interpret) if masked_loads is None else masked_loads
    common.check_tiles_fit_slot(seq, cfg.block_k, masked_loads)

    live = (slots >= 0) & (slots < mb)  # a slot past the cache (only possible under jit) is a padding row
    lens = jnp.where(live, jnp.clip(lengths, 0, max_len), 0).astype(jnp.int32)
    slots_c = jnp.clip(slots, 0, mb - 1).astype(jnp.int32)  # padding rows read nothing anyway
    rows = cfg.head_blocks * cfg.block_h
    qg = q.reshape(batch, hkv, group, d)
    if rows != group:
        qg = jnp.pad(qg, ((0, 0), (0, 0), (0, rows - group), (0, 0)))
    qg = qg.reshape(batch, hkv * cfg.head_blocks, cfg.block_h, d).astype(k_cache.dtype)

    hblocks = hkv * cfg.head_blocks
    grid = (batch, hblocks, cfg.num_splits)
    normalize = cfg.num_splits == 1
    if normalize:
        out_shape = [jax.ShapeDtypeStruct((batch, hblocks, cfg.block_h, d), q.dtype)]
        out_specs = [pl.BlockSpec((None, None, cfg.block_h, d), lambda b, h, s: (b, h, 0, 0))]
    else:
        out_shape = [
            jax.ShapeDtypeStruct((batch, hblocks, cfg.num_splits, cfg.block_h, d), jnp.float32),
            jax.ShapeDtypeStruct((batch, hblocks, cfg.num_splits, cfg.block_h), jnp.float32),
            jax.ShapeDtypeStruct((batch, hblocks, cfg.num_splits, cfg.block_h), jnp.float32),
        ]
        out_specs = [
            pl.BlockSpec((None, None, None, cfg.block_h, d), lambda b, h, s: (b, h, s, 0, 0)),
            pl.BlockSpec((None, None, None, cfg.block_h), lambda b, h, s: (b, h, s, 0)),
            pl.BlockSpec((None, None, None, cfg.block_h), lambda b, h, s: (b, h, s, 0)),
        ]
    kernel = functools.partial(_decode_kernel, cfg=cfg, sm_scale=scale, soft_cap=soft_cap, normalize=normalize,
                               masked_loads=masked_loads, k_entry=int(k_entry), v_entry=int(v_entry))
    whole = pl.no_block_spec  # slots/lengths/cache: whole-array refs, indexed in the body
    outs = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[whole, whole,
                  pl.BlockSpec((None, None, cfg.block_h, d), lambda b, h, s: (b, h, 0, 0)),
                  whole, whole],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=pl_triton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name=f"vattn_decode_bk{cfg.block_k}_s{cfg.num_splits}",
    )(slots_c, lens, qg, k_cache, v_cache)
    if normalize:
        o = outs[0]
    else:
        o = combine_splits(*outs).astype(q.dtype)
    o = o.reshape(batch, hkv, rows, d)[:, :, :group]
    return o.reshape(batch, hq, d)


def decode_attention(q, k_cache, v_cache, slots, lengths, **kwargs):
    """Single-token attention of ``q [B, Hq, D]`` over the cache rows ``slots`` (see ``_decode_attention``).

    Concrete rows are checked here, before jit: a slot past the cache or a length outside
    ``[0, S]`` is a ``ValueError``, not a read of another slot's (possibly unmapped) memory.
    """
    mb, seq = jnp.shape(k_cache)[:2]
    common.check_row_values(mb, seq, slots, lengths=lengths)
    return _decode_attention(q, k_cache, v_cache, slots, lengths, **kwargs)
