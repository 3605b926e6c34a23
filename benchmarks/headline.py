"""The headline of issue 16: ``benchmarks/results/headline_<device>.json``, from three ``bench_serving.py`` runs.

Each workload is one ``bench_serving.py`` process, so every ratio in it is measured side by side in one process
(same model, same seeded workload, same KV budget):

  sharegpt   1000 ShareGPT-like requests, B <= 128, 24 GiB of KV, a 2048-token step budget:
             vattention, the premapped control, paged16 and static
  long       prompts of 8K-32K: vattention, paged16 and static
  tight      the ShareGPT-like workload at 8 GiB of KV, B <= 256: vattention and paged16

    python benchmarks/headline.py                        # all three workloads, then the headline
    python benchmarks/headline.py --workloads sharegpt   # one of them (a device call is at most 10 minutes)
    python benchmarks/headline.py --workloads ""         # the headline from the result files already written

The paged baseline is ``kv_cache="paged"`` with 16-token pages: JAX's Pallas ``paged_attention`` for decode rows
and our varlen kernel over a gathered copy for prefill rows (JAX has no paged prefill kernel). FlashAttention-3
paged, what vLLM runs on Hopper, is not wired into the engine yet, so ``vs_paged`` is against the JAX kernel and
equals ``vs_paged_jax``; ``paged_kernel`` names what ran.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
PAGED_KERNEL = ("jax.experimental.pallas.ops.gpu.paged_attention (decode) + the varlen prefill kernel over a "
                "gathered copy (prefill); flash-attn3-jax is not wired into the engine")
COMMON = ["--max-prefill-rows", "8", "--tag", "headline"]
# workload -> (bench_serving.py arguments, the result file's stem bench_serving.py derives from them)
WORKLOADS = {
    "sharegpt": (["--requests", "1000", "--max-batch", "128", "--budget-tokens", "196608", "--token-budget", "2048",
                  "--configs", "vattention,vattention-premapped,paged16,static", *COMMON],
                 "serving_sharegpt_1000req_b128_headline"),
    "long": (["--workload", "long", "--requests", "32", "--token-budget", "2048", "--configs",
              "vattention,paged16,static", *COMMON], "serving_long_32req_headline"),
    "tight": (["--requests", "1000", "--max-batch", "256", "--budget-gib", "8", "--token-budget", "2048",
               "--configs", "vattention,paged16", *COMMON], "serving_sharegpt_1000req_b256_8gib_headline"),
}


def _ratio(results: dict, a: str, b: str, key: str = "output_tokens_per_s") -> float | None:
    if a in results and b in results and results[b].get(key):
        return results[a][key] / results[b][key]
    return None


def headline(runs: dict[str, dict]) -> dict:
    """The headline keys from the workloads' ``bench_serving.py`` payloads (``{workload: payload}``)."""
    out: dict = {}
    if "sharegpt" in runs:
        r = runs["sharegpt"]["results"]
        v = r["vattention"]
        out["sharegpt"] = dict(
            total_tokens_per_s=v.get("total_tokens_per_s"), output_tokens_per_s=v["output_tokens_per_s"],
            roofline_fraction=v.get("roofline_fraction"), vs_paged=_ratio(r, "vattention", "paged16"),
            vs_paged_jax=_ratio(r, "vattention", "paged16"), vs_static=_ratio(r, "vattention", "static"),
            physical_kv_vs_paged=_ratio(r, "vattention", "paged16", "peak_physical_kv_bytes"),
            # the control over vAttention (<= 1.02: demand mapping costs at most 2%)
            premapped_ratio=_ratio(r, "vattention-premapped", "vattention"))
    if "long" in runs:
        r = runs["long"]["results"]
        out["long"] = dict(output_tokens_per_s=r["vattention"]["output_tokens_per_s"],
                           vs_paged=_ratio(r, "vattention", "paged16"), vs_static=_ratio(r, "vattention", "static"))
    if "tight" in runs:
        r = runs["tight"]["results"]
        out["tight"] = dict(output_tokens_per_s=r["vattention"]["output_tokens_per_s"],
                            vs_paged=_ratio(r, "vattention", "paged16"))
    devices = {p.get("device") for p in runs.values()}
    if len(devices) > 1:
        raise SystemExit(f"the workloads' results come from different devices: {sorted(map(str, devices))}")
    out["paged_kernel"] = PAGED_KERNEL
    out["device"] = devices.pop() if devices else None
    out["command"] = "python benchmarks/headline.py"
    out["workload_commands"] = {w: "python benchmarks/bench_serving.py " + " ".join(WORKLOADS[w][0]) for w in runs}
    return out


def markdown(h: dict) -> str:
    rows = [f"device: {h['device']}; paged kernel: {h['paged_kernel']}", "", "| workload | key | value |",
            "|---|---|---|"]
    for w in ("sharegpt", "long", "tight"):
        for k, x in h.get(w, {}).items():
            rows.append(f"| {w} | {k} | {'n/a' if x is None else f'{x:.3f}' if isinstance(x, float) else x} |")
    rows += ["", f"command: `{h['command']}`"] + [f"- {w}: `{c}`" for w, c in h["workload_commands"].items()]
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help="workloads to run first (comma-separated)")
    ap.add_argument("--device-slug", default=None,
                    help="whose result files to read (default: this machine's first device)")
    args = ap.parse_args(argv)
    todo = [w for w in args.workloads.split(",") if w]
    unknown = set(todo) - set(WORKLOADS)
    if unknown:
        raise SystemExit(f"unknown workloads {sorted(unknown)}; choose from {sorted(WORKLOADS)}")
    for w in todo:
        cmd = [sys.executable, str(HERE / "bench_serving.py"), *WORKLOADS[w][0]]
        print("+", " ".join(cmd), flush=True)
        if subprocess.run(cmd, env=dict(os.environ)).returncode:
            raise SystemExit(f"{w}: bench_serving.py failed")
    slug = args.device_slug
    if slug is None:
        sys.path.insert(0, str(HERE))
        from common import device_slug

        slug = device_slug()
    runs = {}
    for w, (_, stem) in WORKLOADS.items():
        path = RESULTS / f"{stem}_{slug}.json"
        if path.exists():
            payload = json.loads(path.read_text())
            if not payload.get("partial"):
                runs[w] = payload
    if not runs:
        raise SystemExit(f"no complete headline workload results for {slug} in {RESULTS}")
    h = headline(runs)
    (RESULTS / f"headline_{slug}.json").write_text(json.dumps(h, indent=2) + "\n")
    (RESULTS / f"headline_{slug}.md").write_text(f"# headline on {h['device']}\n\n{markdown(h)}\n")
    if os.environ.get("OUT"):
        for ext in ("json", "md"):
            Path(os.environ["OUT"], f"headline_{slug}.{ext}").write_text((RESULTS / f"headline_{slug}.{ext}")
                                                                         .read_text())
    print(markdown(h))
    missing = sorted(set(WORKLOADS) - set(runs))
    if missing:
        print(f"not yet run on {slug}: {missing}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
