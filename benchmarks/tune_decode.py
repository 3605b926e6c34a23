"""Sweep the decode kernel's tiles, splits, warps and stages on a few shapes (GPU).

    python benchmarks/tune_decode.py                 # default shapes
    python benchmarks/tune_decode.py --shapes 32x4096 8x16384

Checks every configuration against the reference before timing it, times it
with the same chained executables as bench_attention.py, and prints the best
configuration per shape next to the default one.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import warnings

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
import bench_attention as ba  # noqa: E402

from jax_vattention import attention as attn  # noqa: E402

warnings.filterwarnings("ignore", category=DeprecationWarning)


def sweep(b, ctx, grid, samples, chain):
    key = jax.random.key(b * 100003 + ctx)
    k1, k2, k3, k4 = jax.random.split(key, 4)
    k = jax.random.normal(k1, (b, ctx, ba.HKV, ba.D), ba.DTYPE)
    v = jax.random.normal(k2, (b, ctx, ba.HKV, ba.D), ba.DTYPE)
    q = jax.random.normal(k3, (b, ba.HQ, ba.D), ba.DTYPE)
    slots = jax.random.permutation(k4, b).astype(jnp.int32)
    lengths = jnp.full((b,), ctx, jnp.int32)
    rows = jnp.array(sorted({0, b // 2, b - 1}))
    ref = attn.decode_attention_reference(q[rows], k, v, slots[rows], lengths[rows], max_len=ctx)
    kv_bytes = 2 * b * ctx * ba.HKV * ba.D * 2
    results = []
    for cfg in [{}] + grid:
        op = lambda q_, k_, v_, cfg=cfg: attn.decode_attention(q_, k_, v_, slots, lengths, max_len=ctx, **cfg)  # noqa: E731
        try:
            attn.assert_close(op(q, k, v)[rows], ref, what=str(cfg))
            t = ba.time_op(lambda op=op: ba.chained(op, ba.distinct_qs(q, chain), (k, v)), samples)
        except Exception as e:  # noqa: BLE001 - an invalid configuration is a result
            print(f"  {cfg}: {type(e).__name__}: {str(e).splitlines()[0][:120]}", flush=True)
            continue
        results.append({"config": cfg or "default", "us": t * 1e6, "GBps": kv_bytes / t / 1e9})
        print(f"  B={b} ctx={ctx} {cfg or 'default'}: {t * 1e6:.1f} us, {kv_bytes / t / 1e9:.0f} GB/s", flush=True)
    return results


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["32x4096", "8x4096"])
    p.add_argument("--samples", type=int, default=7)
    p.add_argument("--chain", type=int, default=10)
    args = p.parse_args()
    grid = [
        dict(block_k=bk, num_splits=ns, num_warps=nw, num_stages=st)
        for bk, ns, (nw, st) in itertools.product((64, 128), (1, 2, 4, 8), ((4, 2), (4, 3), (4, 4), (8, 3)))
    ]
    copy_peak = 2 * (1 << 30) * 2 / ba.time_copy(1 << 30, args.samples)
    print(f"{jax.devices()[0].device_kind}: copy {copy_peak / 1e9:.0f} GB/s (read+write)")
    summary = {}
    for shape in args.shapes:
        b, ctx = (int(x) for x in shape.split("x"))
        res = sorted(sweep(b, ctx, grid, args.samples, args.chain), key=lambda r: r["us"])
        default = next((r for r in res if r["config"] == "default"), None)
        summary[shape] = {"best": res[:3], "default": default, "copy_peak_GBps": copy_peak / 1e9}
        print(f"== {shape}: best {res[0]}; default {default}; "
              f"best = {100 * res[0]['GBps'] * 1e9 / copy_peak:.0f}% of copy")
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "tune_decode.json"), "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
