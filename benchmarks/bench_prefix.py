"""Prefix caching (issue 20): vAttention's page aliasing against the paged baseline's block sharing, in one process.

One model (Llama-3-8B shape, bf16, random weights), the same KV budget and engine settings for every configuration:

  vattention             prefix caching on: cached pages mapped into new slots (``EngineConfig.enable_prefix_caching``)
  vattention-no-prefix   the same engine with prefix caching off
  vattention-per-layer   (optional) prefix caching on the per-layer layout: 1024 tokens a page for Llama-3-8B, so
                         only prefixes of whole 1024-token pages are shared
  paged16                block tables of 16-token pages with prefix caching on: block-table entries point at the
                         cached pages (vLLM's block sharing)
  paged16-no-prefix      (optional) the paged baseline without sharing

Two workloads, run on each configuration in turn, each starting from an empty prefix cache:

  system   ``--requests`` requests, all queued at t=0, each a shared system prompt of ``--system-len`` tokens and a
           ShareGPT-like user turn of its own
  chat     ``--conversations`` conversations of ``--turns`` turns; each turn re-sends the whole conversation (every
           earlier prompt and the model's answers) plus a new user message, as a chat client does

Before timing, every configuration generates a check set of prompts that share a prefix (one after another, so
later ones hit the cache) whose tokens must each be a near-argmax of a cache-free forward, and compiles its step
shapes. Reported per configuration and workload: TTFT p50/p99, time between tokens, throughput, hit rate and
tokens reused, peak KV in use (distinct pages live slots hold) and peak physical KV (device bytes the pool holds).

    python benchmarks/bench_prefix.py            # full size
    python benchmarks/bench_prefix.py --quick    # 4 layers, few requests

Keys of ``prefix_<device>.json``: ``ttft_p50_speedup`` (system workload: TTFT p50 with caching off over on),
``vs_paged_sharing`` (output tokens/s over paged16's, system workload; ``vs_paged_sharing_chat`` for chat) and
``physical_kv_vs_paged`` (peak physical KV over paged16's, system workload; ``live_kv_vs_paged``: peak KV in use).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from bench_serving import check_near_greedy  # noqa: E402
from common import device_name, write_results  # noqa: E402

import models  # noqa: E402
from jax_vattention.attention import AttentionSpec  # noqa: E402
from jax_vattention.engine import LLM, EngineStats, SamplingParams  # noqa: E402
from jax_vattention.engine.workloads import chat_turns, conversation_prompts, shared_system_prompt  # noqa: E402

GIB = 1 << 30
CONFIGS = {
    "vattention": dict(kv_cache="vattention", enable_prefix_caching=True),
    "vattention-no-prefix": dict(kv_cache="vattention", enable_prefix_caching=False),
    "vattention-per-layer": dict(kv_cache="vattention", enable_prefix_caching=True, layers_per_group=1),
    "paged16": dict(kv_cache="paged", page_size=16, enable_prefix_caching=True),
    "paged16-no-prefix": dict(kv_cache="paged", page_size=16, enable_prefix_caching=False),
}
DEFAULT_CONFIGS = "vattention,vattention-no-prefix,paged16"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama-3-8b")
    ap.add_argument("--layers", type=int, default=None, help="override the preset's layer count")
    ap.add_argument("--requests", type=int, default=256, help="requests of the system-prompt workload")
    ap.add_argument("--system-len", type=int, default=1536, help="tokens of the shared system prompt")
    ap.add_argument("--conversations", type=int, default=64)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--max-batch", type=int, default=256)
    ap.add_argument("--max-seq", type=int, default=4096)
    ap.add_argument("--budget-gib", type=float, default=24.0, help="KV budget of every configuration")
    ap.add_argument("--token-budget", type=int, default=2048, help="tokens per step")
    ap.add_argument("--chunk", type=int, default=512, help="largest prefill chunk")
    ap.add_argument("--max-prefill-rows", type=int, default=8)
    ap.add_argument("--page-bytes", type=int, default=None,
                    help="vAttention page size (default: the engine's, 2 MiB; smaller for a CPU smoke run)")
    ap.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"from {', '.join(CONFIGS)}")
    ap.add_argument("--workloads", default="system,chat",
                    help="which workloads to run (system carries the issue's three targets; one call of the device "
                         "tool fits all configurations on it alone)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compile-threads", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="4 layers, 48 requests, 12 conversations, batch 32")
    args = ap.parse_args(argv)
    if args.quick:
        args.layers = args.layers or 4
        args.requests, args.conversations, args.max_batch = 48, 12, min(args.max_batch, 32)
        args.system_len = min(args.system_len, 512)
        args.budget_gib = min(args.budget_gib, 1.0)
    configs = [c for c in args.configs.split(",") if c]
    unknown = sorted(set(configs) - set(CONFIGS))
    if unknown or not configs:
        ap.error(f"unknown or no configs {unknown}; choose from {list(CONFIGS)}")
    args.configs = configs
    workloads = [w for w in args.workloads.split(",") if w]
    if not workloads or set(workloads) - {"system", "chat"}:
        ap.error(f"--workloads takes system and/or chat, got {args.workloads!r}")
    args.workloads = workloads
    return args


def reset(llm) -> None:
    """An empty prefix cache and nothing mapped, so each workload starts cold."""
    if llm.scheduler.prefix is not None:
        llm.scheduler.prefix.evict(1 << 40)
    if llm.config.kv_cache == "vattention":
        llm.manager.trim()
    llm.stats = EngineStats()


def run_system(llm, wl) -> tuple[list, float]:
    t0 = time.perf_counter()
    outs = llm.generate(wl.prompts, wl.params, progress=True)
    return outs, time.perf_counter() - t0


def run_chat(llm, turns) -> tuple[list, float]:
    """Every turn of every conversation; a turn's prompts are the conversations so far (``conversation_prompts``)."""
    history: list[list[int]] = []
    answers: list[list[int]] = []
    outs_all, wall = [], 0.0
    for t, wl in enumerate(turns):
        prompts = wl.prompts if t == 0 else conversation_prompts(history, answers, wl.prompts)
        t0 = time.perf_counter()
        outs = llm.generate(prompts, wl.params, progress=True)
        wall += time.perf_counter() - t0
        history, answers = prompts, [list(o.outputs[0].token_ids) for o in outs]
        outs_all += outs
    return outs_all, wall


def figures(name: str, outs, wall: float, llm) -> dict:
    s = llm.stats.summary(outs, wall)
    keep = ("requests", "output_tokens_per_s", "total_tokens_per_s", "prompt_tokens", "output_tokens", "ttft_p50_s",
            "ttft_p99_s", "tbt_p50_s", "tbt_p99_s", "peak_batch", "peak_used_kv_bytes", "peak_physical_kv_bytes",
            "preemptions", "prefix_cache_hit_rate", "prefix_cache_hit_tokens", "prefix_cache_query_tokens",
            "prefix_cache_pages", "prefix_cache_evicted_pages")
    return dict(name=name, wall_s=wall, **{k: s[k] for k in keep if k in s})


def check(model, llm, vocab: int, seed: int) -> dict:
    """Prompts sharing a prefix, one after another (later ones hit the cache): every generated token a near-argmax of
    a cache-free forward; with caching on, some tokens must have been reused."""
    rng = np.random.default_rng(seed)
    tpp = llm.pool.tokens_per_page
    system = rng.integers(0, vocab, size=2 * tpp + 7).tolist()  # two full pages and some
    prompts = [system + rng.integers(0, vocab, size=40).tolist() for _ in range(4)]  # one length: one forward
    sp = SamplingParams(max_tokens=6)
    got = [llm.generate([p], sp)[0].outputs[0].token_ids for p in prompts]
    tol = 0.15
    frac, worst = check_near_greedy(model, prompts, got, tol)
    hits = (llm.scheduler.prefix.stats()["prefix_cache_hit_tokens"] if llm.scheduler.prefix is not None else 0)
    return dict(frac_tokens_off=frac, worst_deficit=worst, tol=tol, hit_tokens=hits)


def markdown(payload: dict) -> str:
    md = ["| workload | config | out tok/s | total tok/s | TTFT p50 / p99 (s) | TBT p50 / p99 (ms) | hit rate "
          "| tokens reused | peak KV in use / physical (GiB) | peak batch | preempt |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for wname, rows in payload["results"].items():
        for name, r in rows.items():
            md.append(f"| {wname} | {name} | {r['output_tokens_per_s']:.0f} | {r['total_tokens_per_s']:.0f} | "
                      f"{r['ttft_p50_s']:.2f} / {r['ttft_p99_s']:.2f} | {r['tbt_p50_s'] * 1e3:.1f} / "
                      f"{r['tbt_p99_s'] * 1e3:.1f} | {r.get('prefix_cache_hit_rate', 0):.1%} | "
                      f"{r.get('prefix_cache_hit_tokens', 0)} | {r['peak_used_kv_bytes'] / GIB:.2f} / "
                      f"{r['peak_physical_kv_bytes'] / GIB:.2f} | {r['peak_batch']} | {r['preemptions']} |")
    md.append("\nratios (same run): " + ", ".join(f"{k} **{v:.3f}**" for k, v in payload["ratios"].items()))
    md.append("\ntargets: " + ", ".join(f"{k}: {'PASS' if ok else 'FAIL'}" for k, ok in payload["targets"].items()))
    md.append(f"\nchecks: {payload['checks']}\n\nsetup: {payload['config']}")
    return "\n".join(md)


def main(argv=None):
    args = parse_args(argv)
    cfg = models.get_preset(args.preset)
    cfg = cfg.replace(num_layers=args.layers or cfg.num_layers)
    token_bytes = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2  # K and V of every layer, bf16
    budget = int(args.budget_gib * GIB) // token_bytes * token_bytes
    system = shared_system_prompt(args.requests, vocab_size=cfg.vocab_size, seed=args.seed, system_len=args.system_len)
    chat = chat_turns(args.conversations, args.turns, vocab_size=cfg.vocab_size, seed=args.seed + 1)
    ignore = [dataclasses.replace(w, params=[dataclasses.replace(p, ignore_eos=True) for p in w.params])
              for w in (system, *chat)]
    system, chat = ignore[0], ignore[1:]
    longest_chat = max(sum(len(w.prompts[i]) + w.params[i].max_tokens for w in chat) for i in range(len(chat[0])))
    if max(system.max_len(), longest_chat) > args.max_seq:
        raise SystemExit(f"a request may reach {max(system.max_len(), longest_chat)} tokens > --max-seq "
                         f"{args.max_seq}")
    print(f"device: {device_name()}; {cfg.num_layers} layers of {args.preset}, bf16, random weights\n"
          f"system: {system.describe()}\nchat: {args.conversations} conversations x {args.turns} turns\n"
          f"KV budget {budget / GIB:.2f} GiB; max_batch {args.max_batch}, token budget {args.token_budget}, chunk "
          f"{args.chunk}", flush=True)
    model = models.random_model(cfg, seed=0, dtype=jnp.bfloat16)
    common = dict(max_batch=args.max_batch, max_seq=args.max_seq, attn=AttentionSpec(max_len=args.max_seq),
                  token_budget=args.token_budget, chunk_size=args.chunk, max_prefill_rows=args.max_prefill_rows,
                  min_token_bucket=32, pool_bytes=budget,
                  **({} if args.page_bytes is None else dict(page_bytes=args.page_bytes)))
    results: dict[str, dict] = {w: {} for w in args.workloads}
    result_name = "prefix" + ("_quick" if args.quick else "")
    checks, compile_s = {}, {}
    for name in args.configs:
        with LLM(model, **common, **CONFIGS[name]) as llm:
            checks[name] = c = check(model, llm, cfg.vocab_size, args.seed + 7)
            print(f"  check {name}: {c}", flush=True)
            if c["frac_tokens_off"] > 0.05 or c["worst_deficit"] > 1.0:
                raise SystemExit(f"{name}: generated tokens do not match a cache-free forward; not timing it")
            if llm.config.enable_prefix_caching and c["hit_tokens"] == 0:
                raise SystemExit(f"{name}: the check reused no cached token; prefix caching is not working")
            compile_s[name] = llm.warmup(compile_threads=args.compile_threads)
            runs = {"system": lambda: run_system(llm, system), "chat": lambda: run_chat(llm, chat)}
            for wname in args.workloads:
                run = runs[wname]
                reset(llm)
                outs, wall = run()
                r = results[wname][name] = figures(name, outs, wall, llm)
                print(f"  {wname:6s} {name:22s} {r['output_tokens_per_s']:8.0f} out tok/s  TTFT p50 "
                      f"{r['ttft_p50_s']:.3f}s p99 {r['ttft_p99_s']:.3f}s  hit rate "
                      f"{r.get('prefix_cache_hit_rate', 0):.1%}  KV in use {r['peak_used_kv_bytes'] / GIB:.2f} GiB",
                      flush=True)
            write_results(result_name, dict(results=results, partial=True), "partial")

    ratios, targets = {}, {}
    sysr, chatr = results.get("system", {}), results.get("chat", {})
    if "vattention" in sysr and "vattention-no-prefix" in sysr:
        ratios["ttft_p50_speedup"] = sysr["vattention-no-prefix"]["ttft_p50_s"] / sysr["vattention"]["ttft_p50_s"]
        ratios["ttft_p99_speedup"] = sysr["vattention-no-prefix"]["ttft_p99_s"] / sysr["vattention"]["ttft_p99_s"]
        ratios["throughput_vs_no_prefix"] = (sysr["vattention"]["output_tokens_per_s"]
                                             / sysr["vattention-no-prefix"]["output_tokens_per_s"])
        targets["TTFT p50 >= 3x lower with caching on (system)"] = ratios["ttft_p50_speedup"] >= 3.0
    if "vattention" in sysr and "paged16" in sysr:
        ratios["vs_paged_sharing"] = sysr["vattention"]["output_tokens_per_s"] / sysr["paged16"]["output_tokens_per_s"]
        ratios["physical_kv_vs_paged"] = (sysr["vattention"]["peak_physical_kv_bytes"]
                                          / sysr["paged16"]["peak_physical_kv_bytes"])
        ratios["live_kv_vs_paged"] = sysr["vattention"]["peak_used_kv_bytes"] / sysr["paged16"]["peak_used_kv_bytes"]
        targets["throughput >= paged with sharing (system)"] = ratios["vs_paged_sharing"] >= 1.0
        targets["physical KV <= 1.05x paged's"] = ratios["physical_kv_vs_paged"] <= 1.05
    if "vattention" in chatr and "paged16" in chatr:
        ratios["vs_paged_sharing_chat"] = (chatr["vattention"]["output_tokens_per_s"]
                                           / chatr["paged16"]["output_tokens_per_s"])
    payload = dict(results=results, ratios=ratios, targets=targets, checks=checks, compile_s=compile_s,
                   command="python benchmarks/bench_prefix.py " + " ".join(sys.argv[1:] if argv is None else argv),
                   config=dict(preset=args.preset, layers=cfg.num_layers, budget_bytes=budget,
                               max_batch=args.max_batch, max_seq=args.max_seq, token_budget=args.token_budget,
                               chunk=args.chunk, max_prefill_rows=args.max_prefill_rows, system=system.describe(),
                               conversations=args.conversations, turns=args.turns, workloads=args.workloads,
                               seed=args.seed), **ratios)
    table = markdown(payload)
    print(table)
    print("wrote", *write_results(result_name, payload, table))


if __name__ == "__main__":
    main()
