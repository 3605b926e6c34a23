"""Async scheduling (EngineConfig.async_scheduling): step t+1 is laid out and dispatched while step t runs, its
decode inputs taken on the device from step t's sampled tokens, step t's results applied one step late.

Every test checks the same tokens as the synchronous engine and as one-request-at-a-time generation: greedy and
seeded sampling, across the decode and prefill bucket edges, under preemption, with cancellation, stop ids and
stop strings, under AsyncLLM, with the penalties' synchronous fallback; and that errors and close() leave no step
in flight, no slot held and no request lost.
"""

import asyncio
import contextlib
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("flax")
pytest.importorskip("tokenizers")
import models  # noqa: E402
from jax_vattention.attention import AttentionSpec  # noqa: E402
from jax_vattention.engine import LLM, EngineConfig, SamplingParams  # noqa: E402
from jax_vattention.engine.async_llm import AsyncLLM  # noqa: E402
from jax_vattention.engine.stats import EngineStats  # noqa: E402

# vocab_size 258: every id is a byte or a special token, so outputs are text (stop strings)
CFG = models.get_preset("tiny").replace(vocab_size=258)
TOK = models.byte_level_tokenizer(258)
REF = AttentionSpec(impl="reference")
# max_batch 9: decode buckets 1, 2, 4, 8, 9; chunks of 16 in buckets 8, 16 (a floor of 8: fewer shapes to
# compile); 3 prefill rows (buckets 1, 2, 3)
KW = dict(max_batch=9, max_seq=256, page_bytes=4096, attn=REF, token_budget=40, chunk_size=16, max_prefill_rows=3,
          min_prefill_bucket=8)
# prompt lengths at and around the chunk edges (16, 32, 48) and a one-token prompt
LENGTHS = [1, 15, 16, 17, 31, 32, 33, 47, 49]


@pytest.fixture(scope="module")
def model():
    return models.random_model(CFG, seed=1, dtype=jnp.float32, init_std=0.2)


# Engines are module-wide: each new engine compiles its step shapes again (seconds each on a CPU). A test runs
# one engine both ways by switching ``async_scheduling`` between runs (``mode``); the engine reads it each step.
@pytest.fixture(scope="module")
def engine(model):
    with LLM(model, tokenizer=TOK, **KW) as llm:
        yield llm


@pytest.fixture(scope="module")
def small_engine(model):
    with LLM(model, tokenizer=TOK, **KW, pool_bytes=64 * 4096) as llm:  # 128 tokens: preemption
        yield llm


@pytest.fixture(scope="module")
def alone_engine(model):
    # one prefill shape (chunks of 64; every prompt is one chunk): the reference chunks differently from the engines
    with LLM(model, tokenizer=TOK, max_batch=1, max_seq=256, page_bytes=4096, attn=REF, chunk_size=64,
             min_prefill_bucket=64) as llm:
        yield llm


@contextlib.contextmanager
def mode(llm, async_scheduling):
    assert not llm._async.in_flight
    before = llm.config
    llm.config = dataclasses.replace(before, async_scheduling=async_scheduling)
    try:
        yield llm
    finally:
        assert_settled(llm)
        llm.config = before


def workload(n=9, seed=0, **extra):
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, 256, size=LENGTHS[i % len(LENGTHS)]).tolist() for i in range(n)]
    params = []
    for i in range(n):
        kind = dict(temperature=0.8, top_k=20) if i % 3 == 1 else dict(temperature=1.0) if i % 3 == 2 else {}
        params.append(SamplingParams(max_tokens=10 + 2 * i, seed=100 + i, ignore_eos=True, **kind, **extra))
    return prompts, params


_ALONE: dict = {}  # (prompt, params) -> its output alone: tests share their references (per worker)


def one_at_a_time(llm, prompts, params):
    """Each request alone on the one-slot synchronous engine."""
    outs = []
    for p, sp in zip(prompts, params):
        key = (tuple(p), repr(sp))
        if key not in _ALONE:
            _ALONE[key] = llm.generate([p], sp)[0].outputs[0]
        outs.append(_ALONE[key])
    return outs


def run(llm, prompts, params, async_scheduling):
    """Generate; returns (outputs, stats of this run, decode batch sizes seen, preemptions) and checks nothing
    is left behind."""
    with mode(llm, async_scheduling):
        llm.stats = EngineStats()
        decode_sizes = []
        schedule = llm.scheduler.schedule

        def counted(**k):
            out = schedule(**k)
            decode_sizes.append(len(out.decodes))
            return out

        llm.scheduler.schedule = counted
        try:
            outs = llm.generate(prompts, params)
        finally:
            del llm.scheduler.schedule
    return [o.outputs[0] for o in outs], llm.stats, set(decode_sizes), sum(o.metrics.num_preemptions for o in outs)


def assert_settled(llm):
    """No step in flight, no pending token, no slot held, nothing deferred."""
    assert not llm._async.in_flight
    assert not llm.scheduler.has_unfinished()
    assert llm.scheduler.deferred_frees == ()
    if llm.config.kv_cache == "vattention":
        assert llm.manager.stats().live_slots == 0


def same(a, b):
    return [(c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in a] == \
           [(c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in b]


def test_config_flag_is_validated_and_off_by_default():
    assert EngineConfig().async_scheduling is False
    with pytest.raises(ValueError, match="async_scheduling"):
        EngineConfig(async_scheduling="yes")


def _fields(sp):
    return {k: getattr(sp, k) for k in ("max_tokens", "temperature", "top_k", "seed", "ignore_eos")}


@contextlib.contextmanager
def count_compiles():
    """XLA backend compilations while entered (jax.monitoring's event; a list, filled in place)."""
    seen: list[float] = []

    def listener(event, duration, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            seen.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield seen
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def test_same_tokens_as_sync_and_one_at_a_time_across_bucket_edges(engine, alone_engine):
    prompts, params = workload()
    alone = one_at_a_time(alone_engine, prompts, params)
    sync, sync_stats, sync_sizes, _ = run(engine, prompts, params, False)
    shapes_before = set(engine.runner._shapes)
    with count_compiles() as compiles:
        got, stats, sizes, _ = run(engine, prompts, params, True)
    # async steps run the executables sync steps (and warmup) compiled: only a step shape the sync run never
    # met compiles (the H200 run before the token slab recompiled every shape: 0.19x the sync engine)
    new_shapes = set(engine.runner._shapes) - shapes_before
    assert len(compiles) <= len(new_shapes), (len(compiles), new_shapes)
    assert same(got, alone) and same(sync, alone)
    for seen in (sizes, sync_sizes):
        assert {1, 2, 3, 4, 5, 8, 9} <= seen, f"the workload should cross every decode bucket edge: {sorted(seen)}"
    assert all(len(c.token_ids) == sp.max_tokens and c.finish_reason == "length" for c, sp in zip(got, params))
    assert len({tuple(c.token_ids) for c in got}) == len(got)
    # per-step host timestamps for the idle estimate: one per step, dispatch before result
    for st in (stats, sync_stats):
        assert len(st.device_steps) == st.steps and all(d <= r for d, r in st.device_steps)
        assert 0 <= st.device_idle_fraction() <= 1
        assert st.summary([], 1.0)["device_idle_fraction"] == st.device_idle_fraction()
    assert stats.sync_fallback_steps == stats.drains == 0


def test_logprobs_and_min_tokens_run_one_step_late(engine, alone_engine):
    prompts, params = workload(4, seed=1)
    stop = [c.token_ids[2] for c in one_at_a_time(alone_engine, prompts, params)]  # would stop early...
    params = [SamplingParams(**{**_fields(sp), "stop_token_ids": (t,), "min_tokens": 6, "logprobs": 2})
              for sp, t in zip(params, stop)]  # ...but min_tokens bans it until 6 tokens
    alone = one_at_a_time(alone_engine, prompts, params)
    got, stats, _, _ = run(engine, prompts, params, True)
    assert same(got, alone) and stats.sync_fallback_steps == 0
    for c, a in zip(got, alone):
        assert len(c.token_ids) >= 6 and c.logprobs is not None and a.logprobs is not None
        assert [sorted(lp) for lp in c.logprobs] == [sorted(lp) for lp in a.logprobs]
        np.testing.assert_allclose([lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)],
                                   [lp[t].logprob for t, lp in zip(a.token_ids, a.logprobs)], rtol=1e-5, atol=1e-5)


def test_stop_ids_and_stop_strings_finish_at_different_steps(engine, alone_engine):
    prompts, params = workload()
    ref = one_at_a_time(alone_engine, prompts, params)
    new = []
    for i, (sp, r) in enumerate(zip(params, ref)):
        k = 2 + i  # each request stops at its own step
        if i % 2:  # a stop id (the EOS path: stop ids and EOS are one set)
            new.append(SamplingParams(**{**_fields(sp), "stop_token_ids": (r.token_ids[k],)}))
        else:  # a stop string: the text of two output tokens
            new.append(SamplingParams(**{**_fields(sp), "stop": (TOK.decode(r.token_ids[k:k + 2]),)}))
    alone = one_at_a_time(alone_engine, prompts, new)
    sync, _, _, _ = run(engine, prompts, new, False)
    got, _, _, _ = run(engine, prompts, new, True)
    assert same(got, alone) and same(sync, alone)
    assert all(c.finish_reason == "stop" for c in got)
    assert len({len(c.token_ids) for c in got}) > 4  # they finished at different steps


def test_under_preemption(small_engine, alone_engine):
    prompts, params = workload(6)  # ~200 tokens for 128
    alone = one_at_a_time(alone_engine, prompts, params)
    sync, _, _, sync_preempted = run(small_engine, prompts, params, False)
    got, stats, _, preempted = run(small_engine, prompts, params, True)
    assert same(got, alone) and same(sync, alone)
    assert preempted > 0 and sync_preempted > 0, "the small pool should force preemption"
    assert stats.drains > 0  # preemption waited for the step in flight


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_cancellation_between_steps(engine, alone_engine, async_scheduling):
    prompts, params = workload()
    alone = one_at_a_time(alone_engine, prompts, params)
    with mode(engine, async_scheduling) as llm:
        reqs = [llm.add_request(p, sp) for p, sp in zip(prompts, params)]
        cancelled, states = set(), set()
        plan = {2: [8], 4: [6], 5: [0, 4], 8: [1]}  # step -> requests to abort then (waiting, prefill, decode)
        steps = 0
        while llm.scheduler.has_unfinished():
            for i in plan.get(steps, []):
                if not reqs[i].finished:
                    r = reqs[i]
                    states.add("waiting" if r.status.value == "waiting" else
                               "prefill" if r.num_cached < len(r.prompt) else "decode")
                    assert llm.abort_request(r.request_id)
                    cancelled.add(i)
            llm.step()
            steps += 1
    assert cancelled == {0, 1, 4, 6, 8} and states == {"waiting", "prefill", "decode"}
    for i, (r, a) in enumerate(zip(reqs, alone)):
        if i in cancelled:
            assert r.finish_reason == "cancelled" and r.output == a.token_ids[:len(r.output)]
        else:
            assert r.finish_reason == "length" and r.output == a.token_ids


def test_cancel_the_last_request_settles_the_step_in_flight(engine):
    prompts, params = workload(2)
    with mode(engine, True) as llm:
        reqs = [llm.add_request(p, sp) for p, sp in zip(prompts, params)]
        for _ in range(4):
            llm.step()
        assert llm._async.in_flight  # a step runs between calls
        for r in reqs:
            llm.abort_request(r.request_id)
        assert_settled(llm)
        assert [r.num_pending for r in reqs] == [0, 0]


def test_penalties_fall_back_to_sync_steps(engine, alone_engine):
    prompts, params = workload(4)
    params = [SamplingParams(**{**_fields(sp), "repetition_penalty": 1.3, "presence_penalty": 0.5})
              if i % 2 else sp for i, sp in enumerate(params)]
    alone = one_at_a_time(alone_engine, prompts, params)
    got, stats, _, _ = run(engine, prompts, params, True)
    assert same(got, alone)
    assert stats.sync_fallback_steps > 0


def test_async_llm_on_an_async_engine(engine, alone_engine):
    prompts, params = workload(5)
    alone = one_at_a_time(alone_engine, prompts, params)
    with mode(engine, True) as llm, AsyncLLM(llm) as stream_engine:

        async def collect(prompt, sp):
            return [d async for d in stream_engine.generate(prompt, sp)]

        async def main():
            return await asyncio.gather(*(collect(p, sp) for p, sp in zip(prompts, params)))

        got = asyncio.run(main())
    for deltas, a in zip(got, alone):
        assert deltas[-1].finished and deltas[-1].output.outputs[0].token_ids == a.token_ids
        assert [t for d in deltas for t in d.token_ids] == a.token_ids
        assert "".join(d.text for d in deltas) == a.text


def test_a_failing_step_loses_no_request_and_holds_no_slot(engine, alone_engine, monkeypatch):
    prompts, params = workload()
    alone = one_at_a_time(alone_engine, prompts, params)
    with mode(engine, True) as llm:
        reqs = [llm.add_request(p, sp) for p, sp in zip(prompts, params)]
        dispatch, calls = llm.runner.dispatch, [0]

        def failing(*a, **k):
            calls[0] += 1
            if calls[0] in (6, 11):
                raise RuntimeError("injected device failure")
            return dispatch(*a, **k)

        monkeypatch.setattr(llm.runner, "dispatch", failing)
        failures = 0
        while llm.scheduler.has_unfinished():
            try:
                llm.step()
            except RuntimeError as e:
                assert "injected" in str(e)
                failures += 1
                assert not llm._async.in_flight and llm.scheduler.deferred_frees == ()
                assert all(r.num_pending == 0 for r in reqs)  # rolled back: sampled again with the same keys
        monkeypatch.undo()
        assert failures == 2
    assert [r.output for r in reqs] == [a.token_ids for a in alone]


def test_a_failing_generate_leaves_nothing_in_flight(engine, alone_engine, monkeypatch):
    prompts, params = workload()
    with mode(engine, True) as llm:
        sampled, calls = llm._sampled_tokens, [0]

        def failing(*a, **k):  # fails while applying a step's results, with the next one in flight
            calls[0] += 1
            if calls[0] == 4:
                raise RuntimeError("injected")
            return sampled(*a, **k)

        monkeypatch.setattr(llm, "_sampled_tokens", failing)
        with pytest.raises(RuntimeError, match="injected"):
            llm.generate(prompts, params)
        assert_settled(llm)  # generate cancelled its requests
        monkeypatch.undo()
        assert same([o.outputs[0] for o in llm.generate(prompts, params)],
                    one_at_a_time(alone_engine, prompts, params))


def test_close_with_a_step_in_flight(model):
    prompts, params = workload(2)
    llm = LLM(model, tokenizer=TOK, **{**KW, "max_batch": 2}, async_scheduling=True)
    reqs = [llm.add_request(p, sp) for p, sp in zip(prompts, params)]
    for _ in range(3):
        llm.step()
    assert llm._async.in_flight and llm.scheduler.deferred_frees == ()
    llm.close()  # waits for the device, rolls the step back and frees every slot before the pool goes
    assert not llm._async.in_flight and llm.scheduler.deferred_frees == ()
    assert all(not r.finished and r.num_pending == 0 for r in reqs)


@pytest.mark.parametrize("kv_cache", ["paged", "static"])
def test_baseline_pools(model, kv_cache):
    """The paged pool hands a freed slot's pages to others at once: a slot a step in flight writes stays held."""
    prompts, params = workload(4, seed=2)
    with LLM(model, tokenizer=TOK, **{**KW, "max_batch": 4}, kv_cache=kv_cache) as llm:
        sync, _, _, _ = run(llm, prompts, params, False)
        got, _, _, _ = run(llm, prompts, params, True)
    assert same(got, sync)
