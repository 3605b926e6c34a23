"""Allocation costs of the vAttention cache, and what in-graph growth costs a decode step.

Both at the two page granularities of CacheConfig.layers_per_group (g), for
Llama-3-8B's cache shape (32 layers, 8 KV heads of 128, bf16; 2 MiB pages):
  g = 1  (per-layer): 64 tensors, a page holds 1024 tokens of one layer's K or V;
  g = 32 (interleaved): 1 tensor, a page holds 16 tokens of every layer.

Part 1, per physical page through the public API, the same number of pages in
both layouts: grow that creates+maps fresh pages (one grow call: one run of
consecutive pages per tensor, so one cuMemSetAccess per tensor on CUDA), grow
that maps pages from the free list, the same one page index per grow call (what
decode does as rows cross pages: one cuMemSetAccess per page per tensor),
deferred reuse (free + allocate of a slot whose pages stay mapped), trim (unmap)
and trim(release_physical) (unmap + destroy).

Part 2, a decode-like jitted loop with Llama-3-8B-shaped layers (the weight
matmuls of each layer plus a K/V write per layer) run three ways in one process,
once per layout:
  grow_in_graph : pages mapped by the grow FFI call inside the loop as rows cross pages
  premapped     : the same loop, every page mapped before it starts (grow finds nothing to map)
  no_grow       : the same loop without the grow call at all (the step's floor)
The target is grow_in_graph / premapped <= 1.02.

    python benchmarks/bench_alloc.py            # full (GPU)
    python benchmarks/bench_alloc.py --quick    # smaller model, fewer steps (smaller still on a CPU)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from common import device_name, median, write_results  # noqa: E402

import jax_vattention as jv  # noqa: E402
from jax_vattention.hlo import assert_no_cache_copy  # noqa: E402

MIB = 1 << 20


# -- part 1 -----------------------------------------------------------------
LLAMA_LAYERS = 32  # Llama-3-8B: 32 layers of 8 KV heads x 128, bf16


def page_costs(layers_per_group: int, pages: int) -> dict:
    """Per-page costs on a Llama-3-8B-shaped cache in the layout of ``layers_per_group``; one slot maps ``pages``
    pages in all (``pages / num_tensors`` in each tensor)."""
    probe = jv.CacheConfig(num_layers=LLAMA_LAYERS, max_batch=4, max_seq=1, kv_heads=8, head_dim=128,
                           layers_per_group=layers_per_group)
    per_tensor = max(1, pages // probe.num_tensors)
    cfg = dataclasses.replace(probe, max_seq=per_tensor * probe.tokens_per_page)
    with jv.KVCacheManager(cfg) as m:
        tpp = m.tokens_per_page
        n = per_tensor * tpp
        total = per_tensor * cfg.num_tensors
        per_page: dict = dict(tokens_per_page=tpp, num_tensors=cfg.num_tensors, pages=total)

        def timed(label, fn, page_count=total):
            t0 = time.perf_counter()
            fn()
            per_page[label] = (time.perf_counter() - t0) / page_count * 1e6

        s = m.allocate()
        timed("grow_create_map_us", lambda: m.grow(s, n))
        assert m.stats().pages_mapped == total and m.capacity(s) == n
        m.free(s)
        timed("deferred_reuse_us", lambda: m.allocate(n))
        maps_before = m.stats().maps
        assert m.capacity(s) == n and m.stats().maps == maps_before  # reused, nothing mapped
        m.free(s)
        timed("trim_unmap_us", lambda: m.trim())
        assert m.stats().pages_mapped == 0 and m.stats().pages_free == total
        s = m.allocate()
        timed("grow_map_from_pool_us", lambda: m.grow(s, n))
        assert m.stats().pages_created == total  # no new cuMemCreate
        m.free(s)
        m.trim()

        def page_by_page():
            for p in range(1, per_tensor + 1):
                m.grow(s, p * tpp)  # one page index: one page in each tensor

        s = m.allocate()
        timed("grow_page_by_page_from_pool_us", page_by_page)
        assert m.capacity(s) == n and m.stats().pages_created == total
        m.free(s)
        timed("trim_release_us", lambda: m.trim(release_physical=True))
        assert m.stats().pages_created == 0
    return per_page


# -- part 2 -----------------------------------------------------------------
def make_weights(key, L, d_model, d_qkv, d_ff, dtype):
    def w(k, shape):
        return (jax.random.normal(k, shape, jnp.float32) * shape[0] ** -0.5).astype(dtype)

    keys = jax.random.split(key, (L, 4))
    return [
        dict(
            qkv=w(keys[i, 0], (d_model, d_qkv)),
            o=w(keys[i, 1], (d_model, d_model)),
            up=w(keys[i, 2], (d_model, 2 * d_ff)),
            down=w(keys[i, 3], (d_ff, d_model)),
        )
        for i in range(L)
    ]


def read_layer_k(c, layer: int, slot, pos, hkv: int, head_dim: int) -> jax.Array:
    """Token ``pos`` of ``slot`` in layer ``layer``'s K, a scalar dynamic_slice of its view (a vmapped one becomes a
    gather, for which XLA may copy the whole view into another layout). -> [1, 1, Hkv, D]"""
    cfg = c.manager.config
    tensor, entry = cfg.locate(layer)[0]
    view = c.tensors[tensor]
    if cfg.interleaved:  # [MB, S, g, 2, Hkv, D]: entry e is (e // 2, e % 2)
        got = lax.dynamic_slice(view, (slot, pos, entry // 2, entry % 2, 0, 0), (1, 1, 1, 1, hkv, head_dim))
        return got.reshape(1, 1, hkv, head_dim)
    return lax.dynamic_slice(view, (slot, pos, 0, 0), (1, 1, hkv, head_dim))  # [MB, S, Hkv, D]


def decode_loop(steps: int, hkv: int, head_dim: int, grow: bool):
    def run(weights, cache, h):  # h: [B, d_model]
        B, d_model = h.shape

        def body(i, carry):
            state, h = carry
            c = cache.with_state(state)
            if grow:
                c = c.grow(state.lengths + 1)
            else:
                c = c.with_state(jv.CacheState(state.slots, state.lengths + 1, jnp.ones_like(state.lengths)))
            for layer, w in enumerate(weights):
                qkv = h @ w["qkv"]  # [B, d_model + 2*Hkv*D]
                k = qkv[:, d_model : d_model + hkv * head_dim].reshape(B, 1, hkv, head_dim)
                v = qkv[:, d_model + hkv * head_dim :].reshape(B, 1, hkv, head_dim)
                lens, c = c.write(layer, k, v)
                # Read row 0's token back (ordered by `lens`) so the write is on the data path.
                got = read_layer_k(c, layer, c.slots[0], lens[0] - 1, hkv, head_dim)
                attn = qkv[:, :d_model] + jnp.tile(got.reshape(1, -1), d_model // (hkv * head_dim))
                h = h + attn @ w["o"]
                gate, up = jnp.split(h @ w["up"], 2, axis=-1)
                h = (h + (jax.nn.silu(gate) * up) @ w["down"]).astype(h.dtype)
                h = h / (1 + jnp.abs(h).max(axis=-1, keepdims=True)).astype(h.dtype)
            return c.state, h

        return lax.fori_loop(0, steps, body, (cache.state, h))

    return jax.jit(run)


def step_overhead(args, layers_per_group: int) -> dict:
    L, B, steps = args.layers, args.batch, args.steps
    d_model, hkv, head_dim, d_ff = args.d_model, 8, 128, args.d_ff
    rng = np.random.default_rng(0)
    prompt = rng.integers(args.prompt // 2, args.prompt * 3 // 2, size=B).astype(np.int32)
    cfg = jv.CacheConfig(num_layers=L, max_batch=B, max_seq=int(prompt.max()) + steps + 1, kv_heads=hkv,
                         head_dim=head_dim, layers_per_group=layers_per_group)
    weights = make_weights(jax.random.key(0), L, d_model, d_model + 2 * hkv * head_dim, d_ff, jnp.bfloat16)
    h0 = jax.random.normal(jax.random.key(1), (B, d_model), jnp.bfloat16)
    loops = {
        "grow_in_graph": decode_loop(steps, hkv, head_dim, grow=True),
        "premapped": decode_loop(steps, hkv, head_dim, grow=True),
        "no_grow": decode_loop(steps, hkv, head_dim, grow=False),
    }
    results = {name: [] for name in loops}
    with jv.KVCacheManager(cfg) as m:
        slots = np.array([m.allocate() for _ in range(B)], np.int32)
        cache = m.cache(slots, prompt)

        def reset(premap: bool):
            for s, _ in zip(slots, prompt):
                m.free(int(s))
            m.trim()  # unmap everything: each run starts from the same mapped state
            for s, n in zip(slots, prompt):
                assert m.allocate() >= 0
                m.grow(int(s), int(n) + (steps + 1 if premap else 0))

        # Correctness first: no cache copy, lengths advance, tokens land, nothing extra is mapped.
        assert_no_cache_copy(loops["grow_in_graph"].lower(weights, cache, h0).compile().as_text(), m)
        reset(False)
        state, h = loops["grow_in_graph"](weights, cache, h0)
        np.testing.assert_array_equal(np.asarray(state.lengths), prompt + steps)
        m.check_device_errors()  # every write landed inside backed capacity
        need = sum(-(-(int(n) + steps) * cfg.token_bytes // cfg.page_bytes) for n in prompt) * cfg.num_tensors
        assert m.stats().pages_mapped == need, (m.stats().pages_mapped, need)
        assert bool(jnp.isfinite(h.astype(jnp.float32)).all())
        for name, loop in loops.items():  # compile, and refuse to run a loop that copies the cache
            assert_no_cache_copy(loop.lower(weights, cache, h0).compile().as_text(), m)
            reset(name != "grow_in_graph")
            jax.block_until_ready(loops[name](weights, cache, h0))
        for _ in range(args.repeats):  # interleaved, so drift hits all three alike
            for name, loop in loops.items():
                reset(name != "grow_in_graph")  # no_grow writes into premapped pages too
                t0 = time.perf_counter()
                jax.block_until_ready(loop(weights, cache, h0))
                results[name].append((time.perf_counter() - t0) / steps * 1e6)
        stats = m.stats()
    out = {name: dict(step_us=median(ts), all_us=ts) for name, ts in results.items()}
    out["ratio_grow_vs_premapped"] = out["grow_in_graph"]["step_us"] / out["premapped"]["step_us"]
    out["ratio_grow_vs_no_grow"] = out["grow_in_graph"]["step_us"] / out["no_grow"]["step_us"]
    out["ratio_premapped_vs_no_grow"] = out["premapped"]["step_us"] / out["no_grow"]["step_us"]
    out["config"] = dict(layers=L, layers_per_group=layers_per_group, tokens_per_page=cfg.tokens_per_page,
                         batch=B, steps=steps, prompt_mean=args.prompt, d_model=d_model, d_ff=d_ff,
                         max_seq=m.max_seq,
                         page_crossings=int(sum((-(-(p + steps) * cfg.token_bytes // cfg.page_bytes))
                                                - (-(-p * cfg.token_bytes // cfg.page_bytes))
                                                for p in prompt.tolist())))
    out["mapped_bytes_end"] = stats.mapped_bytes
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small model and few steps")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    cpu = jax.default_backend() == "cpu"
    if args.quick and cpu:  # the host backend: a smoke run of the same code (the weight matmuls dominate on a CPU)
        args.layers, args.batch, args.steps, args.prompt, args.d_model, args.d_ff = 4, 4, 48, 64, 1024, 1024
        args.repeats = min(args.repeats, 2)
    elif args.quick:
        args.layers, args.batch, args.steps, args.prompt, args.d_model, args.d_ff = 8, 32, 128, 1024, 2048, 4096
        args.repeats = min(args.repeats, 3)
    else:  # Llama-3-8B shapes
        args.layers, args.batch, args.steps, args.prompt, args.d_model, args.d_ff = 32, 32, 256, 1024, 4096, 14336
    print(f"device: {device_name()}", flush=True)
    pages = 128 if args.quick else 512  # per layout, over all its tensors
    costs = {}
    for g in (1, LLAMA_LAYERS):
        c = page_costs(layers_per_group=g, pages=pages)
        costs[f"{c['tokens_per_page']}_tokens_per_page"] = c
        print(f"per-page costs, g={g} ({c['tokens_per_page']} tokens/page, {c['num_tensors']} tensors, "
              f"{c['pages']} pages):", {k: round(v, 1) for k, v in c.items() if k.endswith("_us")}, flush=True)
    steps = {}
    for g in (1, args.layers):  # per-layer, and every layer of the model in one group
        step = step_overhead(args, layers_per_group=g)
        steps[f"{step['config']['tokens_per_page']}_tokens_per_page"] = step
        print(f"decode step, g={g}: ratio_grow_vs_premapped {step['ratio_grow_vs_premapped']:.4f}", flush=True)
    granularities = list(costs)
    md = ["| measure | " + " | ".join(g.replace("_", " ") for g in granularities) + " |",
          "|---|" + "---|" * len(granularities)]
    for key in costs[granularities[0]]:
        if key.endswith("_us"):
            md.append(f"| {key} | " + " | ".join(f"{costs[g][key]:.1f} us/page" for g in granularities) + " |")
    md += ["", "| decode loop | " + " | ".join(s.replace("_", " ") for s in steps) + " |",
           "|---|" + "---|" * len(steps)]
    for name in ("grow_in_graph", "premapped", "no_grow"):
        md.append(f"| step, {name} | " + " | ".join(f"{st[name]['step_us']:.1f} us" for st in steps.values()) + " |")
    for k in ("ratio_grow_vs_premapped", "ratio_grow_vs_no_grow", "ratio_premapped_vs_no_grow"):
        md.append(f"| {k} | " + " | ".join(f"{st[k]:.4f}" for st in steps.values()) + " |")
    for name, st in steps.items():
        md.append(f"| config, {name.replace('_', ' ')} | {st['config']} |")
    table = "\n".join(md)
    print(table)
    paths = write_results("alloc" + ("_quick" if args.quick else ""), dict(page_costs_us=costs, decode_step=steps),
                          table)
    print("wrote", *paths)


if __name__ == "__main__":
    main()
