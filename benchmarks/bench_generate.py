"""End-to-end generation with a Llama-3-8B-shaped model (bf16, random weights): vAttention vs static cache.

One process, one model, three ways to run the same requests (batch 32, prompt 512,
256 new tokens by default; greedy, no stop tokens, so every step does the same work):

  vattention : vAttention cache; pages mapped by the grow FFI call inside the
               compiled prefill and decode loop as rows cross page boundaries
  premapped  : the same cache and compiled programs, every page a request needs
               mapped on the host before prefill (the in-graph grow maps nothing)
  static     : the same model on an XLA-allocated [batch, max_seq] cache

Reported: tokens/s (decode and overall), peak physical KV bytes (pages mapped
vs the static buffers), and time per decode step inside the jitted
``lax.while_loop``; the goal is vattention / premapped <= 1.02.

Before timing: a first (untimed, compiling) run on each cache must give the same
greedy tokens, and the compiled decode loop must not copy the cache
(``assert_no_cache_copy``).
Each timed vattention run starts with nothing mapped (``trim()`` after the
previous run), so its loop really maps every page it uses.

    python benchmarks/bench_generate.py            # full (GPU, ~30 GB)
    python benchmarks/bench_generate.py --quick    # 4 layers, batch 16, prompt 256, 64 new tokens
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from common import device_name, median, write_results  # noqa: E402

import jax_vattention as jv  # noqa: E402
import models  # noqa: E402
from jax_vattention.hlo import assert_no_cache_copy  # noqa: E402
from models.testing import assert_same_greedy  # noqa: E402

MIB, GIB = 1 << 20, 1 << 30


def size(nbytes: int) -> str:
    return f"{nbytes / GIB:.2f} GiB" if nbytes >= GIB else f"{nbytes / MIB:.1f} MiB"


def pool_bytes(cfg, cache_cfg, batch, tokens) -> int:
    """Pages for ``batch`` requests of ``tokens`` tokens in every layer tensor (plus one spare page each)."""
    tpp = cache_cfg.page_bytes // cache_cfg.token_bytes
    return 2 * cfg.num_layers * batch * (-(-tokens // tpp) + 1) * cache_cfg.page_bytes


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="4 layers, batch 16, prompt 256, 64 new tokens")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--max-seq", type=int, default=4096, help="slot length; the static cache holds batch x this")
    ap.add_argument("--prompt-spread", type=int, default=0,
                    help="ragged prompts, uniform in [prompt - spread, prompt + spread] (default 0: all equal)")
    ap.add_argument("--layers", type=int, default=None, help="override the preset's layer count")
    ap.add_argument("--preset", default="llama-3-8b", help="model shape (default llama-3-8b)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    cfg = models.get_preset(args.preset)
    if args.quick:
        args.batch, args.prompt, args.new_tokens, args.repeats = 16, 256, 64, min(args.repeats, 2)
        args.layers = args.layers or 4
    if args.layers:
        cfg = cfg.replace(num_layers=args.layers)
    B, P, N = args.batch, args.prompt, args.new_tokens
    print(f"device: {device_name()}; model {cfg.num_layers} layers of {args.preset} shape "
          f"({models.config.param_count_str(cfg)} params, bf16, random weights); batch {B}, prompt {P}, {N} new",
          flush=True)
    model = models.random_model(cfg, seed=0, dtype=jnp.bfloat16)
    gen = models.Generator(model)  # auto: Pallas decode / chunked-prefill kernels on the GPU
    rng = np.random.default_rng(0)
    lens = rng.integers(P - args.prompt_spread, P + args.prompt_spread + 1, size=B) if args.prompt_spread else [P] * B
    prompts = [rng.integers(0, cfg.vocab_size, size=int(n)).tolist() for n in lens]
    cache_cfg = models.cache_config_for(cfg, max_batch=B, max_seq=args.max_seq, dtype="bfloat16")
    cache_cfg = models.cache_config_for(cfg, max_batch=B, max_seq=args.max_seq, dtype="bfloat16",
                                        pool_bytes=pool_bytes(cfg, cache_cfg, B, P + args.prompt_spread + N))
    tpp = cache_cfg.page_bytes // cache_cfg.token_bytes
    crossings = 2 * cfg.num_layers * sum(-(-(int(n) + N - 1) // tpp) - -(-int(n) // tpp) for n in lens)
    print(f"{tpp} tokens per {cache_cfg.page_bytes // MIB} MiB page: the decode loop maps {crossings} pages "
          "in-graph as rows cross page boundaries", flush=True)
    params = jv.SamplingParams(max_tokens=N, ignore_eos=True)
    results = {name: [] for name in ("vattention", "premapped", "static")}
    with jv.KVCacheManager(cache_cfg) as m:
        # -- correctness first (untimed runs that also compile): both caches give the same greedy tokens,
        # and the compiled vAttention decode loop copies no cache tensor.
        first = gen.generate(prompts, m, params)
        m.trim()
        for compiled in gen.compiled_programs()["decode"]:
            assert_no_cache_copy(compiled.as_text(), m)
        static = models.static_cache_for(cfg, max_batch=B, max_seq=m.max_seq, dtype="bfloat16")
        first_static = gen.generate(prompts, static, params)
        static = first_static.static_cache
        ties = assert_same_greedy(first.tokens, first_static.tokens, prompts, model, tie_tol=0.05,
                                  what="vattention vs static")
        compile_s = first.compile_seconds + first_static.compile_seconds
        print(f"correctness: same greedy tokens on both caches ({ties} near-tie divergences); the decode loop "
              f"has no cache-sized copy; compiled in {compile_s:.1f} s", flush=True)
        for rep in range(args.repeats):
            for name in results:
                if name == "static":
                    r = gen.generate(prompts, static, params)
                    static = r.static_cache
                else:
                    maps0 = m.stats().maps
                    r = gen.generate(prompts, m, params, premap=name == "premapped")
                    r.maps = m.stats().maps - maps0
                    m.trim()  # the next run starts with nothing mapped
                assert [len(t) for t in r.tokens] == [N] * B and r.decode_steps == N - 1
                results[name].append(r)
                print(f"  rep {rep} {name:10s}: decode step {r.decode_seconds / r.decode_steps * 1e6:8.1f} us, "
                      f"{r.decode_tokens_per_second:9.1f} tok/s decode, prefill {r.prefill_seconds * 1e3:7.1f} ms",
                      flush=True)
        reserved = m.stats().reserved_bytes

    summary = {}
    for name, runs in results.items():
        steps = [r.decode_seconds / r.decode_steps for r in runs]
        summary[name] = dict(
            decode_step_us=median(steps) * 1e6, all_step_us=[s * 1e6 for s in steps],
            decode_tokens_per_s=median([r.decode_tokens_per_second for r in runs]),
            tokens_per_s=median([r.tokens_per_second for r in runs]),
            prefill_ms=median([r.prefill_seconds for r in runs]) * 1e3,
            kv_bytes=runs[-1].mapped_bytes if name != "static" else runs[-1].static_cache.nbytes,
            kv_bytes_needed=runs[-1].needed_bytes,
        )
        if name != "static":
            summary[name]["pages_mapped_in_run"] = runs[-1].maps
    assert summary["vattention"]["pages_mapped_in_run"] > 0 and summary["premapped"]["pages_mapped_in_run"] > 0
    ratio = summary["vattention"]["decode_step_us"] / summary["premapped"]["decode_step_us"]
    summary["ratio_vattention_vs_premapped"] = ratio
    step_us = {name: summary[name]["decode_step_us"] for name in results}
    summary["ratio_vattention_vs_static"] = step_us["vattention"] / step_us["static"]
    summary["config"] = dict(layers=cfg.num_layers, batch=B, prompt=P, new_tokens=N, max_seq=args.max_seq,
                             prompt_spread=args.prompt_spread, page_bytes=cache_cfg.page_bytes,
                             reserved_bytes=reserved, decode_loop_page_maps=crossings,
                             compile_seconds=compile_s, preset=args.preset,
                             attention=gen.attn.resolve(jnp.bfloat16, cfg.head_dim, jax.devices()[0].platform).impl)

    md = ["| | vAttention (in-graph growth) | vAttention (premapped) | static cache |", "|---|---|---|---|"]
    row = lambda label, key, fmt: md.append(  # noqa: E731
        f"| {label} | " + " | ".join(fmt(summary[n][key]) for n in ("vattention", "premapped", "static")) + " |")
    row("decode step (us, median)", "decode_step_us", lambda v: f"{v:.1f}")
    row("decode tokens/s", "decode_tokens_per_s", lambda v: f"{v:,.0f}")
    row("tokens/s (prefill + decode)", "tokens_per_s", lambda v: f"{v:,.0f}")
    row("prefill (ms)", "prefill_ms", lambda v: f"{v:.1f}")
    row("peak physical KV", "kv_bytes", size)
    row("KV the tokens need", "kv_bytes_needed", size)
    md.append(f"\nratio decode step vattention / premapped: **{ratio:.4f}** (goal <= 1.02); "
              f"vattention / static: {summary['ratio_vattention_vs_static']:.4f}")
    md.append(f"\nconfig: {summary['config']}")
    table = "\n".join(md)
    print(table)
    name = "generate" + ("_quick" if args.quick else "")
    name += f"_spread{args.prompt_spread}" if args.prompt_spread else ""
    if args.preset != "llama-3-8b":
        name += "_" + args.preset
    paths = write_results(name, summary, table)
    print("wrote", *paths)


if __name__ == "__main__":
    main()
