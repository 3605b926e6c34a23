"""The benchmarks' report code (CPU): serving occupancy from a step timeline, the attention sweep merge."""

import json
import math
import pathlib
import sys

import numpy as np
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


def test_serving_report_shows_the_roofline_and_the_arrivals():
    tl = [(0.0, 64, GIB, GIB), (1.0, 64, GIB, GIB), (2.0, 0, 0, 0)]
    rf = dict(roofline_fraction=0.412, roofline_fraction_padded=0.655, floor_s=0.824, floor_padded_s=1.31,
              wall_s=2.0, steps=100, step_ms=20.0, floor_ms=8.24, compute_bound_steps=0.25, tokens_per_step=130.0,
              padded_tokens_per_step=180.0, padding_fraction=0.3846, rows_per_step=60.0, padded_rows_per_step=64.0,
              kv_tokens_per_step=9000.0, achieved_tflops=149.0, achieved_read_GBps=900.0, idle_s=0.2,
              idle_fraction=0.1, idle_ms_per_step=2.0, empty_s=0.0)
    results = {"vattention": dict(serving_result("vattention", tl, 300.0), roofline=rf, roofline_fraction=0.412),
               "paged16": dict(serving_result("paged16", tl, 200.0), roofline=dict(
                   rf, idle_s=None, idle_fraction=None, idle_ms_per_step=None, padding_fraction=None))}
    peaks = dict(gemm_flops=631e12, read_bytes_per_s=4.3e12, read_method="jitted jnp.sum",
                 gemm_flops_by_shape={"8192x8192x8192": 631e12, "512x4096x14336": 366e12})
    payload: dict = dict(results=results, ratios={}, targets={"roofline_fraction >= 0.6 (sharegpt)": False},
                         checks={}, compile_s={}, peaks=peaks,
                         config=dict(layers=2, preset="p", requests=3, max_batch=64, max_seq=4096, budget_bytes=GIB,
                                     budget_tokens=1, token_budget=512, chunk=512, lookahead=64, workload="w",
                                     seed=0, request_rate=8.0, arrival_seed=2))
    md = bench_serving.markdown(json.loads(json.dumps(payload)))
    assert "8192x8192x8192 631, 512x4096x14336 366 TFLOP/s (the floor uses 631); read 4300 GB/s" in md
    rows = [line for line in md.splitlines() if line.startswith("| vattention | **0.412**")]
    assert rows and "| 0.82 / 2.00 | 20.00 | 8.24 | 25% | 130 / 180 | 38.5% | 60.0 | 10.0% (2.00 ms/step) | 149 |" \
        in rows[0]
    assert any(line.startswith("| paged16 | **0.412**") and "| n/a | 60.0 | n/a |" in line for line in md.splitlines())
    assert "Poisson arrivals at 8 requests/s (seed 2)" in md and "roofline_fraction >= 0.6 (sharegpt): FAIL" in md
    offline = dict(payload, config=dict(payload["config"], request_rate=None))
    assert "all requests at t=0 (offline)" in bench_serving.markdown(offline)
    # a run from before the roofline (no peaks, no roofline per result) still reports
    old = dict(payload, results={k: {x: y for x, y in r.items() if not x.startswith("roofline")}
                                 for k, r in payload["results"].items()})
    del old["peaks"]
    assert "roofline (" not in bench_serving.markdown(old)


def test_poisson_arrivals_are_seeded():
    a = bench_serving.poisson_arrivals(4000, 8.0, seed=3)
    assert a[0] == 0.0 and np.all(np.diff(a) > 0)
    assert np.mean(np.diff(a)) == pytest.approx(1 / 8.0, rel=0.05)
    assert np.array_equal(a, bench_serving.poisson_arrivals(4000, 8.0, seed=3))
    assert not np.array_equal(a, bench_serving.poisson_arrivals(4000, 8.0, seed=4))
    assert np.array_equal(bench_serving.poisson_arrivals(5, math.inf, seed=0), np.zeros(5))
    with pytest.raises(ValueError):
        bench_serving.poisson_arrivals(5, 0.0, seed=0)


class FakeClock:
    def __init__(self):
        self.now = 100.0
        self.slept = []

    def __call__(self):
        return self.now

    def sleep(self, s):
        self.slept.append(s)
        self.now += s


class FakeEngine:
    """Each step takes 10 ms of the fake clock and gives every queued request one token."""

    def __init__(self, clock):
        self.clock, self.queue, self.steps, self._next = clock, [], 0, 0
        self.scheduler = self

    def has_unfinished(self):
        return any(not r.finished for r in self.queue)

    def add_request(self, prompt, params):
        from jax_vattention.engine.request import Request

        r = Request(self._next, prompt, params)
        self._next += 1
        self.queue.append(r)
        return r

    def step(self):
        assert self.has_unfinished(), "stepped with nothing to run"
        self.steps += 1
        self.clock.now += 0.010
        done = []
        for r in self.queue:
            if not r.finished:
                r.append_token(1, self.clock.now)
                done += [r] if r.finished else []
        return done


def test_serve_online_queues_on_arrival_and_sleeps_when_idle():
    from jax_vattention.engine import SamplingParams

    clock = FakeClock()
    engine = FakeEngine(clock)
    arrivals = np.array([0.0, 0.005, 1.0, 1.0])
    params = [SamplingParams(max_tokens=m, ignore_eos=True) for m in (3, 2, 1, 2)]
    outs, wall, empty, t0 = bench_serving.serve_online(engine, [[1, 2]] * 4, params, arrivals, clock=clock,
                                                       sleep=clock.sleep)
    assert t0 == 100.0
    assert [o.metrics.arrival_time for o in outs] == [100.0, 100.005, 101.0, 101.0]
    # request 1 arrives mid-step: queued after the first step, first token at 0.02, 15 ms after its arrival
    assert [round(o.metrics.ttft_s, 6) for o in outs] == [0.01, 0.015, 0.01, 0.01]
    assert [len(o.outputs[0].token_ids) for o in outs] == [3, 2, 1, 2]
    # the engine is idle from 0.03 until the arrivals at 1.0: one sleep, no stepping with nothing to run
    assert clock.slept == [pytest.approx(0.97)] and empty == pytest.approx(0.97)
    assert engine.steps == 5 and wall == pytest.approx(1.02)


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


def test_headline_keys_from_the_workload_results(tmp_path, monkeypatch):
    """The headline's ratios are the side-by-side ones of each workload's run; it reads complete result files of
    one device only, under the stems bench_serving.py derives from the headline's own arguments."""
    headline = pytest.importorskip("headline")
    tl = [(0.0, 1, GIB, GIB)]

    def payload(**tputs):
        res = {k: dict(serving_result(k, tl, t, peak_physical=(2 if k == "paged16" else 1) * GIB),
                       total_tokens_per_s=3 * t, roofline_fraction=0.4) for k, t in tputs.items()}
        return dict(results=res, device="NVIDIA H200")

    runs = dict(sharegpt=payload(vattention=100.0, paged16=80.0, static=40.0, **{"vattention-premapped": 101.0}),
                long=payload(vattention=50.0, paged16=40.0, static=10.0), tight=payload(vattention=30.0, paged16=25.0))
    h = headline.headline(runs)
    s = h["sharegpt"]
    assert (s["vs_paged"], s["vs_paged_jax"], s["vs_static"]) == (1.25, 1.25, 2.5)
    assert s["physical_kv_vs_paged"] == 0.5 and s["premapped_ratio"] == 1.01 and s["total_tokens_per_s"] == 300
    assert h["long"] == dict(output_tokens_per_s=50.0, vs_paged=1.25, vs_static=5.0)
    assert h["tight"] == dict(output_tokens_per_s=30.0, vs_paged=1.2) and h["device"] == "NVIDIA H200"
    assert "bench_serving.py --requests 1000" in h["workload_commands"]["sharegpt"]

    # the stems are what bench_serving.py names the files of those arguments
    for w, (args, stem) in headline.WORKLOADS.items():
        a = bench_serving.parse_args(args)
        assert bench_serving.result_name(a) == stem, w
    monkeypatch.setattr(headline, "RESULTS", tmp_path)
    for w, p in runs.items():
        (tmp_path / f"{headline.WORKLOADS[w][1]}_dev.json").write_text(json.dumps(p))
    (tmp_path / f"{headline.WORKLOADS['tight'][1]}_dev.json").write_text(json.dumps(dict(runs["tight"], partial=True)))
    assert headline.main(["--workloads", "", "--device-slug", "dev"]) == 0
    written = json.loads((tmp_path / "headline_dev.json").read_text())
    assert set(written) >= {"sharegpt", "long", "paged_kernel", "command", "device"} and "tight" not in written
    runs["long"]["device"] = "NVIDIA H100"
    with pytest.raises(SystemExit, match="different devices"):
        headline.headline(runs)


def test_prefix_bench_arguments_and_report():
    bench_prefix = pytest.importorskip("bench_prefix")
    args = bench_prefix.parse_args(["--quick", "--configs", "vattention,paged16"])
    assert args.configs == ["vattention", "paged16"] and args.layers == 4 and args.system_len <= 512
    with pytest.raises(SystemExit):
        bench_prefix.parse_args(["--configs", "vattention,nope"])
    assert bench_prefix.parse_args(["--workloads", "system"]).workloads == ["system"]
    with pytest.raises(SystemExit):
        bench_prefix.parse_args(["--workloads", "sharegpt"])
    row = dict(output_tokens_per_s=100.0, total_tokens_per_s=900.0, ttft_p50_s=0.25, ttft_p99_s=1.5, tbt_p50_s=0.02,
               tbt_p99_s=0.04, prefix_cache_hit_rate=0.75, prefix_cache_hit_tokens=1234, peak_used_kv_bytes=GIB,
               peak_physical_kv_bytes=2 * GIB, peak_batch=7, preemptions=0)
    payload = dict(results={"system": {"vattention": row}, "chat": {"vattention": row}},
                   ratios={"ttft_p50_speedup": 3.5}, targets={"TTFT p50 >= 3x lower": True}, checks={}, config={})
    md = bench_prefix.markdown(payload)
    assert "| system | vattention | 100 | 900 | 0.25 / 1.50 | 20.0 / 40.0 | 75.0% | 1234 | 1.00 / 2.00 | 7 | 0 |" in md
    assert "ttft_p50_speedup **3.500**" in md and "PASS" in md
