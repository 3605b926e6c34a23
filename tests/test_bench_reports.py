"""The benchmarks' report code (CPU): serving occupancy from a step timeline, the attention sweep merge."""

import json
import pathlib
import sys

import pytest

BENCH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
bench_serving = pytest.importorskip("bench_serving")
bench_attention = pytest.importorskip("bench_attention")

GIB = 1 << 30
PAGE = 2 << 20


def serving_result(name, timeline, tput, peak_physical=GIB):
    return dict(name=name, requests_per_s=1.0, output_tokens_per_s=tput, ttft_p50_s=0.5, ttft_p99_s=1.0,
                tbt_p50_s=0.02, tbt_p99_s=0.03, peak_batch=max(r[1] for r in timeline),
                peak_used_kv_bytes=max(r[2] for r in timeline), peak_physical_kv_bytes=peak_physical,
                preemptions=0, timeline=timeline)


def test_occupancy_is_time_weighted():
    budget, layers = GIB, 2
    near = budget - PAGE  # within one page per tensor (2 layers x K,V = 4 pages) of the budget
    # steps: 1 s at batch 10, 2 s at batch 20 (at the budget), 1 s at batch 20; the last row only ends the run
    tl = [(0.0, 10, 0, 0), (1.0, 20, near, near), (3.0, 20, budget // 2, budget), (4.0, 1, 0, 0)]
    slack = 2 * layers * PAGE
    o = bench_serving.occupancy(tl, budget, full_batch=20, slack_bytes=slack)
    assert o["batch_avg"] == pytest.approx((10 * 1 + 20 * 2 + 20 * 1) / 4)
    assert o["full"] == pytest.approx(3 / 4)
    assert o["at_budget"] == pytest.approx(2 / 4)
    assert o["step_ms"] == pytest.approx(1e3 * 4 / 3)
    assert o["step_ms_full"] == pytest.approx(1e3 * 3 / 2)
    assert bench_serving.occupancy(tl[:1], budget, 20, slack) == {}


def test_serving_report_from_json():
    tl_a = [(0.0, 64, GIB, GIB), (1.0, 64, GIB, GIB), (2.0, 0, 0, 0)]
    tl_b = [(0.0, 32, GIB // 2, GIB), (2.0, 0, 0, 0)]
    payload = dict(results={"vattention": serving_result("vattention", tl_a, 300.0),
                            "vattention-premapped": serving_result("vattention-premapped", tl_a, 290.0, 4 * GIB),
                            "paged16": serving_result("paged16", tl_b, 200.0)},
                   ratios={"vattention_vs_paged16": 1.5}, targets={"a >= 1.2x paged16 (sharegpt)": True},
                   checks={}, compile_s={"vattention": 1.0},
                   config=dict(layers=2, preset="p", requests=3, max_batch=64, max_seq=4096, budget_bytes=GIB,
                               budget_tokens=1, token_budget=512, chunk=512, lookahead=64, workload="w", seed=0))
    md = bench_serving.markdown(json.loads(json.dumps(payload)))  # as read back from the JSON
    assert "vattention_vs_paged16 **1.500**" in md and "PASS" in md
    rows = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ")}
    assert "| 64.0 | 100% | 100% |" in rows["vattention"]
    assert "outside the budget" in rows["vattention-premapped"]
    assert "| 32.0 | 0% | 0% |" in rows["paged16"] and "n/a" in rows["paged16"]


def attention_part(device, decode, peak):
    return dict(device=device, platform="x", jax="0", samples=1, chain=1, mode="full (part x)",
                copy_peak_GBps=peak, vmm=None, prefill=[],
                decode=[dict(B=b, context=c, ours=dict(us=1.0, GBps=peak * f, frac_peak_copy_bw=f))
                        for b, c, f in decode])


def test_attention_merge_joins_parts(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_attention, "RESULTS", tmp_path)
    a = tmp_path / "a.json"
    b = tmp_path / "b.json"
    a.write_text(json.dumps(attention_part("GPU X", [(32, 4096, 0.95), (8, 4096, 0.6)], 2800.0)))
    b.write_text(json.dumps(attention_part("GPU X", [(8, 1024, 0.5)], 2900.0)))
    bench_attention.merge_parts([a, b])
    merged = json.loads((tmp_path / "attention_gpu-x.json").read_text())
    assert [(r["B"], r["context"]) for r in merged["decode"]] == [(8, 1024), (8, 4096), (32, 4096)]
    assert merged["copy_peak_GBps_per_part"] == [2800.0, 2900.0]
    assert any("B=8 ctx=4096: 60%" in t and "FAIL" in t for t in merged["targets"])
    assert any("B=32 ctx=4096: 95%" in t and "PASS" in t for t in merged["targets"])
    assert "(median of the parts' 2800, 2900)" in (tmp_path / "attention_gpu-x.md").read_text()


@pytest.mark.parametrize("devices,shapes,error", [
    (("GPU X", "GPU Y"), ((8, 1024), (8, 4096)), "different devices"),
    (("GPU X", "GPU X"), ((8, 4096), (8, 4096)), "more than one part"),
])
def test_attention_merge_refuses_parts_that_do_not_fit(tmp_path, monkeypatch, devices, shapes, error):
    monkeypatch.setattr(bench_attention, "RESULTS", tmp_path)
    paths = [tmp_path / "a.json", tmp_path / "b.json"]
    for path, device, (b, ctx) in zip(paths, devices, shapes):
        path.write_text(json.dumps(attention_part(device, [(b, ctx, 0.5)], 1.0)))
    with pytest.raises(SystemExit, match=error):
        bench_attention.merge_parts(paths)
