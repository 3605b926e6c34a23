"""The LLM engine on the tiny model: continuous batching equals one-request-at-a-time generation."""

import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("flax")
import models  # noqa: E402
from jax_vattention.attention import AttentionSpec  # noqa: E402
from jax_vattention.engine import SamplingParams  # noqa: E402
from jax_vattention.engine.llm import LLM  # noqa: E402
from models.testing import assert_same_greedy  # noqa: E402

REF = AttentionSpec(impl="reference")


@pytest.fixture(scope="module")
def model():
    return models.random_model(models.get_preset("tiny"), seed=1, dtype=jnp.float32, init_std=0.2)


def prompts(seed, n, vocab):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=int(rng.integers(1, 90))).tolist() for _ in range(n)]


def one_at_a_time(model, ps, params):
    outs = []
    with LLM(model, max_batch=1, max_seq=256, attn=REF, page_bytes=4096) as llm:
        for p, sp in zip(ps, params):
            outs.append(llm.generate([p], sp)[0].outputs[0].token_ids)
    return outs


# The vAttention layouts (EngineConfig.layers_per_group): the default, every layer interleaved, and per-layer.
LAYOUTS = ["all", 1]


@pytest.mark.parametrize("pool_pages,budget,chunk,group", [(None, 64, 32, "all"), (80, 48, 16, "all"),
                                                           (80, 48, 16, 1)])
def test_continuous_batching_matches_sequential(model, pool_pages, budget, chunk, group):
    vocab = model.config.vocab_size
    ps = prompts(budget, 7, vocab)
    params = [SamplingParams(max_tokens=int(n)) for n in np.random.default_rng(0).integers(5, 40, size=7)]
    want = one_at_a_time(model, ps, params)
    pool = None if pool_pages is None else pool_pages * 4096
    with LLM(model, max_batch=4, max_seq=256, attn=REF, page_bytes=4096, pool_bytes=pool, token_budget=budget,
             chunk_size=chunk, layers_per_group=group) as llm:
        outs = llm.generate(ps, params)
        assert [o.request_id for o in outs] == sorted(o.request_id for o in outs)  # request order
        assert all(c.finish_reason == "length" and len(c.token_ids) == sp.max_tokens
                   for c, sp in zip((o.outputs[0] for o in outs), params))
        assert_same_greedy([o.outputs[0].token_ids for o in outs], want, ps, model, what="engine vs sequential")
        assert llm.num_compiled <= 3 * 6  # bucketed shapes: powers of two in B and T
        if pool_pages is not None:
            assert sum(o.metrics.num_preemptions for o in outs) > 0, "the tiny pool should force preemption"
        assert llm.manager.stats().live_slots == 0


def test_sampling_is_reproducible_per_request(model):
    ps = prompts(3, 4, model.config.vocab_size)
    sp = SamplingParams(max_tokens=12, temperature=1.0, top_k=20, seed=7)
    with LLM(model, max_batch=4, max_seq=256, attn=REF, page_bytes=4096) as llm:
        batched = [o.outputs[0].token_ids for o in llm.generate(ps, sp)]
        alone = [llm.generate([p], sp)[0].outputs[0].token_ids for p in ps]
    assert batched == alone
    assert len({tuple(t) for t in batched}) > 1


def test_bad_requests(model):
    with LLM(model, max_batch=2, max_seq=64, attn=REF, page_bytes=4096) as llm:
        with pytest.raises(ValueError, match="max_seq"):
            llm.generate([[1] * 60], SamplingParams(max_tokens=10))
        with pytest.raises(ValueError, match="token ids"):
            llm.generate([[model.config.vocab_size]], SamplingParams())
        with pytest.raises(ValueError, match="SamplingParams"):
            llm.generate([[1], [2]], [SamplingParams()])
        assert llm.generate([[1, 2, 3]], SamplingParams(max_tokens=3))[0].outputs[0].token_ids  # still works


def test_overlapped_allocation_maps_the_next_decode_during_the_step(model):
    """With overlap on, the scheduler's grow for a decode finds its page already mapped."""
    ps = prompts(11, 3, model.config.vocab_size)
    sp = SamplingParams(max_tokens=30)
    results = {}
    for overlap in (False, True):
        with LLM(model, max_batch=4, max_seq=256, attn=REF, page_bytes=4096, overlap_allocation=overlap) as llm:
            sched, maps_in_schedule = llm.scheduler, []
            schedule = sched.schedule

            def counted_schedule(schedule=schedule, maps_in_schedule=maps_in_schedule):
                before = llm.manager.stats().maps
                out = schedule()
                if out.decodes and not out.prefills:
                    maps_in_schedule.append(llm.manager.stats().maps - before)
                return out

            sched.schedule = counted_schedule
            results[overlap] = ([o.outputs[0].token_ids for o in llm.generate(ps, sp)], sum(maps_in_schedule))
    assert results[True][0] == results[False][0]
    assert results[False][1] > 0  # without overlap, decode iterations map pages on the critical path
    assert results[True][1] == 0  # with it, never


@pytest.mark.parametrize("kv_cache", ["vattention", "vattention-per-layer", "static", "paged"])
def test_engine_matches_full_forward(model, kv_cache):
    """Hybrid steps (decode rows + prefill chunks in one segmented forward) on each KV pool = plain greedy:
    every token is the argmax of a cache-free fp32 forward over the same tokens (one teacher-forced batch)."""
    from models.testing import greedy_deficits

    if kv_cache == "paged":
        pytest.importorskip("flax")
    rng = np.random.default_rng(21)
    ps = [rng.integers(0, model.config.vocab_size, size=37).tolist() for _ in range(5)]  # 3 chunks of 16
    sp = SamplingParams(max_tokens=9)
    kw = dict(kv_cache="vattention", layers_per_group=1) if kv_cache == "vattention-per-layer" else dict(
        kv_cache=kv_cache)
    with LLM(model, **kw, max_batch=4, max_seq=128, attn=REF, page_bytes=4096, token_budget=40,
             chunk_size=16) as llm:
        outs = llm.generate(ps, sp)
        assert llm.stats.peak_batch > 1 and llm.stats.steps > 0
    deficit = greedy_deficits(model, ps, [o.outputs[0].token_ids for o in outs])
    assert deficit.shape == (5, 9) and deficit.max() <= 1e-4, f"{kv_cache}: worst deficit {deficit.max()}"


def test_static_pool_budget_limits_the_batch(model):
    """At a fixed budget the static cache holds budget / (max_seq x bytes per token) requests."""
    c = model.config
    slot_bytes = 2 * c.num_layers * 128 * c.num_kv_heads * c.head_dim * 4
    with LLM(model, kv_cache="static", max_batch=8, max_seq=128, attn=REF, pool_bytes=3 * slot_bytes) as llm:
        assert llm.pool.max_batch == 3 and llm.scheduler.config.max_batch == 3
        outs = llm.generate(prompts(5, 6, c.vocab_size), SamplingParams(max_tokens=4))
        assert all(len(o.outputs[0].token_ids) == 4 for o in outs) and llm.stats.peak_batch <= 3
        assert llm.pool.pages_live() == 0


SWITCH_ENGINE = dict(max_batch=4, max_seq=256, attn=REF, page_bytes=4096, token_budget=48, chunk_size=32)


@pytest.fixture(scope="module")
def switch_workload(model):
    """Prompts, params and the default engine's outputs, computed once for every switch setting."""
    ps = prompts(31, 5, model.config.vocab_size)
    sp = SamplingParams(max_tokens=20)
    with LLM(model, **SWITCH_ENGINE) as llm:
        return ps, sp, [o.outputs[0].token_ids for o in llm.generate(ps, sp)]


@pytest.mark.parametrize("overlap,lookahead,reclaim", [("off", 0, True), ("inline", 0, True), ("thread", 8, True),
                                                       ("thread", 0, False)])
def test_allocation_switches_keep_outputs(model, switch_workload, overlap, lookahead, reclaim):
    ps, sp, want = switch_workload
    with LLM(model, overlap_allocation=overlap, lookahead=lookahead, deferred_reclaim=reclaim, **SWITCH_ENGINE) as llm:
        assert [o.outputs[0].token_ids for o in llm.generate(ps, sp)] == want
        s = llm.manager.stats()
        assert s.live_slots == 0
        if not reclaim:
            assert s.pages_mapped == 0  # nothing kept mapped for reuse
        elif overlap != "off":
            assert llm.stats.map_ahead_s > 0


def test_premap_maps_every_slot_up_front(model):
    with LLM(model, max_batch=2, max_seq=128, attn=REF, page_bytes=4096, premap=True) as llm:
        full = llm.manager.stats().pages_mapped
        assert full == llm.manager.stats().pages_budget
        llm.generate(prompts(41, 3, model.config.vocab_size), SamplingParams(max_tokens=5))
        assert llm.manager.stats().maps == full  # the run itself mapped nothing


@pytest.mark.parametrize("packed", [True, False])
def test_warmup_compiles_every_shape_a_run_uses(model, packed):
    ps = prompts(51, 6, model.config.vocab_size)
    with LLM(model, max_batch=4, max_seq=128, attn=REF, page_bytes=4096, token_budget=32, chunk_size=16,
             max_prefill_rows=2, min_decode_bucket=2, min_prefill_bucket=8, packed_steps=packed) as llm:
        shapes = llm.step_shapes()
        # packed: token buckets {8, 12, 16, 24, 32}; row groups: decode {2, 4}; x (none, 2, 4) x rows {1, 2} x T {8, 16}
        assert len(shapes) == len(set(shapes)) == (5 if packed else 2 + 3 * 2 * 2)
        llm.warmup()
        assert llm.num_compiled == len(shapes)
        llm.generate(ps, SamplingParams(max_tokens=6))
        assert llm.num_compiled == len(shapes)  # the run compiled nothing new
        assert llm.manager.stats().live_slots == 0


def test_engine_step_has_no_effects_and_keeps_every_write(model):
    """Host-mapped caches write through pure calls: the step is effect-free (jax's fast dispatch path), and XLA
    still keeps one write per layer and row group, because attention reads with the lengths each write returns."""
    from jax_vattention.engine.model_runner import StepInputs

    with LLM(model, max_batch=4, max_seq=128, attn=REF, page_bytes=4096) as llm:
        slot = llm.manager.allocate(8)
        cache = llm.pool.cache(np.full(4, slot, np.int32), np.zeros(4, np.int32), np.array([1, 1, 0, 0], np.int32))
        runner = llm.runner
        segments = ((0, 2, 1), (2, 4, 8))
        inputs = StepInputs.padding(segments)
        assert inputs.tokens.shape == (2 + 2 * 8,) and inputs.logit_index.shape == (4,)
        traced = runner._jit(cache.donates).trace(runner.graphdef, runner.params, cache, inputs, runner._zero_slab,
                                                  segments=segments, mode="greedy", attn=runner.attn)
        assert not traced.jaxpr.effects
        hlo = traced.lower().compile().as_text()
        assert hlo.count('custom_call_target="vattn_write"') == model.config.num_layers * len(segments)
        llm.manager.free(slot)


def test_packed_step_has_no_effects_and_keeps_every_write(model):
    """A packed step copies no cache-sized buffer and writes each layer's tokens through one pure call
    (one-token rows), and XLA keeps it: each row's length is the largest its tokens' writes return, which
    attention reads."""
    from jax_vattention.engine.model_runner import StepInputs
    from jax_vattention.hlo import assert_no_cache_copy

    with LLM(model, max_batch=4, max_seq=128, attn=REF, page_bytes=4096, token_budget=32, chunk_size=16) as llm:
        slot = llm.manager.allocate(16)
        runner = llm.runner
        shape = runner.packed_shape(11)
        assert (shape.num_tokens, shape.num_rows, shape.max_row_tokens) == (12, 4, 12)
        cache = llm.pool.cache(np.full(4, slot, np.int32), np.zeros(4, np.int32), np.array([1, 10, 0, 0], np.int32))
        inputs = StepInputs.padding(shape)
        traced = runner._jit(cache.donates).trace(runner.graphdef, runner.params, cache, inputs, runner._zero_slab,
                                                  segments=shape, mode="greedy", attn=runner.attn)
        assert not traced.jaxpr.effects
        hlo = traced.lower().compile().as_text()
        assert hlo.count('custom_call_target="vattn_write"') == model.config.num_layers
        assert_no_cache_copy(hlo, llm.manager)  # the packed step reads the views in place
        llm.manager.free(slot)
