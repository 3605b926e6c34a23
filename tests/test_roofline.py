"""The roofline arithmetic of ``benchmarks/roofline.py`` on a hand-computed step; its step recorder on the engine."""

import pathlib
import sys
from types import SimpleNamespace

import numpy as np
import pytest

BENCH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
roofline = pytest.importorskip("roofline")
models = pytest.importorskip("models")

# Llama-3-8B: per layer q, k, v, o = 4096 * 128 * (2 * 32 + 2 * 8) = 41,943,040 and the MLP 3 * 4096 * 14336 =
# 176,160,768, so 218,103,808 matmul weights a layer, 6,979,321,856 over 32 layers. The LM head is 128256 * 4096 =
# 525,336,576. Weights read: 32 * (218,103,808 + 2 * 4096 norms) + 4096 + 525,336,576 = 7,504,924,672 params,
# 15,009,849,344 bytes in bf16 (the untied input embedding is gathered, not read). KV: 2 * 32 * 8 * 128 * 2 = 131,072
# bytes a token.
LAYER, HEAD, WEIGHT_BYTES, KV_TOKEN = 6_979_321_856, 525_336_576, 15_009_849_344, 131_072


def test_model_cost_of_llama3_8b():
    cfg = models.get_preset("llama-3-8b")
    cost = roofline.ModelCost.of(cfg, 2)
    assert (cost.layer_params, cost.head_params, cost.weight_bytes, cost.kv_bytes_per_token) == (
        LAYER, HEAD, WEIGHT_BYTES, KV_TOKEN)
    assert cost.kv_bytes_per_token == cfg.kv_bytes_per_token(2)
    # every parameter but the untied input embedding is read
    assert cost.weight_bytes == 2 * (cfg.num_params() - cfg.vocab_size * cfg.hidden_size)
    tied = roofline.ModelCost.of(models.get_preset("llama-3.2-1b"), 2)  # tied: the embedding is the head, read once
    assert tied.weight_bytes == 2 * models.get_preset("llama-3.2-1b").num_params()
    qwen = models.get_preset("qwen2-7b")  # q/k/v biases: read, but no GEMM FLOPs
    qc = roofline.ModelCost.of(qwen, 2)
    assert qc.weight_bytes == 2 * (qwen.num_params() - qwen.vocab_size * qwen.hidden_size)
    assert qc.layer_params == qwen.num_layers * (qwen.hidden_size * qwen.head_dim * 2 * (28 + 4)
                                                 + 3 * qwen.hidden_size * qwen.intermediate_size)


def test_floor_of_a_hand_computed_step():
    """Two decodes at contexts 100 and 300 and one 257-token prefill chunk from 0 (padded: a 32-row decode bucket and
    a 512-token chunk) on Llama-3-8B, peaks 1 PFLOP/s and 4.8 TB/s."""
    cost = roofline.ModelCost.of(models.get_preset("llama-3-8b"), 2)
    peaks = roofline.Peaks(gemm_flops=1e15, read_bytes_per_s=4.8e12)
    tokens, rows, kv = 1 + 1 + 257, 3, 100 + 300 + 257
    # FLOPs: 2 * (6,979,321,856 * 259 + 525,336,576 * 3) = 3,618,440,740,864 -> 3.618440740864 ms at 1 PFLOP/s
    assert roofline.compute_s(cost, peaks, tokens, rows) == pytest.approx(3.618440740864e-3, rel=1e-12)
    # bytes: 15,009,849,344 + 131,072 * 657 = 15,095,963,648 -> 3.144992426667 ms at 4.8 TB/s
    assert roofline.memory_s(cost, peaks, kv) == pytest.approx(15_095_963_648 / 4.8e12, rel=1e-12)
    assert roofline.step_floor(cost, peaks, tokens, rows, kv) == pytest.approx(3.618440740864e-3, rel=1e-12)
    # padded: 32 + 512 tokens, 33 rows: 2 * (6,979,321,856 * 544 + 525,336,576 * 33) = 7,628,174,393,344 FLOPs
    assert roofline.step_floor(cost, peaks, 544, 33, kv) == pytest.approx(7.628174393344e-3, rel=1e-12)
    # one decode at context 1000: memory-bound, (15,009,849,344 + 131,072,000) / 4.8e12
    assert roofline.step_floor(cost, peaks, 1, 1, 1000) == pytest.approx(15_140_921_344 / 4.8e12, rel=1e-12)

    steps = [roofline.StepWork(0.0, tokens, 544, rows, 33, kv), roofline.StepWork(0.02, 1, 32, 1, 32, 1000)]
    wall = 0.05
    r = roofline.report(steps, wall, cost, peaks, idle_s=0.004)
    floor = 3.618440740864e-3 + 15_140_921_344 / 4.8e12
    assert r["roofline_fraction"] == pytest.approx(floor / wall)
    assert r["floor_s"] == pytest.approx(floor)
    padded_decode = max(2 * (LAYER * 32 + HEAD * 32) / 1e15, 15_140_921_344 / 4.8e12)
    assert r["roofline_fraction_padded"] == pytest.approx((7.628174393344e-3 + padded_decode) / wall)
    assert r["padding_fraction"] == pytest.approx((544 + 32) / (259 + 1) - 1)
    assert r["compute_bound_steps"] == 0.5
    assert (r["steps"], r["step_ms"], r["tokens_per_step"], r["rows_per_step"]) == (2, 25.0, 130.0, 2.0)
    assert r["idle_fraction"] == pytest.approx(0.004 / wall) and r["idle_ms_per_step"] == pytest.approx(2.0)
    assert r["achieved_tflops"] == pytest.approx(2 * (LAYER * 260 + HEAD * 4) / wall / 1e12)
    # online: time with no request at all counts neither as a step nor as idle
    o = roofline.report(steps, wall, cost, peaks, idle_s=0.014, empty_s=0.01)
    assert o["roofline_fraction"] == r["roofline_fraction"] and o["step_ms"] == pytest.approx(20.0)
    assert o["idle_fraction"] == pytest.approx(0.004 / 0.04)
    assert roofline.report([], 1.0, cost, peaks) == {}


def test_idle_seconds_counts_only_gaps_with_nothing_dispatched():
    from jax_vattention.engine import EngineStats

    def idle(steps, since=None):
        return EngineStats(device_steps=list(steps)).device_idle_seconds(since)

    # step 2 dispatched before step 1 was ready (overlap: no idle); step 3 1 ms after the latest ready
    assert idle([(0.0, 0.010), (0.009, 0.020), (0.021, 0.030)]) == pytest.approx(0.001)
    assert idle([(0.0, 0.01), (0.02, 0.03)], since=0.015) == 0.0
    assert idle([]) is None
    assert EngineStats(device_steps=[(0.0, 0.010), (0.009, 0.020), (0.021, 0.030)]).device_idle_fraction() == \
        pytest.approx(0.001 / 0.030)


def test_step_work_of_a_layout():
    chunk = SimpleNamespace
    step = SimpleNamespace(chunks=[(0, chunk(start=99, num_tokens=1)), (1, chunk(start=299, num_tokens=1)),
                                   (32, chunk(start=0, num_tokens=257))],
                           inputs=SimpleNamespace(tokens=np.zeros(544), logit_index=np.zeros(33)))
    assert roofline.StepWork.of(step, 1.5) == roofline.StepWork(1.5, 259, 544, 3, 33, 657)


def test_recorder_sees_every_token_the_engine_runs():
    jnp = pytest.importorskip("jax.numpy")
    from jax_vattention.attention import AttentionSpec
    from jax_vattention.engine import LLM, SamplingParams

    model = models.random_model(models.get_preset("tiny"), seed=1, dtype=jnp.float32)
    rng = np.random.default_rng(0)
    ps = [rng.integers(0, 512, size=n).tolist() for n in (5, 40, 70)]
    params = [SamplingParams(max_tokens=m, ignore_eos=True) for m in (3, 6, 2)]
    with LLM(model, max_batch=4, max_seq=128, attn=AttentionSpec(impl="reference"), page_bytes=4096,
             token_budget=128, chunk_size=32) as llm:  # 3 rows x 32 + 3 decodes < 128: no chunk is cut short
        dispatch = llm.runner.dispatch
        with roofline.StepRecorder(llm) as rec:
            llm.generate(ps, params)
        assert llm.runner.dispatch == dispatch and "dispatch" not in vars(llm.runner)
    steps = rec.steps
    # every prompt token and every sampled token but the last is run once
    assert sum(s.tokens for s in steps) == sum(map(len, ps)) + sum(p.max_tokens - 1 for p in params)
    assert all(s.padded_tokens >= s.tokens and s.padded_rows >= s.rows for s in steps)
    assert len(steps) == llm.stats.steps
    # KV read: each prefill chunk reads the context up to its end (chunks of 32): 5; 32 + 40; 32 + 64 + 70; each
    # decode of the j-th output token (j >= 1) reads n + j tokens: 6 + 7; 41 + ... + 45; 71
    assert sum(s.kv_tokens for s in steps) == 5 + (32 + 40) + (32 + 64 + 70) + (6 + 7) + (41 + 42 + 43 + 44 + 45) + 71
    assert all(b >= a for a, b in zip([s.t for s in steps], [s.t for s in steps][1:]))
