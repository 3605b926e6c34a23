"""Long engine run (issue 6): 10,000 requests through one ``LLM``, then nothing may be left behind.

Runs a seeded ShareGPT-like workload of short requests (prompt median 16, at most
64 tokens; output median 8, at most 32) on the tiny preset (or ``--preset``), on
the default device (the GPU when there is one), in ``generate()`` calls of
``--chunk`` requests (so the outputs held stay bounded), and checks:

* every request finished with reason ``length`` and exactly ``max_tokens`` tokens;
* between chunks no slot stays allocated and the manager's books balance;
* after the whole run, the first ``--recheck`` requests regenerate the same greedy
  tokens (state left by 10,000 requests changes no output);
* ``close()`` leaves nothing: no page mapped, created or reserved (the manager's
  own counters), and the memory comes back:

  - GPU: the driver's free memory (``cuMemGetInfo`` through a probe
    ``KVCacheManager`` that maps nothing) rises at ``close()`` by at least the
    pool's physical bytes minus one page; over the whole run, free memory may
    only drop by what XLA's own allocator grew (``memory_stats()["pool_bytes"]``:
    activations, kept for reuse) plus ``--mem-slack-mib`` for what lives outside
    both (loaded executables, cuBLAS workspaces);
  - CPU: the host backend's page file (memfd) holds no more resident bytes after
    ``close()`` than before the engine was created, and no page of it is mapped
    in the cache's address ranges (``/proc/self/maps``).

Prints a summary table and writes ``results/long_run_<device>.{json,md}``
(and to ``$OUT`` when set). Exit status 1 when a check fails.

    python benchmarks/long_run.py                       # 10,000 requests (GPU: about a minute)
    python benchmarks/long_run.py --requests 300        # CPU smoke check
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import threading
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import jax_vattention as jv  # noqa: E402
import models  # noqa: E402
from jax_vattention.attention import AttentionSpec  # noqa: E402
from jax_vattention.engine import LLM  # noqa: E402
from jax_vattention.engine.workloads import sharegpt_like  # noqa: E402
from jax_vattention.manager import default_device  # noqa: E402

MIB = 1 << 20
STAT_KEYS = ("reserved_bytes", "mapped_bytes", "physical_bytes", "pages_mapped", "pages_free", "live_slots",
             "creates", "destroys", "maps", "unmaps")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--chunk", type=int, default=500, help="requests per generate() call")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on GPU, float32 on CPU")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompt-median", type=float, default=16)
    ap.add_argument("--max-prompt", type=int, default=64)
    ap.add_argument("--output-median", type=float, default=8, help="outputs are at least 8 tokens (workloads)")
    ap.add_argument("--max-output", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-seq", type=int, default=None, help="default: the longest request, rounded up to 64")
    ap.add_argument("--token-budget", type=int, default=256)
    ap.add_argument("--chunk-size", type=int, default=64)
    ap.add_argument("--max-prefill-rows", type=int, default=4)
    ap.add_argument("--min-decode-bucket", type=int, default=8, help="smallest decode batch compiled (fewer shapes)")
    ap.add_argument("--min-prefill-bucket", type=int, default=16, help="smallest prefill chunk compiled")
    ap.add_argument("--page-bytes", type=int, default=None,
                    help="default: 2 MiB on GPU (the VMM granularity), 4 KiB on CPU (requests cross pages)")
    ap.add_argument("--pool-mib", type=float, default=None,
                    help="page pool budget (default: every slot at max_seq; smaller forces preemption)")
    ap.add_argument("--overlap", default="thread", choices=("thread", "inline", "off"))
    ap.add_argument("--attn", default=None, help="AttentionSpec impl (default: the platform's; CPU: reference)")
    ap.add_argument("--recheck", type=int, default=32, help="regenerate the first N requests at the end")
    ap.add_argument("--mem-slack-mib", type=float, default=64.0,
                    help="GPU: free memory the whole run may lose beyond XLA's allocator growth")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--name", default="long_run", help="result file stem")
    return ap.parse_args(argv)


# -- memory probes ---------------------------------------------------------------------
class GpuMemory:
    """Driver free memory via a probe manager (reserves a little address space, maps nothing)."""

    kind = "cuda-driver"

    def __init__(self, device):
        self.device = device
        self.probe = jv.KVCacheManager(jv.CacheConfig(num_layers=1, max_batch=1, max_seq=1, kv_heads=1, head_dim=8,
                                                      dtype="float32", pool_bytes=2 * MIB), device=device)

    def free(self) -> int:
        jax.effects_barrier()
        return self.probe.device_mem_info()[0]

    def xla_pool(self) -> int:
        stats = self.device.memory_stats() or {}
        return int(stats.get("pool_bytes", stats.get("bytes_reserved", 0)))

    def close(self):
        self.probe.close()


class HostMemory:
    """Resident bytes of the host backend's page files (every ``memfd:jax_vattention_pool`` this process has)."""

    kind = "host-memfd"

    def resident(self) -> int:
        total = 0
        for fd in os.listdir("/proc/self/fd"):
            try:
                if os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:jax_vattention_pool"):
                    total += os.stat(f"/proc/self/fd/{fd}").st_blocks * 512
            except OSError:
                pass  # closed meanwhile
        return total

    def close(self):
        pass


def tensor_ranges(manager) -> list[tuple[int, int]]:
    """``[start, end)`` of every reserved tensor (per-layer K and V, or interleaved groups)."""
    n = manager._native.slot_bytes * manager.config.max_batch
    return [(a, a + n) for a in (manager._native.tensor_address(t) for t in range(manager.config.num_tensors))]


def mapped_in(ranges) -> int:
    """Bytes of the host page file mapped inside ``ranges`` (from /proc/self/maps)."""
    total = 0
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and "jax_vattention_pool" in parts[5]:
                start, end = (int(x, 16) for x in parts[0].split("-"))
                total += sum(max(0, min(end, hi) - max(start, lo)) for lo, hi in ranges)
    return total


def stat_dict(manager) -> dict:
    s = manager.stats()
    return {k: int(getattr(s, k)) for k in STAT_KEYS}


def books_balance(manager) -> str | None:
    s = manager.stats()
    if s.live_slots:
        return f"{s.live_slots} slots still allocated"
    if s.pages_mapped != s.pages_mapped_free_slots:
        return f"{s.pages_mapped - s.pages_mapped_free_slots} pages mapped to no free slot"
    if not s.pages_created == s.pages_mapped + s.pages_free <= s.pages_budget:
        return f"pages created {s.pages_created} != mapped {s.pages_mapped} + free {s.pages_free}"
    if s.maps - s.unmaps != s.pages_mapped or s.creates - s.destroys != s.pages_created:
        return "map/unmap or create/destroy counters disagree with the pages"
    return None


def map_ahead_threads() -> int:
    return sum(t.name.startswith("vattn-map-ahead") for t in threading.enumerate())


# -- the run ---------------------------------------------------------------------------------
def main(argv=None) -> dict:
    args = parse_args(argv)
    device = default_device()
    on_gpu = device.platform == "gpu"
    dtype = args.dtype or ("bfloat16" if on_gpu else "float32")
    page_bytes = args.page_bytes or (2 * MIB if on_gpu else 4096)
    cfg = models.get_preset(args.preset)
    work = sharegpt_like(args.requests, vocab_size=cfg.vocab_size, seed=args.seed, prompt_median=args.prompt_median,
                         max_prompt=args.max_prompt, output_median=args.output_median, max_output=args.max_output)
    max_seq = args.max_seq or -(-work.max_len() // 64) * 64
    attn = AttentionSpec(impl=args.attn) if args.attn else (None if on_gpu else AttentionSpec(impl="reference"))
    print(f"device: {common.device_name(device)}; {args.preset} ({dtype}); {work.describe()}", flush=True)

    threads_at_start = map_ahead_threads()  # other engines of this process (a test run) keep theirs
    model = models.random_model(cfg, seed=args.seed, dtype=jnp.dtype(dtype))
    jax.block_until_ready(jax.tree.leaves(model))
    mem = GpuMemory(device) if on_gpu else HostMemory()
    memory = {"kind": mem.kind}
    if on_gpu:
        memory.update(free_before=mem.free(), xla_pool_before=mem.xla_pool())
    else:
        memory.update(resident_before=mem.resident())

    llm = LLM(model, max_batch=args.max_batch, max_seq=max_seq, dtype=dtype, page_bytes=page_bytes,
              pool_bytes=None if args.pool_mib is None else int(args.pool_mib * MIB),
              token_budget=args.token_budget, chunk_size=args.chunk_size, max_prefill_rows=args.max_prefill_rows,
              min_decode_bucket=args.min_decode_bucket, min_prefill_bucket=args.min_prefill_bucket,
              overlap_allocation=args.overlap, attn=attn)
    manager = llm.manager
    warmup_s = llm.warmup()  # every step shape compiled now: modules and workspaces load before the baseline
    manager.trim(release_physical=True)  # the warmup's pages go back to the device
    if on_gpu:
        memory.update(free_warm=mem.free(), xla_pool_warm=mem.xla_pool())
    ranges = tensor_ranges(manager)
    problems: list[str] = []
    completed = incomplete = output_tokens = preemptions = errors = 0
    first_outputs: list[list[int]] = []
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    with tqdm(total=len(work), disable=args.no_progress, desc="long run", unit="req", mininterval=2.0) as bar:
        for lo in range(0, len(work), args.chunk):
            prompts, params = work.prompts[lo:lo + args.chunk], work.params[lo:lo + args.chunk]
            outs = llm.generate(prompts, params)
            for o, p in zip(outs, params):
                c = o.outputs[0]
                if c.finish_reason == "length" and len(c.token_ids) == p.max_tokens:
                    completed += 1
                else:
                    incomplete += 1
                    if len(problems) < 20:
                        problems.append(f"request {o.request_id}: {c.finish_reason} after {len(c.token_ids)} of "
                                        f"{p.max_tokens} tokens ({o.error})")
                errors += c.finish_reason == "error"
                output_tokens += len(c.token_ids)
                preemptions += o.metrics.num_preemptions
            if lo == 0:
                first_outputs = [o.outputs[0].token_ids for o in outs[:args.recheck]]
            if (bad := books_balance(manager)) is not None:
                problems.append(f"after requests {lo}..{lo + len(outs) - 1}: {bad}")
            s = manager.stats()
            bar.update(len(outs))
            bar.set_postfix(steps=llm.stats.steps, mapped=f"{s.mapped_bytes / MIB:.0f}MiB", preempt=preemptions)
    run_s = time.perf_counter() - t0

    n_re = min(args.recheck, args.chunk, len(work))
    again = [o.outputs[0].token_ids for o in llm.generate(work.prompts[:n_re], work.params[:n_re])]
    recheck_same = sum(a == b for a, b in zip(again, first_outputs))
    if recheck_same != n_re:
        problems.append(f"recheck: {n_re - recheck_same} of the first {n_re} requests regenerated different tokens")

    before_close = stat_dict(manager)
    threads_before = map_ahead_threads()
    if on_gpu:
        memory["free_before_close"] = mem.free()
    else:
        memory["resident_before_close"] = mem.resident()
        memory["mapped_before_close"] = mapped_in(ranges)
    engine = dict(steps=llm.stats.steps, compiled_shapes=llm.num_compiled, peak_batch=llm.stats.peak_batch,
                  peak_physical_bytes=llm.stats.peak_physical_bytes, schedule_s=llm.stats.schedule_s,
                  map_ahead_s=llm.stats.map_ahead_s)
    llm.close()
    del llm
    gc.collect()
    after_close = stat_dict(manager)
    threads_after = map_ahead_threads()
    if not manager.closed:
        problems.append("the manager is not closed after LLM.close()")
    for k in ("reserved_bytes", "mapped_bytes", "physical_bytes", "pages_mapped", "pages_free", "live_slots"):
        if after_close[k]:
            problems.append(f"after close: {k} = {after_close[k]}")
    if threads_after > threads_at_start:
        problems.append(f"{threads_after - threads_at_start} vattn-map-ahead threads of this engine alive after close")
    if on_gpu:
        memory.update(free_after_close=mem.free(), xla_pool_after=mem.xla_pool())
        returned = memory["free_after_close"] - memory["free_before_close"]
        # The run is judged from the warm baseline (after compiling every shape); the drop from before the
        # engine existed (compiled modules, library workspaces) is reported alongside.
        xla_growth = max(0, memory["xla_pool_after"] - memory["xla_pool_warm"])
        lost = memory["free_warm"] - memory["free_after_close"]
        memory.update(returned_at_close=returned, xla_growth=xla_growth, lost_over_run=lost,
                      unexplained=lost - xla_growth, lost_since_before_engine=memory["free_before"] -
                      memory["free_after_close"], warmup_s=warmup_s)
        if returned < before_close["physical_bytes"] - page_bytes:
            problems.append(f"close() returned {returned / MIB:.1f} MiB to the device, but the pool held "
                            f"{before_close['physical_bytes'] / MIB:.1f} MiB")
        if lost - xla_growth > args.mem_slack_mib * MIB:
            problems.append(f"free device memory dropped {lost / MIB:.1f} MiB over the run; XLA's allocator grew "
                            f"{xla_growth / MIB:.1f} MiB; {(lost - xla_growth) / MIB:.1f} MiB unexplained "
                            f"(> {args.mem_slack_mib} MiB slack)")
    else:
        memory.update(resident_after_close=mem.resident(), mapped_after_close=mapped_in(ranges))
        if memory["resident_after_close"] > memory["resident_before"]:
            problems.append(f"host page files hold {memory['resident_after_close']} bytes after close, "
                            f"{memory['resident_before']} before the engine")
        if memory["mapped_after_close"]:
            problems.append(f"{memory['mapped_after_close']} bytes still mapped in the cache's ranges after close")
    mem.close()

    prompt_tokens = work.prompt_tokens
    payload = dict(
        requests=len(work), completed=completed, incomplete=incomplete, errors=errors, preemptions=preemptions,
        prompt_tokens=prompt_tokens, output_tokens=output_tokens, expected_output_tokens=work.output_tokens,
        run_s=run_s, requests_per_s=len(work) / run_s, tokens_per_s=(prompt_tokens + output_tokens) / run_s,
        recheck=n_re, recheck_same=recheck_same, engine=engine, stats_before_close=before_close,
        stats_after_close=after_close,
        map_ahead_threads=dict(at_start=threads_at_start, before_close=threads_before, after_close=threads_after),
        memory=memory, problems=problems, ok=not problems,
        config=dict(vars(args), dtype=dtype, page_bytes=page_bytes, max_seq=max_seq, workload=work.describe()),
    )

    def mib(x):
        return f"{x / MIB:.1f} MiB"

    rows = [
        ("requests completed / total", f"{completed} / {len(work)} ({incomplete} incomplete, {errors} errors)"),
        ("tokens (prompt + output)", f"{prompt_tokens} + {output_tokens} (expected {work.output_tokens})"),
        ("wall time", f"{run_s:.1f} s ({len(work) / run_s:.0f} req/s, "
                      f"{(prompt_tokens + output_tokens) / run_s:.0f} tok/s)"),
        ("engine steps / compiled shapes", f"{engine['steps']} / {engine['compiled_shapes']}"),
        ("preemptions", str(preemptions)),
        ("peak batch / peak physical KV", f"{engine['peak_batch']} / {mib(engine['peak_physical_bytes'])}"),
        ("recheck (same tokens)", f"{recheck_same} / {n_re}"),
        ("before close: mapped / physical / reserved",
         f"{mib(before_close['mapped_bytes'])} / {mib(before_close['physical_bytes'])} / "
         f"{mib(before_close['reserved_bytes'])}"),
        ("after close: mapped / physical / reserved",
         f"{mib(after_close['mapped_bytes'])} / {mib(after_close['physical_bytes'])} / "
         f"{mib(after_close['reserved_bytes'])}"),
        ("maps / unmaps / creates / destroys (lifetime)",
         f"{after_close['maps']} / {after_close['unmaps']} / {after_close['creates']} / {after_close['destroys']}"),
        ("map-ahead threads: at start / before close / after close",
         f"{threads_at_start} / {threads_before} / {threads_after}"),
    ]
    if on_gpu:
        rows += [("device free: before engine / warm (all shapes compiled) / before close / after close",
                  f"{mib(memory['free_before'])} / {mib(memory['free_warm'])} / {mib(memory['free_before_close'])} / "
                  f"{mib(memory['free_after_close'])}"),
                 ("returned at close (pool held)", f"{mib(memory['returned_at_close'])} "
                                                   f"({mib(before_close['physical_bytes'])})"),
                 ("lost since warm / XLA allocator growth since warm / unexplained",
                  f"{mib(memory['lost_over_run'])} / {mib(memory['xla_growth'])} / {mib(memory['unexplained'])}")]
    else:
        rows += [("host page files resident: before / before close / after close",
                  f"{mib(memory['resident_before'])} / {mib(memory['resident_before_close'])} / "
                  f"{mib(memory['resident_after_close'])}"),
                 ("mapped in cache ranges: before close / after close",
                  f"{mib(memory['mapped_before_close'])} / {mib(memory['mapped_after_close'])}")]
    rows.append(("result", "OK" if not problems else "FAILED: " + "; ".join(problems[:5])))
    markdown = (f"{work.describe()}; {args.preset} {dtype}, max_batch {args.max_batch}, max_seq {max_seq}, "
                f"page {page_bytes} B, overlap {args.overlap}\n\n| | |\n|---|---|\n"
                + "\n".join(f"| {k} | {v} |" for k, v in rows))
    print(markdown, flush=True)
    json_path, _ = common.write_results(args.name, payload, markdown)
    print(f"wrote {json_path}")
    return payload


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
