"""Tensor parallelism (issue 19): TP2 against TP1 in one process, and a model one GPU cannot hold, on TP2.

1. **Interconnect.** All-reduce bandwidth over the two devices (``psum`` of a bf16 array inside ``shard_map``):
   bus bandwidth as NCCL reports it (``2 (n - 1) / n`` x bytes / time), the NVLink or PCIe figure of the result.
2. **Decode at a fixed batch** (Llama-3-8B shape, ``--batch`` rows at ``--ctx`` tokens of context): the same seeded
   bf16 weights on one device (TP1) and sharded over two (TP2), each on its own vAttention cache. Correctness
   first: a short prefill on both must agree (logits within bf16 rounding, the same greedy tokens); then decode
   steps are timed. ``tp2_vs_tp1`` is TP2's decode tokens/s over TP1's.
3. **``--serve-70b``**: the Llama-3-70B shape with random bf16 weights, initialized where their shards live (it is
   never whole on one device), served by ``LLM(tensor_parallel=2)`` on a ShareGPT-like workload: throughput,
   TTFT, time between tokens and KV memory per device. The result states why TP1 cannot hold it (weight bytes
   against one device's memory).

Writes ``tp_<device>.json`` / ``.md``.

    python benchmarks/bench_tp.py                  # two GPUs
    python benchmarks/bench_tp.py --serve-70b
    python benchmarks/bench_tp.py --quick          # tiny preset on two host devices (a CPU smoke run)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

if "--quick" in sys.argv:  # two host devices; jax reads the flag when it starts
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2"
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from common import device_name, write_results  # noqa: E402

import jax_vattention as jv  # noqa: E402
import models  # noqa: E402
from jax_vattention.attention import AttentionSpec  # noqa: E402
from jax_vattention.engine.llm import tensor_parallel_mesh  # noqa: E402
from jax_vattention.sharded_manager import ShardedKVCacheManager  # noqa: E402

GIB = 1 << 30


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama-3-8b")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=32, help="timed decode steps")
    ap.add_argument("--allreduce-mib", type=int, default=256)
    ap.add_argument("--serve-70b", action="store_true")
    ap.add_argument("--requests", type=int, default=256, help="requests of the 70B serving run")
    ap.add_argument("--kv-gib", type=float, default=24.0, help="KV pool per device of the 70B serving run")
    ap.add_argument("--quick", action="store_true", help="tiny preset, small sizes, two host devices")
    args = ap.parse_args(argv)
    if args.quick:
        args.preset, args.batch, args.ctx, args.steps, args.allreduce_mib = "tiny", 4, 64, 4, 4
    return args


def allreduce_bus_gbps(mesh, mib: int, repeats: int = 10) -> float:
    n = mesh.devices.size
    x = jax.device_put(jnp.ones((n, mib * (1 << 20) // 2), jnp.bfloat16), NamedSharding(mesh, P("tp")))
    f = jax.jit(jax.shard_map(lambda v: jax.lax.psum(v, "tp"), mesh=mesh, in_specs=P("tp"), out_specs=P("tp")))
    f(x).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(repeats):
        y = f(x)
    y.block_until_ready()
    seconds = (time.perf_counter() - t0) / repeats
    return 2 * (n - 1) / n * (mib * (1 << 20)) / seconds / 1e9


def decode(model, manager, args, cfg, dtype: str) -> dict:
    """Correctness prefill on two fresh rows, then ``args.steps`` timed decode steps over ``args.batch`` rows at
    ``args.ctx`` tokens."""
    attn = AttentionSpec(max_len=args.ctx + args.steps + 64)
    make = manager.cache if isinstance(manager, ShardedKVCacheManager) else (
        lambda s, n: jv.KVCache.create(manager, s, n))

    @jax.jit
    def step(tokens, positions, cache):
        c = cache.grow(cache.lengths + tokens.shape[1])
        logits, c = model(tokens, positions, c, attn=attn)
        return logits[:, -1], c.export()

    rng = np.random.default_rng(0)
    check_slots = [manager.allocate(0) for _ in range(2)]
    prompt = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 48)), jnp.int32)
    logits, _ = step(prompt, jnp.broadcast_to(jnp.arange(48, dtype=jnp.int32), (2, 48)), make(check_slots, [0, 0]))
    check = np.asarray(logits.astype(jnp.float32))
    for s in check_slots:
        manager.free(s)
    slots = [manager.allocate(args.ctx + args.steps) for _ in range(args.batch)]
    cache = make(slots, [args.ctx] * args.batch)
    tokens = jnp.zeros((args.batch, 1), jnp.int32)
    state = cache.state
    for i in range(args.steps + 2):  # two warmup steps
        if i == 2:
            jax.block_until_ready(state)
            t0 = time.perf_counter()
        logits, state = step(tokens, (args.ctx + i) * jnp.ones((args.batch, 1), jnp.int32), cache.with_state(state))
        tokens = jnp.argmax(logits, -1).astype(jnp.int32)[:, None]
    jax.block_until_ready(state)
    seconds = (time.perf_counter() - t0) / args.steps
    for s in slots:
        manager.free(s)
    return dict(step_ms=seconds * 1e3, tokens_per_s=args.batch / seconds, check_logits=check, dtype=dtype)


def serve_70b(args, mesh) -> dict:
    from jax_vattention.engine import LLM
    from jax_vattention.engine.workloads import sharegpt_like

    cfg = models.get_preset("llama-3-70b")
    weight_bytes = cfg.num_params() * 2
    device_bytes = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
    model = models.random_model(cfg, seed=0, dtype=jnp.bfloat16, mesh=mesh)
    wl = sharegpt_like(args.requests, vocab_size=cfg.vocab_size, seed=0)
    with LLM(model, tensor_parallel=2, max_batch=64, max_seq=4096, pool_bytes=int(args.kv_gib * GIB),
             token_budget=2048, chunk_size=512, max_prefill_rows=8) as llm:
        llm.warmup()
        t0 = time.perf_counter()
        outs = llm.generate(wl.prompts, [p for p in wl.params], progress=True)
        wall = time.perf_counter() - t0
        s = llm.stats.summary(outs, wall)
        per_device = [x.physical_bytes for x in llm.manager.device_stats().per_device]
    return dict(weights_gb=weight_bytes / 1e9, one_device_bytes=device_bytes,
                tp1_fits=bool(device_bytes and weight_bytes < device_bytes),
                output_tokens_per_s=s["output_tokens_per_s"], total_tokens_per_s=s["total_tokens_per_s"],
                ttft_p50_s=s["ttft_p50_s"], ttft_p99_s=s["ttft_p99_s"], tbt_p50_s=s["tbt_p50_s"],
                tbt_p99_s=s["tbt_p99_s"], kv_physical_bytes_per_device=per_device)


def main(argv=None):
    args = parse_args(argv)
    mesh = tensor_parallel_mesh(2)
    cfg = models.get_preset(args.preset)
    dtype = "float32" if jax.devices()[0].platform == "cpu" else "bfloat16"
    print(f"device: {device_name()} x {mesh.devices.size}; {args.preset} ({models.config.param_count_str(cfg)}), "
          f"{dtype}; decode B={args.batch} at ctx {args.ctx}", flush=True)
    bus = allreduce_bus_gbps(mesh, args.allreduce_mib)
    print(f"all-reduce bus bandwidth {bus:.1f} GB/s ({args.allreduce_mib} MiB)", flush=True)
    cache_cfg = jv.CacheConfig(num_layers=cfg.num_layers, max_batch=args.batch + 2, max_seq=args.ctx + args.steps + 64,
                               kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, dtype=dtype,
                               layers_per_group=cfg.num_layers)  # the engine's default layout
    with jv.KVCacheManager(cache_cfg, device=jax.devices()[0]) as m1:
        tp1 = decode(models.random_model(cfg, seed=1, dtype=jnp.dtype(dtype)), m1, args, cfg, dtype)
    jax.clear_caches()
    with ShardedKVCacheManager(cache_cfg, mesh) as m2:
        tp2 = decode(models.random_model(cfg, seed=1, dtype=jnp.dtype(dtype), mesh=mesh), m2, args, cfg, dtype)
    a, b = tp1.pop("check_logits"), tp2.pop("check_logits")
    scale = float(np.abs(a).max())
    err = float(np.abs(a - b).max()) / scale
    same_tokens = bool((a.argmax(-1) == b.argmax(-1)).all())
    tol = 1e-5 if dtype == "float32" else 3e-2
    print(f"check: TP2 logits within {err:.2e} of TP1's (relative to the largest), same greedy tokens: "
          f"{same_tokens}", flush=True)
    if err > tol:
        raise SystemExit(f"TP2 does not match TP1 ({err:.2e} > {tol}); not timing")
    ratio = tp2["tokens_per_s"] / tp1["tokens_per_s"]
    print(f"decode: TP1 {tp1['tokens_per_s']:.0f} tok/s ({tp1['step_ms']:.2f} ms/step), TP2 {tp2['tokens_per_s']:.0f} "
          f"tok/s ({tp2['step_ms']:.2f} ms/step): tp2_vs_tp1 {ratio:.3f}", flush=True)
    payload = dict(tp2_vs_tp1=ratio, allreduce_bus_gb_per_s=bus, allreduce_mib=args.allreduce_mib,
                   decode=dict(tp1=tp1, tp2=tp2, batch=args.batch, ctx=args.ctx, steps=args.steps,
                               check_relative_error=err, check_same_tokens=same_tokens, preset=args.preset),
                   targets={"tp2_vs_tp1 >= 1.8": ratio >= 1.8},
                   command="python benchmarks/bench_tp.py " + " ".join(sys.argv[1:] if argv is None else argv))
    if args.serve_70b:
        payload["serve_70b"] = serve_70b(args, mesh)
        print(f"70B on TP2: {payload['serve_70b']}", flush=True)
    md = (f"all-reduce bus bandwidth {bus:.1f} GB/s; decode B={args.batch} ctx {args.ctx}: TP1 "
          f"{tp1['tokens_per_s']:.0f} tok/s, TP2 {tp2['tokens_per_s']:.0f} tok/s, **tp2_vs_tp1 {ratio:.3f}** "
          f"(target 1.8); check: relative error {err:.2e}, same tokens {same_tokens}")
    print("wrote", *write_results("tp" + ("_quick" if args.quick else ""), payload, md))


if __name__ == "__main__":
    main()
