"""Benchmark the vAttention attention kernels against JAX baselines on a GPU.

    python benchmarks/bench_attention.py            # full sweep
    python benchmarks/bench_attention.py --quick    # small subset (~3 min of GPU time)
    python benchmarks/bench_attention.py --quick --tune   # also sweep our kernels' knobs (~15 min)

Decode: B in {1, 8, 32, 128} x context in {1K, 4K, 16K, 32K}, 32 q-heads / 8 kv-heads,
D=128, bf16, every row at the full context. Timed in the same run, on the same K/V:

* ``ours``: ``decode_attention`` on the token-major cache ``[B, ctx, 8, 128]``, rows
  mapped to a shuffled slot order.
* ``paged16`` / ``paged64``: ``jax.experimental.pallas.ops.gpu.paged_attention`` on
  the same K/V laid out head-major in pages of 16 / 64 tokens, shuffled block table.
* ``gqa_hm``: the kernel of ``jax.experimental.pallas.ops.gpu.decode_attention.gqa``
  on a head-major copy (the transpose ``gqa`` itself would do is excluded).
* ``xla``: dense attention in plain jnp (XLA fusions).
* ``copy``: a device copy of the K/V bytes; bandwidth counts bytes read + written.

Prefill: chunks of 512 and 2048 new tokens after a 4K prefix, ours (causal) vs
``jax.nn.dot_product_attention(implementation="cudnn")`` on the same contiguous K/V
(no mask: cuDNN's causal mask is top-left aligned, so it computes the full
rectangle; TFLOP/s below count only the causal work for both).

Interleaved KV layout (issue 15): in the same run, on the same K/V, ``decode_attention``
and ``chunked_prefill_attention`` on the group tensor of ``layers_per_group`` g in
{4, 32} layers, ``[B, ctx, g, 2, 8, 128]`` as the cache's view (this layer's K and V
two of its 2g entries, every other entry NaN; a plain device array: the token stride,
2g * 2 KiB, is what matters, no VMM needed), checked against the per-layer ``ours``
output and timed the same way. Reported per shape as interleaved / per-layer time
(goal <= 1.05). For g=32 (16 tokens per 2 MiB page) a second variant,
``g32_page_block``, uses the largest block dividing the tokens per page (16): what a
caller that enforces ``check_block_fits_pages`` runs (GPU loads are row-masked, so
the kernels' default block is safe there too). Group buffers over
``--layout-max-gib`` (B*ctx*128 KiB for g=32) are skipped and recorded as such.

Timing: every measured call is a jitted executable that runs the op ``chain``
times back to back on distinct inputs (no host sync in between), repeated
``samples`` times with ``block_until_ready``; we report the median per op.
Each function is checked against the fp32 reference (on a subset of rows)
before it is timed. A baseline that fails (e.g. a deprecated API) is recorded
with its error instead of stopping the run. Results go to
``benchmarks/results/attention_<device>.{json,md}``.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import os
import pathlib
import platform
import statistics
import sys
import time
import traceback
import warnings

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave room for the VMM page pool

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import jax_vattention as jv  # noqa: E402
from jax_vattention import attention as attn  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from common import device_slug  # noqa: E402

warnings.filterwarnings("ignore", category=DeprecationWarning)
HQ, HKV, D, DTYPE = 32, 8, 128, jnp.bfloat16
RESULTS = pathlib.Path(__file__).resolve().parent / "results"
INTERPRET = False  # --smoke: run the Pallas kernels in interpret mode (CPU check of this script)
NUM_LAYERS, PAGE_BYTES = 32, 2 << 20  # Llama-3-8B, CUDA VMM pages (the interleaved layouts' geometry)
LAYOUT_RATIO_TARGET = 1.05


# ------------------------------------------------------------------ timing --
def time_op(make_calls, samples: int) -> float:
    """Median seconds per op. ``make_calls()`` -> (jitted fn, args, ops per call)."""
    fn, args, ops = make_calls()
    jax.block_until_ready(fn(*args))  # compile + warm up
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(samples):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t0) / ops)
    return statistics.median(times)


def chained(op, qs, rest):
    """One executable applying ``op(q_i, *rest)`` for each of the distinct ``qs``.

    Big arrays (caches) must come in through ``rest``: never closed over, so that
    jit takes them as arguments rather than as embedded constants.
    """
    def f(qs, *rest):
        out = None
        for q in qs:
            if out is not None:
                # Each op depends on the previous one, so XLA cannot fuse the
                # chain (sibling fusion would read K/V once for all of them).
                q = q + (out * 1e-3).astype(q.dtype)
            out = op(q, *rest)
        return out

    return jax.jit(f), (tuple(qs), *rest), len(qs)


def distinct_qs(q, n):
    return [q + jnp.asarray(i * 1e-3, q.dtype) for i in range(n)]


def max_err(out, ref) -> float:
    return float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32))))


def run_baseline(name, record, fn):
    try:
        record[name] = fn()
        gc.collect()  # drop the baseline's layout copies before the next one
    except Exception as e:  # noqa: BLE001 - a failing baseline is a result, not a crash
        msg = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        record[name] = {"error": msg}
        print(f"    {name}: FAILED {msg}", flush=True)
        if os.environ.get("BENCH_TRACEBACK"):
            traceback.print_exc()


def tune_best(ours, configs):
    """Time ``ours(cfg)`` for each configuration (failures are skipped); the fastest as a record."""
    best = None
    for cfg in configs:
        r = {}
        run_baseline("t", r, lambda cfg=cfg: ours(cfg))
        if "us" in r["t"] and (best is None or r["t"]["us"] < best[1]):
            best = (cfg, r["t"]["us"])
    result = {"config": best[0], "us": best[1]} if best else None
    print(f"    tune best {result}", flush=True)
    return result


# ---------------------------------------------------- interleaved layout --
@functools.partial(jax.jit, static_argnames=("g", "k_entry", "v_entry"))
def group_array(k, v, g, k_entry, v_entry):
    """The group tensor ``[MB, S, g, 2, Hkv, D]`` (the cache's view, passed to the kernels as it is) holding
    ``k``/``v`` at their flat entries, every other entry NaN (a stray read of another layer would show in the
    check). Built in one executable: no full-size temporaries."""
    grp = jnp.full((*k.shape[:2], 2 * g, *k.shape[2:]), jnp.nan, k.dtype)
    return grp.at[:, :, k_entry].set(k).at[:, :, v_entry].set(v).reshape(*k.shape[:2], g, 2, *k.shape[2:])


def time_layout(op, q, group, ref, args, info):
    """Check ``op(q, group, group)`` (the one group array is both K and V) against the per-layer output ``ref``,
    then time it; a record with ``info``."""
    o = op(q, group, group)
    err = max_err(o, ref)
    attn.assert_close(o, ref, what=f"layout {info} vs per-layer")
    t = time_op(lambda: chained(lambda q_, c: op(q_, c, c), distinct_qs(q, args.chain), (group,)), args.samples)
    return {"us": t * 1e6, "max_err_vs_per_layer": err, "bitwise_equal": err == 0.0, **info}


def layout_compare(rec, k, v, q, args, make_op):
    """``rec["layouts"]``: for each g in ``args.layouts``, the kernel on the interleaved group holding ``k``/``v``
    (layer g//2 of a 32-layer model: entries from ``CacheConfig.locate``), checked against the per-layer output
    and timed; ``ratio`` = its time / ``rec["ours"]`` (the per-layer kernel, same shape, same process).

    ``make_op(k_entry, v_entry, cfg)`` -> ``op(q, k_cache, v_cache)``, the kernel call with these static arguments.
    """
    out = rec["layouts"] = {}
    base_us = rec.get("ours", {}).get("us")
    if not args.layouts:
        return
    ref = make_op(0, 0, {})(q, k, v)  # the per-layer output
    default_block = attn.AttentionSpec().kernel_block_k(D, k.shape[1])
    for g in args.layouts:
        cfg = jv.CacheConfig(num_layers=NUM_LAYERS, max_batch=k.shape[0], max_seq=k.shape[1], kv_heads=HKV,
                             head_dim=D, page_bytes=PAGE_BYTES, layers_per_group=g)
        (_, ke), (_, ve) = cfg.locate(g // 2)
        nbytes = cfg.entries_per_token * k.nbytes  # B * ctx * 2g * 2 KiB
        page_block = attn.AttentionSpec().kernel_block_k(D, k.shape[1], cfg.tokens_per_page)
        variants = [(f"g{g}", default_block)] + ([(f"g{g}_page_block", page_block)]
                                                 if page_block != default_block else [])
        if nbytes > args.layout_max_gib * 2**30:
            for name, _ in variants:
                out[name] = {"skipped": f"group buffer {nbytes / 2**30:.0f} GiB > --layout-max-gib "
                                        f"{args.layout_max_gib:g}"}
            print(f"    layout g={g}: skipped ({nbytes / 2**30:.0f} GiB)", flush=True)
            continue
        made: dict = {}
        run_baseline("group", made, functools.partial(group_array, k, v, g, ke, ve))
        for name, block_k in variants:
            if isinstance(made["group"], dict):  # {"error": ...}, e.g. out of memory
                out[name] = made["group"]
                continue
            info = dict(k_entry=ke, v_entry=ve, entries=cfg.entries_per_token, tokens_per_page=cfg.tokens_per_page,
                        group_GiB=nbytes / 2**30, block_k=block_k)
            op = make_op(ke, ve, {"block_k": block_k} if block_k != default_block else {})
            run_baseline(name, out, functools.partial(time_layout, op, q, made["group"], ref, args, info))
            if base_us and "us" in out[name]:
                out[name]["ratio"] = out[name]["us"] / base_us
            print(f"    layout {name}: {out[name].get('us', float('nan')):9.1f} us, interleaved/per-layer "
                  f"{out[name].get('ratio', float('nan')):.3f}", flush=True)
        made.clear()
        gc.collect()


# ------------------------------------------------------------------ decode --
@functools.partial(jax.jit, static_argnames="page")
def paged_copy(x, inv, page):
    """Token-major [B, ctx, Hkv, D] -> head-major pages [Hkv, B*ctx/page, page, D]; physical page p
    holds logical page inv[p] (one gather + transpose, no intermediate full-size buffers)."""
    b, ctx, hkv, d = x.shape
    return x.reshape(b * ctx // page, page, hkv, d)[inv].transpose(2, 0, 1, 3)


def paged_layout(k, v, page, perm):
    """Pages in shuffled order: logical page i (slot i // pps, page i % pps) lives at physical perm[i]."""
    b, ctx = k.shape[:2]
    inv = jnp.argsort(perm)
    table = perm.reshape(b, ctx // page).astype(jnp.int32)
    return paged_copy(k, inv, page), paged_copy(v, inv, page), table


def decode_case(b, ctx, args, key, copy_peak_bw, tune):
    rec = {"B": b, "context": ctx}
    kv_bytes = 2 * b * ctx * HKV * D * 2
    io_bytes = kv_bytes + 2 * b * HQ * D * 2
    rec["kv_bytes"] = kv_bytes
    k1, k2, k3, k4 = jax.random.split(key, 4)
    k = jax.random.normal(k1, (b, ctx, HKV, D), DTYPE)
    v = jax.random.normal(k2, (b, ctx, HKV, D), DTYPE)
    q = jax.random.normal(k3, (b, HQ, D), DTYPE)
    slots = jax.random.permutation(k4, b).astype(jnp.int32)  # row r reads slot slots[r]
    lengths = jnp.full((b,), ctx, jnp.int32)
    rows = np.unique(np.array([0, b // 2, b - 1]))
    ref = attn.decode_attention_reference(q[rows], k, v, slots[rows], lengths[rows], max_len=ctx)
    ident = jnp.arange(b, dtype=jnp.int32)  # for baselines that read row r from slot r
    ref_ident = attn.decode_attention_reference(q[rows], k, v, ident[rows], lengths[rows], max_len=ctx)
    qs = distinct_qs(q, args.chain)

    def timed(op, rest, ref_=ref, q_scale=None):
        q0, qs0 = (q, qs) if q_scale is None else (q * q_scale, [x * q_scale for x in qs])
        out = op(q0, *rest)
        err = max_err(out[rows], ref_)
        t = time_op(lambda: chained(op, qs0, rest), args.samples)
        return {"us": t * 1e6, "GBps": io_bytes / t / 1e9, "max_err": err}

    # ours
    def ours(cfg=None):
        cfg = cfg or {}

        def op(q_, k_, v_):
            return attn.decode_attention(q_, k_, v_, slots, lengths, max_len=ctx, interpret=INTERPRET, **cfg)

        attn.assert_close(op(q, k, v)[rows], ref, what=f"ours B={b} ctx={ctx} {cfg}")
        r = timed(op, (k, v))
        r["frac_peak_copy_bw"] = r["GBps"] * 1e9 / copy_peak_bw if copy_peak_bw else None
        return r

    run_baseline("ours", rec, ours)
    print(f"  decode B={b:4d} ctx={ctx:6d} ours {rec['ours'].get('us', float('nan')):9.1f} us", flush=True)

    layout_compare(rec, k, v, q, args, lambda ke, ve, cfg: lambda q_, k_, v_: attn.decode_attention(
        q_, k_, v_, slots, lengths, max_len=ctx, interpret=INTERPRET, k_entry=ke, v_entry=ve, **cfg))
    if tune:
        rec["tune_best"] = tune_best(ours, [
            dict(block_k=bk, num_splits=ns, num_warps=nw, num_stages=st)
            for bk in (32, 64, 128) for ns in (None, 1, 2, 4, 8)
            for nw, st in ((4, 2), (4, 3), (4, 4), (8, 2), (8, 3))])

    # JAX paged attention, pages of 16 and 64, shuffled block table
    def paged(page):
        from jax.experimental.pallas.ops.gpu import paged_attention as pa

        perm = jax.random.permutation(jax.random.fold_in(key, page), b * ctx // page)
        kp, vp, table = paged_layout(k, v, page, perm)
        # the kernel's row r must see the same K/V as our row r (slot slots[r])
        table = table[slots]
        pps = ctx // page
        op = lambda q_, kp_, vp_: pa.paged_attention(  # noqa: E731
            q_, kp_, vp_, table, lengths, pages_per_compute_block=max(1, 128 // page), k_splits=math.gcd(16, pps),
            interpret=INTERPRET)
        return timed(op, (kp, vp), q_scale=1 / math.sqrt(D))  # paged_attention applies no logit scale

    run_baseline("paged16", rec, lambda: paged(16))
    run_baseline("paged64", rec, lambda: paged(64))

    # JAX decode_attention (gqa) kernel on a head-major copy
    def gqa_hm():
        import functools

        from jax.experimental.pallas.ops.gpu import decode_attention as da

        head_major = jax.jit(lambda x: jnp.swapaxes(x[slots], 1, 2))  # [B, Hkv, ctx, D], rows in our order
        kh, vh = head_major(k), head_major(v)
        kv_len = jnp.broadcast_to(lengths[:, None], (b, HKV))
        splits = 16 if ctx // 16 >= 128 else max(1, ctx // 128)
        inner = functools.partial(
            da.decode_attn_unbatched, sm_scale=1 / math.sqrt(D), block_h=16, block_k=128, k_splits=splits,
            num_warps=None, num_stages=2, grid=None, interpret=INTERPRET, debug=False, return_residuals=False,
            normalize_output=True)

        def op(q_, kh_, vh_):
            qr = q_.reshape(b, HKV, HQ // HKV, D)
            o = jax.vmap(jax.vmap(inner))(qr, kh_, vh_, None, kv_len)
            return o.reshape(b, HQ, D)

        return timed(op, (kh, vh))

    run_baseline("gqa_hm", rec, gqa_hm)

    # XLA dense attention (plain jnp)
    def xla():
        def op(q_, kk, vv):  # row r reads slot r (a dense batch: no indirection)
            qg = q_.reshape(b, HKV, HQ // HKV, D)
            s = jnp.einsum("bhgd,bshd->bhgs", qg, kk, preferred_element_type=jnp.float32) / math.sqrt(D)
            s = jnp.where(jnp.arange(ctx)[None, None, None] < lengths[:, None, None, None], s, -jnp.inf)
            p = jax.nn.softmax(s, axis=-1)
            o = jnp.einsum("bhgs,bshd->bhgd", p.astype(DTYPE), vv, preferred_element_type=jnp.float32)
            return o.reshape(b, HQ, D).astype(DTYPE)

        return timed(op, (k, v), ref_ident)

    run_baseline("xla", rec, xla)

    # device copy of the same K/V bytes (read + write), capped at 4 GiB (bandwidth has saturated by then)
    def copy():
        nbytes = min(kv_bytes, 4 << 30)
        t = time_copy(nbytes // 2, args.samples) * kv_bytes / nbytes
        return {"us": t * 1e6, "GBps_rw": kv_bytes * 2 / t / 1e9}

    run_baseline("copy", rec, copy)
    o = rec["ours"].get("us")
    for name in ("paged16", "paged64", "gqa_hm", "xla", "copy"):
        if o and "us" in rec[name]:
            rec[name]["ours_over_this"] = o / rec[name]["us"]
    return rec


def time_copy(n_elems_bf16: int, samples: int, chain: int = 8) -> float:
    """Seconds per copy of ``n_elems_bf16`` bf16 elements through ``x * s`` (s=1 at run time)."""
    x = jnp.ones((n_elems_bf16,), DTYPE)
    def f(x, s):
        for _ in range(chain):  # the barrier keeps XLA from fusing the chain into one pass
            x = jax.lax.optimization_barrier(x * s)
        return x

    f = jax.jit(f)
    return time_op(lambda: (f, (x, jnp.asarray(1.0, DTYPE)), chain), samples)


# ----------------------------------------------------------------- prefill --
def prefill_case(b, chunk, prefix, args, key, tune=False):
    rec = {"B": b, "chunk": chunk, "prefix": prefix}
    total = prefix + chunk
    k1, k2, k3 = jax.random.split(key, 3)
    k = jax.random.normal(k1, (b, total, HKV, D), DTYPE)
    v = jax.random.normal(k2, (b, total, HKV, D), DTYPE)
    q = jax.random.normal(k3, (b, chunk, HQ, D), DTYPE)
    slots = jnp.arange(b, dtype=jnp.int32)
    starts = jnp.full((b,), prefix, jnp.int32)
    q_lens = jnp.full((b,), chunk, jnp.int32)
    causal_flops = 4 * b * HQ * D * chunk * (prefix + (chunk + 1) / 2)
    rec["causal_flops"] = causal_flops
    chain = max(2, args.chain // 4)
    qs = distinct_qs(q, chain)
    sub = slice(0, 1)
    ref = attn.chunked_prefill_attention_reference(q[sub, :256], k, v, slots[sub], starts[sub],
                                                   jnp.minimum(q_lens[sub], 256))

    def timed(op):
        t = time_op(lambda: chained(op, qs, (k, v)), args.samples)
        return {"us": t * 1e6, "TFLOPs_causal": causal_flops / t / 1e12}

    def ours(cfg=None):
        cfg = cfg or {}
        op = lambda q_, k_, v_: attn.chunked_prefill_attention(  # noqa: E731
            q_, k_, v_, slots, starts, q_lens, max_len=total, interpret=INTERPRET, **cfg)
        attn.assert_close(op(q, k, v)[sub, :256], ref, what=f"prefill ours B={b} chunk={chunk} {cfg}")
        return timed(op)

    def cudnn():
        op = lambda q_, k_, v_: jax.nn.dot_product_attention(q_, k_, v_, implementation="cudnn")  # noqa: E731
        jax.block_until_ready(op(q, k, v))
        return timed(op)

    run_baseline("ours", rec, ours)

    layout_compare(rec, k, v, q, args, lambda ke, ve, cfg: lambda q_, k_, v_: attn.chunked_prefill_attention(
        q_, k_, v_, slots, starts, q_lens, max_len=total, interpret=INTERPRET, k_entry=ke, v_entry=ve, **cfg))
    run_baseline("cudnn_nomask", rec, cudnn)
    if tune:
        rec["tune_best"] = tune_best(ours, [
            dict(block_m=bm, block_k=bk, num_warps=nw, num_stages=st)
            for bm in (64, 128, 256) for bk in (32, 64, 128) for nw, st in ((4, 2), (4, 3), (8, 2), (8, 3))])
    if "us" in rec["ours"] and "us" in rec["cudnn_nomask"]:
        rec["cudnn_nomask"]["ours_over_this"] = rec["ours"]["us"] / rec["cudnn_nomask"]["us"]
    print(f"  prefill B={b} chunk={chunk} ours {rec['ours'].get('us', float('nan')):9.1f} us, "
          f"cudnn {rec['cudnn_nomask'].get('us', float('nan')):9.1f} us", flush=True)
    return rec


# ----------------------------------------------------- ours on a VMM view --
def vmm_case(b, ctx, args, key):
    """Ours on a real KVCacheManager view vs the same data in a plain array."""
    import jax_vattention as jv

    cfg = jv.CacheConfig(num_layers=1, max_batch=b, max_seq=ctx, kv_heads=HKV, head_dim=D, dtype="bfloat16")
    with jv.KVCacheManager(cfg) as m:
        owned = [m.allocate(ctx) for _ in range(b)]  # back all ctx tokens of every slot
        slots = jnp.asarray(owned, jnp.int32)[jax.random.permutation(key, b)]
        kn = jax.random.normal(jax.random.fold_in(key, 1), (b, ctx, HKV, D), DTYPE)
        vn = jax.random.normal(jax.random.fold_in(key, 2), (b, ctx, HKV, D), DTYPE)
        lengths = jv.write(m, 0, kn, vn, slots, jnp.zeros(b, jnp.int32), jnp.full((b,), ctx, jnp.int32))
        del kn, vn
        q = jax.random.normal(jax.random.fold_in(key, 3), (b, HQ, D), DTYPE)
        kc, vc = m.k[0], m.v[0]
        op = lambda q_, kc, vc: attn.decode_attention(  # noqa: E731
            q_, kc, vc, slots, lengths, max_len=ctx, interpret=INTERPRET)
        out = op(q, kc, vc)
        attn.assert_close(out[:2], attn.decode_attention_reference(q[:2], kc, vc, slots[:2], lengths[:2], max_len=ctx))
        t = time_op(lambda: chained(op, distinct_qs(q, args.chain), (kc, vc)), args.samples)
        jax.block_until_ready(out)
        return {"B": b, "context": ctx, "us": t * 1e6, "GBps": (2 * b * ctx * HKV * D * 2) / t / 1e9}


# ------------------------------------------------------------------ report --
def fmt(x, spec=".1f"):
    return "n/a" if x is None else format(x, spec)


def cell(rec, name):
    r = rec.get(name, {})
    if "error" in r:
        return "FAILED"
    if "us" not in r:
        return "n/a"
    ratio = r.get("ours_over_this")
    wrong = f" WRONG(max_err {r['max_err']:.3g})" if r.get("max_err") is not None and r["max_err"] > 0.05 else ""
    return f"{r['us']:.1f}" + (f" ({ratio:.2f}x)" if ratio is not None else "") + wrong


def markdown(result) -> str:
    lines = [f"# Attention kernels on {result['device']}", "",
             f"jax {result['jax']}, {result['mode']} run, median of {result['samples']} samples x chain "
             f"{result['chain']}; peak device copy bandwidth (read+write): "
             f"{fmt(result['copy_peak_GBps'])} GB/s"
             + (" (median of the parts' " + ", ".join(f"{x:.0f}" for x in result["copy_peak_GBps_per_part"]) + ")"
                if result.get("copy_peak_GBps_per_part") else "") + ".", "",
             "## Decode (32 q-heads / 8 kv-heads, D=128, bf16, all rows at full context)", "",
             "Times in us; (x) = ours / baseline, < 1 means ours is faster.", "",
             "| B | ctx | ours us | ours GB/s | % peak copy BW | paged16 | paged64 | gqa (head-major) | xla dense "
             "| copy same bytes |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["decode"]:
        if "skipped" in r:
            lines.append(f"| {r['B']} | {r['context']} | skipped: {r['skipped']} | | | | | | | |")
            continue
        o = r.get("ours", {})
        frac = o.get("frac_peak_copy_bw")
        lines.append(f"| {r['B']} | {r['context']} | {fmt(o.get('us'))} | {fmt(o.get('GBps'), '.0f')} | "
                     f"{fmt(None if frac is None else 100 * frac, '.0f')} | {cell(r, 'paged16')} | "
                     f"{cell(r, 'paged64')} | {cell(r, 'gqa_hm')} | {cell(r, 'xla')} | {cell(r, 'copy')} |")
    lines += ["", "## Prefill chunk after a prefix (causal; cuDNN computes the unmasked rectangle)", "",
              "| B | chunk | prefix | ours us | ours TFLOP/s | cudnn us | cudnn TFLOP/s | ours/cudnn |",
              "|---|---|---|---|---|---|---|---|"]
    for r in result["prefill"]:
        o, c = r.get("ours", {}), r.get("cudnn_nomask", {})
        lines.append(f"| {r['B']} | {r['chunk']} | {r['prefix']} | {fmt(o.get('us'))} | "
                     f"{fmt(o.get('TFLOPs_causal'))} | {'FAILED' if 'error' in c else fmt(c.get('us'))} | "
                     f"{fmt(c.get('TFLOPs_causal'))} | {fmt(c.get('ours_over_this'), '.2f')} |")
    lines += layout_markdown(result)
    if result.get("vmm"):
        v = result["vmm"]
        lines += ["", "## Ours on a real KVCacheManager view", "",
                  f"{v}" if "error" in v else f"B={v['B']} ctx={v['context']}: {v['us']:.1f} us, {v['GBps']:.0f} GB/s"]
    tuned = [(kind, r) for kind in ("decode", "prefill") for r in result[kind] if r.get("tune_best")]
    if tuned:
        lines += ["", "## Tuning (--tune): best configuration per shape", "",
                  "| kernel | shape | default us | best us | best config |", "|---|---|---|---|---|"]
        for kind, r in tuned:
            shape = f"B={r['B']} " + (f"ctx={r['context']}" if kind == "decode" else f"chunk={r['chunk']}")
            lines.append(f"| {kind} | {shape} | {fmt(r.get('ours', {}).get('us'))} | {r['tune_best']['us']:.1f} | "
                         f"`{r['tune_best']['config']}` |")
    lines += ["", "## Targets", ""] + [f"- {t}" for t in result["targets"]]
    errors = [f"{r.get('B')}/{r.get('context', r.get('chunk'))} {n}: {x['error']}"
              for r in result["decode"] + result["prefill"]
              for n, x in [*r.items(), *((f"layout {k}", y) for k, y in r.get("layouts", {}).items())]
              if isinstance(x, dict) and "error" in x]
    if errors:
        lines += ["", "## Failures", ""] + [f"- {e}" for e in errors]
    return "\n".join(lines) + "\n"


def layout_rows(result):
    """``(kernel, shape, record)`` of every decode/prefill record that has layout results."""
    for kind in ("decode", "prefill"):
        for r in result[kind]:
            if r.get("layouts"):
                shape = f"B={r['B']} " + (f"ctx={r['context']}" if kind == "decode" else
                                          f"chunk={r['chunk']} prefix={r['prefix']}")
                yield kind, shape, r


def layout_cell(x):
    if "skipped" in x:
        return f"skipped ({x['skipped']})"
    if "error" in x:
        return "FAILED"
    return f"{x['us']:.1f} ({fmt(x.get('ratio'), '.3f')})" + ("" if x.get("bitwise_equal") else
                                                              f" err {x['max_err_vs_per_layer']:.2g}")


def layout_markdown(result) -> list[str]:
    rows = list(layout_rows(result))
    names = list(dict.fromkeys(n for _, _, r in rows for n in r["layouts"]))
    if not rows or not names:
        return []
    blocks = {n: next((x["block_k"] for _, _, r in rows if "block_k" in (x := r["layouts"].get(n, {}))), None)
              for n in names}
    heads = [n + (f" (block {blocks[n]})" if blocks[n] else "") for n in names]
    lines = ["", "## Interleaved KV layout: interleaved / per-layer time", "",
             f"Llama-3-8B attention on the group tensor of g layers (token stride 2g x 2 KiB), this layer's K/V at "
             f"two of its entries, the rest NaN; same shapes and K/V as `ours` (per-layer), checked against it "
             f"(bit-identical unless an error is shown). Times in us; (x) = interleaved / per-layer, goal <= "
             f"{LAYOUT_RATIO_TARGET}.", "",
             "| kernel | shape | per-layer us | " + " | ".join(heads) + " |",
             "|---|---|---|" + "---|" * len(names)]
    for kind, shape, r in rows:
        cells = [layout_cell(r["layouts"][n]) if n in r["layouts"] else "n/a" for n in names]
        lines.append(f"| {kind} | {shape} | {fmt(r.get('ours', {}).get('us'))} | " + " | ".join(cells) + " |")
    return lines


def layout_targets(result) -> list[str]:
    """One line per layout variant: the ratio goal at every measured shape."""
    rows = list(layout_rows(result))
    out = []
    for name in dict.fromkeys(n for _, _, r in rows for n in r["layouts"]):
        measured = [(x["ratio"], f"{kind} {shape}") for kind, shape, r in rows
                    if "ratio" in (x := r["layouts"].get(name, {}))]
        skipped = sum("skipped" in r["layouts"].get(name, {}) for _, _, r in rows)
        failed = sum("error" in r["layouts"].get(name, {}) for _, _, r in rows)
        if not measured:
            continue
        worst = max(measured)
        over = [f"{where} ({ratio:.3f})" for ratio, where in measured if ratio > LAYOUT_RATIO_TARGET]
        ok = not over and not failed
        out.append(f"layout {name}: interleaved/per-layer <= {LAYOUT_RATIO_TARGET} at "
                   f"{len(measured) - len(over)}/{len(measured)} measured shapes (max {worst[0]:.3f}, {worst[1]}"
                   + (f"; {skipped} skipped" if skipped else "") + (f"; {failed} failed" if failed else "")
                   + (f"; over: {', '.join(over)}" if over else "") + f"): {'PASS' if ok else 'FAIL'}")
    return out


def targets(result):
    out = layout_targets(result)
    for r in result["decode"]:
        o = r.get("ours", {})
        if "us" not in o:
            continue
        if r["B"] == 32 and r["context"] == 4096 and "us" in r.get("paged16", {}):
            ratio = r["paged16"]["ours_over_this"]
            out.append(f"B=32 ctx=4096: ours/paged16 = {ratio:.2f} (target <= 0.67): "
                       f"{'PASS' if ratio <= 0.67 else 'FAIL'}")
        if r["B"] >= 8 and r["context"] >= 4096 and o.get("frac_peak_copy_bw"):
            f = o["frac_peak_copy_bw"]
            out.append(f"B={r['B']} ctx={r['context']}: {100 * f:.0f}% of peak copy BW (target >= 85%): "
                       f"{'PASS' if f >= 0.85 else 'FAIL'}")
    return out


def write_report(result, stem: pathlib.Path) -> None:
    """``stem``.json (the raw record) and ``stem``.md (the tables), and the tables on stdout."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    table = markdown(result)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1, default=float))
    stem.with_suffix(".md").write_text(table)
    print(table)
    print(f"wrote {stem}.json and {stem}.md")


def parse_shapes(text: str) -> list[tuple[int, ...]]:
    """``"8x4096,32x16384"`` -> ``[(8, 4096), (32, 16384)]``; ``""`` -> ``[]``."""
    return [tuple(int(x) for x in t.split("x")) for t in text.split(",") if t]


def merge_parts(paths):
    """One report from the part files of a sweep split across processes (each part's ratios are its own run's)."""
    parts = [json.loads(pathlib.Path(f).read_text()) for f in paths]
    devices = {r["device"] for r in parts}
    if len(devices) != 1:
        raise SystemExit(f"--merge: parts come from different devices: {sorted(devices)}")
    first = parts[0]
    result = {k: first[k] for k in ("device", "platform", "jax", "samples", "chain")}
    peaks = [r["copy_peak_GBps"] for r in parts]
    result["mode"] = f"full, {len(parts)} processes (each row timed side by side with its baselines in one process)"
    result["copy_peak_GBps"] = statistics.median(peaks)
    result["copy_peak_GBps_per_part"] = peaks
    result["decode"] = sorted((r for p in parts for r in p["decode"]), key=lambda r: (r["B"], r["context"]))
    result["prefill"] = sorted((r for p in parts for r in p["prefill"]), key=lambda r: (r["B"], r["chunk"]))
    for kind, key in (("decode", "context"), ("prefill", "chunk")):
        shapes = [(r["B"], r[key], r.get("prefix")) for r in result[kind]]
        dup = sorted({x for x in shapes if shapes.count(x) > 1})
        if dup:
            raise SystemExit(f"--merge: {kind} shapes {dup} appear in more than one part")
    result["vmm"] = next((p["vmm"] for p in parts if p.get("vmm")), None)
    result["targets"] = targets(result)
    write_report(result, RESULTS / f"attention_{device_slug(first['device'])}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small subset (~3 min of GPU time)")
    p.add_argument("--tune", action="store_true",
                   help="sweep our kernels' knobs on each shape (slow; use with --quick)")
    p.add_argument("--samples", type=int, default=None)
    p.add_argument("--chain", type=int, default=None, help="ops per timed executable")
    p.add_argument("--no-vmm", action="store_true", help="skip the run on a real KVCacheManager view")
    p.add_argument("--decode", default=None, help="decode shapes to run instead of the sweep, e.g. 8x4096,32x16384")
    p.add_argument("--prefill", default=None, help="prefill shapes BxCHUNKxPREFIX instead of the sweep ('' for none)")
    p.add_argument("--part", default=None, help="write attention_<device>_part-<PART>.{json,md} (one slice of a sweep "
                   "split across processes; join the slices with --merge)")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="join part files of one device into attention_<device>.{json,md}; runs nothing")
    p.add_argument("--layouts", default="4,32", help="layers_per_group values of the interleaved-layout comparison "
                   "(comma-separated; '' for none)")
    p.add_argument("--layout-max-gib", type=float, default=60.0,
                   help="skip interleaved group buffers larger than this (GiB; g=32 needs B*ctx*128 KiB)")
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # tiny CPU run of the script itself
    args = p.parse_args()
    args.layouts = [int(x) for x in args.layouts.split(",") if x]
    if any(g < 2 or NUM_LAYERS % g for g in args.layouts):
        p.error(f"--layouts takes divisors of {NUM_LAYERS} greater than 1 (g=1 is the per-layer 'ours')")
    if args.merge:
        return merge_parts(args.merge)
    global INTERPRET
    INTERPRET = args.smoke
    args.samples = args.samples or (10 if args.quick else 25)
    args.chain = args.chain or (10 if args.quick else 20)
    dev = jax.devices()[0]
    if dev.platform != "gpu":
        print(f"warning: no GPU ({dev}); Pallas kernels cannot run outside interpret mode", file=sys.stderr)
    key = jax.random.key(0)
    if args.smoke:
        args.samples, args.chain = 2, 2
        decode_shapes, prefill_shapes = [(2, 256)], [(1, 64, 128)]
    elif args.quick:
        decode_shapes = [(32, 4096), (1, 16384), (8, 4096)]
        prefill_shapes = [(1, 512, 4096)]
    else:
        decode_shapes = [(b, c) for b in (1, 8, 32, 128) for c in (1024, 4096, 16384, 32768)]
        prefill_shapes = [(b, c, 4096) for b in (1, 4) for c in (512, 2048)]
    if args.decode is not None:
        decode_shapes = parse_shapes(args.decode)
    if args.prefill is not None:
        prefill_shapes = parse_shapes(args.prefill)
    if any(len(t) != 2 for t in decode_shapes) or any(len(t) != 3 for t in prefill_shapes):
        p.error("--decode takes BxCTX items, --prefill takes BxCHUNKxPREFIX items")
    limit = (dev.memory_stats() or {}).get("bytes_limit") if dev.platform == "gpu" else None

    result = {"device": dev.device_kind, "platform": platform.platform(), "jax": jax.__version__,
              "mode": ("smoke" if args.smoke else "quick" if args.quick else "full")
              + (f" (part {args.part})" if args.part else ""),
              "samples": args.samples, "chain": args.chain,
              "decode": [], "prefill": [], "vmm": None}
    if not args.no_vmm:
        try:
            result["vmm"] = vmm_case(*((2, 256) if args.smoke else (32, 4096)), args, jax.random.fold_in(key, 99))
        except Exception as e:  # noqa: BLE001
            result["vmm"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
        print(f"  vmm: {result['vmm']}", flush=True)
    n = (1 << 20) if args.smoke else (1 << 30)
    copy_peak = 2 * n * 2 / time_copy(n, args.samples)  # 2 GiB buffer, read + write
    result["copy_peak_GBps"] = copy_peak / 1e9
    print(f"device {dev.device_kind}: peak copy {copy_peak / 1e9:.0f} GB/s (read+write)", flush=True)
    for i, (b, ctx) in enumerate(decode_shapes):
        need = 2 * b * ctx * HKV * D * 2 * 2.2  # cache + one baseline's layout copy + temporaries
        if limit and need > 0.9 * limit:
            result["decode"].append({"B": b, "context": ctx, "skipped": f"needs ~{need / 2**30:.0f} GiB"})
            print(f"  decode B={b} ctx={ctx}: skipped (memory)", flush=True)
            continue
        result["decode"].append(decode_case(b, ctx, args, jax.random.fold_in(key, i), copy_peak, args.tune))
    for i, (b, chunk, prefix) in enumerate(prefill_shapes):
        result["prefill"].append(prefill_case(b, chunk, prefix, args, jax.random.fold_in(key, 1000 + i), args.tune))
    result["targets"] = targets(result)

    suffix = "_smoke" if args.smoke else "_quick" if args.quick else ""
    suffix += f"_part-{args.part}" if args.part else ""
    out_dir = pathlib.Path("/tmp") if args.smoke else RESULTS
    write_report(result, out_dir / f"attention_{device_slug(dev.device_kind)}{suffix}")


if __name__ == "__main__":
    main()
