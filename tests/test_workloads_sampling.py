"""Engine pieces without a model: seeded workloads and on-device per-row sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_vattention.engine.workloads import (
    chat_turns,
    conversation_prompts,
    long_context,
    shared_system_prompt,
    sharegpt_like,
)
from jax_vattention.sampler import SamplingMode
from jax_vattention.sampling import SamplingParams, SamplingRows, filter_logits_reference, sample_rows, sampling_mode


def test_workloads_are_seeded_and_shaped_like_their_traffic():
    a, b = sharegpt_like(400, vocab_size=1000, seed=3), sharegpt_like(400, vocab_size=1000, seed=3)
    assert a.prompts == b.prompts and a.params == b.params
    assert sharegpt_like(400, vocab_size=1000, seed=4).prompts != a.prompts
    pl = np.array([len(p) for p in a.prompts])
    ol = np.array([p.max_tokens for p in a.params])
    assert 180 < np.median(pl) < 360 and pl.min() >= 4 and pl.max() <= 2048 and pl.max() > 1000  # heavy tail
    assert 130 < np.median(ol) < 260 and ol.min() >= 8 and ol.max() <= 1024
    assert all(0 <= t < 1000 for p in a.prompts for t in p)
    lc = long_context(50, vocab_size=1000, seed=0)
    lens = np.array([len(p) for p in lc.prompts])
    assert lens.min() >= 8192 and lens.max() <= 32768 and lc.max_len() <= 32768 + 512
    assert lc.output_tokens == sum(p.max_tokens for p in lc.params) and "long-context" in lc.describe()
    with pytest.raises(ValueError, match="number of requests"):
        sharegpt_like(0, vocab_size=10)
    with pytest.raises(ValueError, match="min_prompt"):
        long_context(2, vocab_size=10, min_prompt=10, max_prompt=5)


def test_prefix_caching_workloads_share_what_they_should():
    w = shared_system_prompt(30, vocab_size=1000, seed=1, system_len=100)
    assert w.prompts == shared_system_prompt(30, vocab_size=1000, seed=1, system_len=100).prompts
    assert all(p[:100] == w.prompts[0][:100] and len(p) > 100 for p in w.prompts)  # one system prompt, own tails
    assert len({tuple(p[100:]) for p in w.prompts}) == 30
    turns = chat_turns(5, 3, vocab_size=1000, seed=2, system_len=20)
    assert len(turns) == 3 and all(len(t) == 5 for t in turns)
    assert all(p[:20] == turns[0].prompts[0][:20] for p in turns[0].prompts)  # turn 1 starts with the system
    answers = [[1, 2]] * 5
    nxt = conversation_prompts(turns[0].prompts, answers, turns[1].prompts)
    assert nxt[3] == turns[0].prompts[3] + [1, 2] + turns[1].prompts[3]  # re-sends the conversation so far
    with pytest.raises(ValueError, match="system_len"):
        shared_system_prompt(3, vocab_size=10, system_len=0)
    with pytest.raises(ValueError, match="turns"):
        chat_turns(3, 0, vocab_size=10)
    with pytest.raises(ValueError, match="differ in length"):
        conversation_prompts(turns[0].prompts, answers[:4], turns[1].prompts)


def test_sampling_mode_is_the_cheapest_that_covers_the_batch():
    assert sampling_mode([SamplingParams(), SamplingParams(temperature=1.0, top_k=1)]) == SamplingMode("greedy")
    assert sampling_mode([SamplingParams(), SamplingParams(temperature=0.7)]) == SamplingMode("sample")
    filtered = sampling_mode([SamplingParams(temperature=0.7), SamplingParams(temperature=1.0, top_p=0.9)])
    assert filtered == SamplingMode("filter")


def test_sample_rows_matches_the_per_request_reference():
    """Each row samples exactly what the per-request jnp reference draws for it alone (same key, same filters)."""

    rng = np.random.default_rng(0)
    rows = [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.8, 20, 1.0), (1.3, 0, 0.8), (0.9, 50, 0.6), (1.0, 1, 1.0)]
    for trial in range(5):
        logits = jnp.asarray(rng.normal(size=(len(rows), 300)) * 3, jnp.float32)
        temp = jnp.asarray([r[0] for r in rows], jnp.float32)
        top_k = jnp.asarray([r[1] for r in rows], jnp.int32)
        top_p = jnp.asarray([r[2] for r in rows], jnp.float32)
        seeds = jnp.asarray(rng.integers(0, 1000, len(rows)), jnp.int32)
        counts = jnp.asarray(rng.integers(0, 50, len(rows)), jnp.int32)
        sampling = SamplingRows(temp, top_k, top_p, seeds, counts)
        got = np.asarray(jax.jit(sample_rows, static_argnums=2)(logits, sampling, "filter"))
        for b, (t, k, p) in enumerate(rows):
            if SamplingParams(temperature=t, top_k=k, top_p=p).greedy:
                want = int(jnp.argmax(logits[b]))
            else:
                key = jax.random.fold_in(jax.random.PRNGKey(int(seeds[b])), int(counts[b]))
                want = int(jax.random.categorical(key, filter_logits_reference(logits[b][None], t, k, p)[0]))
            assert got[b] == want, (trial, b)
    greedy = sample_rows(logits, SamplingRows(temp * 0, top_k, top_p, seeds, counts), "greedy")
    np.testing.assert_array_equal(np.asarray(greedy), np.asarray(jnp.argmax(logits, -1)))
    with pytest.raises(ValueError, match="sampling mode"):
        sample_rows(logits, sampling, "beam")


@pytest.mark.parametrize("kw,match", [(dict(seed=2**40), "seed"), (dict(seed=1.5), "seed"), (dict(top_k=2.0), "top_k"),
                                      (dict(top_k=2**40), "top_k"),
                                      (dict(top_p=0.0), "top_p"), (dict(temperature=-1.0), "temperature"),
                                      (dict(max_tokens=0), "max_tokens")])
def test_sampling_params_refuse_what_the_device_step_cannot_hold(kw, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kw)
