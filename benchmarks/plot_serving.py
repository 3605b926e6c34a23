"""Plot a serving benchmark's timeline: physical KV memory and batch size over time, per configuration.

    python benchmarks/plot_serving.py benchmarks/results/serving_sharegpt_<device>.json

``bench_serving.py`` calls ``plot`` itself when matplotlib is installed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

GIB = 1 << 30
SHOWN = ("vattention", "paged16", "static", "vattention-no-reclaim")


def plot(payload: dict, path, *, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (mem, batch) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    for name, r in payload["results"].items():
        if name not in SHOWN or not r["timeline"]:
            continue
        t = [row[0] for row in r["timeline"]]
        mem.plot(t, [row[2] / GIB for row in r["timeline"]], label=f"{name} (mapped/used)")
        if name.startswith("vattention"):
            mem.plot(t, [row[3] / GIB for row in r["timeline"]], ls=":", label=f"{name} (pages created)")
        batch.plot(t, [row[1] for row in r["timeline"]], label=name)
    budget = payload.get("config", {}).get("budget_bytes")
    if budget:
        mem.axhline(budget / GIB, color="k", lw=0.8, ls="--", label="KV budget")
    mem.set_ylabel("physical KV (GiB)")
    batch.set_ylabel("requests in the step")
    batch.set_xlabel("time since the run started (s)")
    mem.legend(fontsize=7, loc="upper right")
    batch.legend(fontsize=7, loc="upper right")
    fig.suptitle(title or "serving timeline")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("json", type=Path)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    payload = json.loads(args.json.read_text())
    out = plot(payload, args.out or args.json.with_suffix(".png"), title=f"{args.json.stem}")
    print("wrote", out)


if __name__ == "__main__":
    main()
