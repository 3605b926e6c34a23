"""Prefix caching in the engine (``enable_prefix_caching``): cached full pages mapped into new slots.

Outputs with caching equal outputs without it (greedy tokens identical; fp32 logits, reference attention) over
many requests sharing prefixes of every length around page boundaries; hits skip prefill (fewer prefill tokens
computed); preemption, cancellation and eviction under a small pool keep the index and the pool in agreement, and
nothing is leaked once the index is emptied.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("flax")
import models  # noqa: E402
from jax_vattention.attention import AttentionSpec  # noqa: E402
from jax_vattention.engine import EngineConfig, SamplingParams  # noqa: E402
from jax_vattention.engine.llm import LLM  # noqa: E402

REF = AttentionSpec(impl="reference")
# tiny model, fp32: 2 KiB per token with both layers interleaved (16 tokens per 32 KiB page), 512 B per token and
# tensor per layer (64 tokens per page); the paged baseline shares 16-token blocks
KW = dict(max_batch=4, max_seq=256, page_bytes=32 * 1024, attn=REF, token_budget=48, chunk_size=32,
          max_prefill_rows=2)
LAYOUTS = {"interleaved": ({}, 16), "per-layer": (dict(layers_per_group=1, max_seq=512), 64),
           "paged16": (dict(kv_cache="paged", page_size=16), 16)}


@pytest.fixture(scope="module")
def model():
    return models.random_model(models.get_preset("tiny"), seed=5, dtype=jnp.float32, init_std=0.2)


@pytest.fixture(params=list(LAYOUTS))
def layout(request):
    """(engine keywords, tokens per page: the sharing granularity)."""
    return LAYOUTS[request.param]


def shared_prefix_prompts(vocab, seed, n=10, tpp=16):
    """A system prompt of 2 pages + 1 token, then tails of lengths around page edges; some share longer prefixes."""
    rng = np.random.default_rng(seed)
    system = rng.integers(0, vocab, size=2 * tpp + 1).tolist()
    out = []
    for i in range(n):
        tail = rng.integers(0, vocab, size=[tpp - 1, tpp, tpp + 1, 1, 2 * tpp][i % 5]).tolist()
        out.append(system + tail)
    out.append(out[2] + [7, 8])  # extends another prompt: reuses its full pages past the system prompt
    out.append(out[2][:tpp])  # exactly one page: the last token is recomputed, nothing reused
    return out


def generate(model, prompts, caching, **kw):
    """Each prompt after the one before (each finds what the earlier ones cached): (tokens, prefill tokens computed,
    stats)."""
    with LLM(model, **{**KW, **kw}, enable_prefix_caching=caching) as llm:
        prefill_tokens = 0
        schedule = llm.scheduler.schedule

        def counted(**k):
            nonlocal prefill_tokens
            o = schedule(**k)
            prefill_tokens += sum(c.num_tokens for c in o.prefills)
            return o

        llm.scheduler.schedule = counted
        out = [llm.generate([p], SamplingParams(max_tokens=6, ignore_eos=True))[0].outputs[0].token_ids
               for p in prompts]
        del llm.scheduler.schedule
        return out, prefill_tokens, llm.stats.summary([], 1.0)


def test_outputs_equal_without_caching_and_prefill_is_skipped(model, layout):
    kw, tpp = layout
    prompts = shared_prefix_prompts(model.config.vocab_size, 0, tpp=tpp)
    base, base_prefill, _ = generate(model, prompts, False, **kw)
    got, prefill, stats = generate(model, prompts, True, **kw)
    assert got == base
    assert prefill < base_prefill
    assert stats["prefix_cache_hit_tokens"] >= (len(prompts) - 2) * 2 * tpp  # the system prompt, every time
    assert 0 < stats["prefix_cache_hit_rate"] < 1
    assert stats["prefix_cache_pages"] > 0  # cached pages outlive their requests


def test_requests_running_together_share_a_prompt_once_it_is_computed(model, layout):
    """All requests queued at once: those admitted after the first one's prefill chunks reuse its pages while it
    still runs (pages are indexed as they fill, not only when a request ends), with the same tokens."""
    kw, tpp = layout
    prompts = shared_prefix_prompts(model.config.vocab_size, 1, n=6, tpp=tpp)[:6]
    sp = SamplingParams(max_tokens=24, ignore_eos=True)
    with LLM(model, **{**KW, **kw}, enable_prefix_caching=False) as llm:
        want = [o.outputs[0].token_ids for o in llm.generate(prompts, sp)]
    with LLM(model, **{**KW, **kw}, enable_prefix_caching=True) as llm:
        reqs = [llm.add_request(p, sp) for p in prompts]
        hits_while_first_runs = 0
        while llm.scheduler.has_unfinished():
            llm.step()
            if not reqs[0].finished:
                hits_while_first_runs = llm.scheduler.prefix.stats()["prefix_cache_hit_tokens"]
    assert [r.output for r in reqs] == want
    assert hits_while_first_runs >= 2 * tpp  # a request mapped the system prompt's pages before the first ended


def test_config_validation():
    with pytest.raises(ValueError, match="enable_prefix_caching"):
        EngineConfig(kv_cache="static", enable_prefix_caching=True)
    with pytest.raises(ValueError, match="enable_prefix_caching"):
        EngineConfig(premap=True, enable_prefix_caching=True)
    with pytest.raises(ValueError, match="enable_prefix_caching"):
        EngineConfig(enable_prefix_caching="yes")


@pytest.mark.parametrize("name", ["interleaved", "paged16"])
@given(st.data())
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                HealthCheck.function_scoped_fixture])
def test_random_admit_finish_preempt_cancel_evict(model, name, data):
    """A pool too small for every request at once (preemption) and for every cached page (eviction), with random
    cancellations: every request that is not cancelled gives the tokens of the run without caching, and once the
    engine is idle and the index emptied, no page is pinned, shared or in use."""
    seed = data.draw(st.integers(0, 1 << 16))
    prompts = shared_prefix_prompts(model.config.vocab_size, seed, n=8)
    cancel_at = data.draw(st.lists(st.integers(1, 12), min_size=2, max_size=2))
    sp = SamplingParams(max_tokens=8, ignore_eos=True)
    kw = dict(KW, **LAYOUTS[name][0], pool_bytes=24 * 32 * 1024)  # 24 pages of 16 tokens: 2-3 requests at a time
    with LLM(model, **kw, enable_prefix_caching=False) as ref_llm:
        want = [o.outputs[0].token_ids for o in ref_llm.generate(prompts, sp)]
    with LLM(model, **kw, enable_prefix_caching=True) as llm:
        reqs = [llm.add_request(p, sp) for p in prompts]
        cancelled, steps = set(), 0
        while llm.scheduler.has_unfinished():
            llm.step()
            steps += 1
            if steps in cancel_at:
                victim = reqs[(steps * 3) % len(reqs)]
                if llm.scheduler.cancel(victim.request_id):
                    cancelled.add(victim.request_id)
            llm.scheduler.prefix.index.check()
        for r, w in zip(reqs, want):
            if r.request_id not in cancelled:
                assert r.output == w, f"request {r.request_id}"
        prefix = llm.scheduler.prefix
        assert all(p.holders == 0 for p in prefix.index.pages.values())
        prefix.evict(10 ** 6)
        assert len(prefix.index) == 0 and llm.pool.pages_live() == 0
        if name == "paged16":  # every page back on the free list, no reference or pin left
            assert sorted(llm.pool._free) == list(range(llm.pool.pages_total()))
            assert not llm.pool._refs.any() and not llm.pool._pins
        else:
            llm.manager.trim()
            s = llm.manager.stats()
            assert s.pages_pinned == 0 and s.pages_shared == 0 and s.live_slots == 0 and s.pages_in_use == 0
