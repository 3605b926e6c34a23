"""``jax-vattention bench``: run the serving engine on a seeded synthetic workload and print its metrics.

    jax-vattention bench                                  # tiny model, 64 ShareGPT-like requests
    jax-vattention bench --preset llama-3.2-1b --requests 500 --max-batch 32 --kv-cache paged

(``jax-vattention serve`` is the OpenAI-compatible HTTP server.)
"""

from __future__ import annotations

import os
import sys

MIB = 1 << 20


def add_bench_parser(sub) -> None:
    s = sub.add_parser(
        "bench", help="continuous batching on a synthetic workload (vAttention, paged or static KV)",
        description="Run the continuous-batching engine on a seeded ShareGPT-like or long-context workload with a "
                    "random-weight model preset and print throughput, latency and KV memory.")
    s.add_argument("--preset", default="tiny", help="model shape with seeded random weights (default: tiny)")
    s.add_argument("--layers", type=int, default=None, help="override the preset's layer count")
    s.add_argument("--workload", default="sharegpt", choices=["sharegpt", "long"])
    s.add_argument("--requests", type=int, default=64)
    s.add_argument("--prompt-median", type=float, default=None, help="ShareGPT-like prompt median (default 256)")
    s.add_argument("--output-median", type=float, default=None, help="ShareGPT-like output median (default 192)")
    s.add_argument("--kv-cache", default="vattention", choices=["vattention", "paged", "static"])
    s.add_argument("--max-batch", type=int, default=16)
    s.add_argument("--max-seq", type=int, default=None, help="default: the workload's longest request")
    s.add_argument("--pool-mib", type=float, default=None, help="KV budget (default: every slot at max_seq)")
    s.add_argument("--token-budget", type=int, default=512)
    s.add_argument("--chunk-size", type=int, default=256)
    s.add_argument("--overlap", default="thread", choices=["thread", "inline", "off"])
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--no-progress", action="store_true")


def run_bench(args) -> int:
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave GPU memory to the page pool
    import jax.numpy as jnp

    import models
    from jax_vattention import VAttentionError, default_device
    from jax_vattention.engine import LLM
    from jax_vattention.engine.workloads import long_context, sharegpt_like

    for name in ("requests", "max_batch", "token_budget", "chunk_size"):
        if getattr(args, name) <= 0:
            print(f"error: --{name.replace('_', '-')} must be positive", file=sys.stderr)
            return 2
    try:
        cfg = models.get_preset(args.preset)
    except (KeyError, ValueError, models.ModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.layers is not None:
        if args.layers <= 0:
            print(f"error: --layers must be positive, got {args.layers}", file=sys.stderr)
            return 2
        cfg = cfg.replace(num_layers=args.layers)
    if args.workload == "long":
        wl = long_context(args.requests, vocab_size=cfg.vocab_size, seed=args.seed)
    else:
        kw = {k: v for k, v in (("prompt_median", args.prompt_median), ("output_median", args.output_median))
              if v is not None}
        wl = sharegpt_like(args.requests, vocab_size=cfg.vocab_size, seed=args.seed, **kw)
    max_seq = -(-wl.max_len() // 64) * 64 if args.max_seq is None else args.max_seq
    if max_seq < wl.max_len():  # before any compilation: the run could not admit its longest request
        print(f"error: --max-seq {max_seq} is shorter than the workload's longest request ({wl.max_len()} tokens)",
              file=sys.stderr)
        return 2
    gpu = default_device().platform == "gpu"
    dtype = "bfloat16" if gpu else "float32"
    model = models.random_model(cfg, seed=args.seed, dtype=jnp.dtype(dtype))
    pool = None if args.pool_mib is None else int(args.pool_mib * MIB)
    print(f"{args.preset} ({cfg.num_layers} layers, {dtype}) on {default_device()}; {wl.describe()}", flush=True)
    try:
        with LLM(model, kv_cache=args.kv_cache, max_batch=args.max_batch, max_seq=max_seq, pool_bytes=pool,
                 page_bytes=None if gpu else 64 * 1024, token_budget=args.token_budget, chunk_size=args.chunk_size,
                 overlap_allocation=args.overlap, max_prefill_rows=4, min_token_bucket=16) as llm:
            import time

            print(f"compiled {len(llm.step_shapes())} step shapes in {llm.warmup():.1f} s (before timing)",
                  flush=True)
            t0 = time.perf_counter()
            outs = llm.generate(wl.prompts, wl.params, progress=not args.no_progress)
            wall = time.perf_counter() - t0
            m = llm.stats.summary(outs, wall)
            rows = [
                ("requests", f"{m['requests']} ({m['completed']} complete)"),
                ("throughput", f"{m['requests_per_s']:.2f} req/s, {m['output_tokens_per_s']:.0f} output tok/s "
                               f"({wall:.1f} s)"),
                ("TTFT p50 / p99", f"{m['ttft_p50_s']:.3f} / {m['ttft_p99_s']:.3f} s"),
                ("time between tokens p50 / p99", f"{m['tbt_p50_s'] * 1e3:.1f} / {m['tbt_p99_s'] * 1e3:.1f} ms"),
                ("peak batch", str(m["peak_batch"])),
                ("peak KV used / physical",
                 f"{m['peak_used_kv_bytes'] / MIB:.1f} / {m['peak_physical_kv_bytes'] / MIB:.1f} MiB"),
                ("steps / compiled shapes / preemptions", f"{m['steps']} / {llm.num_compiled} / {m['preemptions']}"),
            ]
    except (VAttentionError, models.ModelError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    print("closed: nothing reserved or mapped" if args.kv_cache != "vattention" or llm.manager.closed else "LEAK")
    return 0
