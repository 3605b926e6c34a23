"""The serving engine on a CUDA GPU (marker ``gpu``): VMM cache, bf16 Pallas kernels, a 1B-layer-shaped model.

Every pool (vAttention, paged with JAX's paged_attention, static) must give
tokens that are each a near-argmax of a cache-free forward (teacher-forced),
under continuous batching with chunked prefill, under preemption, and with
a request cancelled mid-run. Random weights give many near-ties, so tokens
are judged by their logit deficit, not by equality between pools.
"""

import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("flax")
import models
from jax_vattention.engine import LLM, SamplingParams
from models.testing import greedy_deficits

pytestmark = pytest.mark.gpu
TOL = 0.15  # logit units; random bf16 weights put logits at std ~1


@pytest.fixture(scope="module")
def model():
    cfg = models.get_preset("llama-3.2-1b").replace(num_layers=4)
    return models.random_model(cfg, seed=0, dtype=jnp.bfloat16)


def requests(seed, n, prompt_len, vocab):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=prompt_len).tolist() for _ in range(n)]


def assert_near_greedy(model, ps, outputs, what):
    """``outputs``: each prompt's generated ids."""
    deficit = greedy_deficits(model, ps, outputs)
    frac = float((deficit > TOL).mean())
    assert frac <= 0.03 and deficit.max() < 1.0, f"{what}: {frac:.1%} tokens off, worst deficit {deficit.max():.3f}"


KW = dict(max_batch=16, max_seq=2048, token_budget=256, chunk_size=128, max_prefill_rows=2, min_decode_bucket=8,
          min_prefill_bucket=64)


@pytest.mark.parametrize("kv_cache", ["vattention", "vattention-per-layer", "vattention-groups", "paged", "static"])
def test_engine_pools_generate_greedy_tokens_on_gpu(model, kv_cache):
    """Packed steps (the default: the varlen prefill kernel) on every pool; row-group steps on vAttention."""
    c = model.config
    ps = requests(1, 20, 333, c.vocab_size)  # 333 tokens: three chunks, the last one partial
    sp = SamplingParams(max_tokens=12)
    token_bytes = 2 * c.num_layers * c.num_kv_heads * c.head_dim * 2
    budget = 12 * 2048 * token_bytes  # the static pool holds 12 of the 16 slots
    kind = {"vattention-per-layer": dict(kv_cache="vattention", layers_per_group=1),
            "vattention-groups": dict(kv_cache="vattention", packed_steps=False)}.get(kv_cache, dict(kv_cache=kv_cache))
    with LLM(model, **kind, pool_bytes=budget, **KW) as llm:
        outs = llm.generate(ps, sp)
        assert all(o.outputs[0].finish_reason == "length" and len(o.outputs[0].token_ids) == 12
                   and o.metrics.ttft_s > 0 for o in outs)
        assert llm.stats.peak_batch <= llm.pool.max_batch and llm.stats.peak_used_bytes <= budget
        if kv_cache == "static":
            assert llm.pool.max_batch == 12
        if kv_cache.startswith("vattention"):
            m = llm.manager
            assert m.stats().live_slots == 0
            tpp = m.tokens_per_page  # of every layer of a group in the interleaved layout
            need = m.config.num_tensors * min(16, len(ps)) * -(-(333 + 12) // tpp) * m.config.page_bytes
            assert llm.stats.peak_used_bytes <= need  # mapped memory follows the real context
    assert_near_greedy(model, ps, [o.outputs[0].token_ids for o in outs], kv_cache)


def test_preemption_and_cancel_on_gpu(model):
    c = model.config
    ps = requests(2, 8, 2030, c.vocab_size)  # decodes cross the 2048-token page boundary
    sp = SamplingParams(max_tokens=30)
    page = 2 << 20
    assert page // (c.num_kv_heads * c.head_dim * 2) == 2048
    per_request = 2 * c.num_layers * page  # one page per tensor at admission, two after the crossing
    kw = dict(KW, max_seq=4096, layers_per_group=1)  # the page arithmetic above is the per-layer layout's
    with LLM(model, pool_bytes=3 * per_request, **kw) as llm:  # admits 3, then they outgrow the pool
        reqs = [llm.add_request(p, sp) for p in ps]
        victim, live_before = reqs[0], None
        while llm.scheduler.has_unfinished():
            llm.step()
            if live_before is None and len(victim.output) >= 2:
                live_before = llm.manager.stats().live_slots
                assert llm.scheduler.cancel(victim.request_id)
                assert llm.manager.stats().live_slots == live_before - 1  # its slot is free at once
        assert victim.finish_reason == "cancelled" and live_before is not None
        done = reqs[1:]
        assert all(len(r.output) == 30 for r in done)
        assert llm.scheduler.num_preemptions > 0, "the pool should force preemption"
        assert llm.manager.stats().live_slots == 0
        assert llm.stats.peak_used_bytes <= 3 * per_request
    assert_near_greedy(model, [r.prompt for r in done], [r.output for r in done], "preempted run")


def small_page_model():
    """2 layers with Llama-3 KV shapes (8 kv-heads x 128): a 2 MiB page holds 1024 tokens of one layer's K or V."""
    cfg = models.get_preset("tiny").replace(hidden_size=512, intermediate_size=1024, num_heads=16, num_kv_heads=8,
                                            head_dim=128)
    return models.random_model(cfg, seed=3, dtype=jnp.bfloat16)


@pytest.mark.parametrize("group", [1, "all"])
def test_small_engine_crossing_pages_for_memcheck(group):
    """Small enough to finish under compute-sanitizer (``scripts/device_run.sh sanitize-engine``).

    Four 1000-token prompts decode 40 tokens each, so every request's second page is mapped mid-run while the
    kernels and the write kernel work on the sparse CUDA VMM cache next to it; the pool holds exactly what the
    contexts need, so nothing beyond the mapped pages is ever readable.
    """
    model = small_page_model()
    c = model.config
    ps = requests(4, 4, 1000, c.vocab_size)
    sp = SamplingParams(max_tokens=40)
    page = 2 << 20
    assert page // (c.num_kv_heads * c.head_dim * 2) == 1024
    budget = 4 * 2 * c.num_layers * 2 * page  # 2 pages per per-layer tensor per request (the same bytes interleaved)
    with LLM(model, pool_bytes=budget, layers_per_group=group, max_batch=4, max_seq=2048, token_budget=512,
             chunk_size=256, max_prefill_rows=2, min_decode_bucket=4, min_prefill_bucket=64) as llm:
        outs = llm.generate(ps, sp)
        assert all(len(o.outputs[0].token_ids) == 40 and o.outputs[0].finish_reason == "length" for o in outs)
        assert llm.stats.peak_used_bytes <= budget
        assert llm.manager.stats().live_slots == 0
    assert_near_greedy(model, ps, [o.outputs[0].token_ids for o in outs], "small engine")
