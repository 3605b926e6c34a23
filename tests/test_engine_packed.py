"""Packed ragged steps (``EngineConfig.packed_steps``, the default): every row's tokens flat in one token axis.

The bucketing bounds the compiled shapes and the padding; the row layout is what the kernels and caches read;
and the engine on packed steps gives the tokens of row-group steps and of a cache-free forward, through the jnp
reference and through the Pallas kernels (interpret mode: the varlen prefill kernel), at every token-bucket edge.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jax_vattention.packing import PackedRows, token_bucket, token_buckets


@given(st.integers(1, 8192), st.sampled_from([1, 8, 16]))
@settings(max_examples=300, deadline=None)
def test_token_bucket_bounds_padding(n, floor):
    cap = 8192
    b = token_bucket(n, cap, floor)
    assert n <= b <= cap and b in token_buckets(cap, floor)
    if n > floor:
        assert (b - n) / b < 1 / 3  # 2^k and 3 * 2^(k-1): at most a third of a step is padding


def test_token_buckets_are_few():
    assert len(token_buckets(8192, 16)) == 19  # a long run at an 8192-token budget compiles <= 19 step shapes
    assert token_buckets(40, 8) == [8, 12, 16, 24, 32, 40]  # the cap is a bucket


def test_packed_rows_layout():
    rows = PackedRows.build([1, 5, 1, 3], num_tokens=12, num_rows=6, num_prefill=3, max_row_tokens=8)
    np.testing.assert_array_equal(rows.offsets, [0, 1, 6, 7, 10, 10])
    np.testing.assert_array_equal(rows.token_rows, [0, 1, 1, 1, 1, 1, 2, 3, 3, 3, -1, -1])
    np.testing.assert_array_equal(rows.prefill_rows, [1, 3, -1])
    slot, pos = rows.token_coords(jnp.array([7, 2, 5, 1, 7, 7]), jnp.array([40, 0, 9, 16, 0, 0]))
    np.testing.assert_array_equal(slot, [7, 2, 2, 2, 2, 2, 5, 1, 1, 1, -1, -1])
    np.testing.assert_array_equal(pos, [40, 0, 1, 2, 3, 4, 9, 16, 17, 18, 0, 0])
    counts = jnp.array([1, 5, 1, 3, 0, 0])
    q = jnp.arange(12.0)[:, None]
    qd, is_dec = rows.decode_queries(q, counts)
    np.testing.assert_array_equal(qd[:, 0], [0, 5, 6, 9, 9, 9])
    np.testing.assert_array_equal(is_dec, [True, False, True, False, False, False])
    merged = rows.merge(jnp.zeros((12, 1)), jnp.full((6, 1), 7.0), is_dec)
    np.testing.assert_array_equal(merged[:, 0], [7, 0, 0, 0, 0, 0, 7, 0, 0, 0, 0, 0])


@pytest.mark.parametrize("bad,match", [
    (dict(counts=[5, 5], num_tokens=8), "do not fit"),
    (dict(counts=[1] * 7), "do not fit"),
    (dict(counts=[9]), "max_row_tokens"),
    (dict(counts=[2, 2, 2, 2]), "prefill rows"),
])
def test_packed_rows_refuse_what_does_not_fit(bad, match):
    kw = dict(num_tokens=16, num_rows=6, num_prefill=3, max_row_tokens=8) | bad
    with pytest.raises(ValueError, match=match):
        PackedRows.build(kw.pop("counts"), **kw)


pytest.importorskip("flax")
import models  # noqa: E402
from jax_vattention.attention import AttentionSpec  # noqa: E402
from jax_vattention.engine import SamplingParams  # noqa: E402
from jax_vattention.engine.llm import LLM  # noqa: E402
from models.testing import greedy_deficits  # noqa: E402

REF = AttentionSpec(impl="reference")
KERNELS = AttentionSpec(impl="kernel", interpret=True)
# buckets 4, 6, 8, 12, 16, 24 (budget 24, max_batch 4): prompt totals at, below and above every edge
KW = dict(max_batch=4, max_seq=128, page_bytes=4096, token_budget=24, chunk_size=16, max_prefill_rows=3,
          min_token_bucket=4)
EDGES = [1, 7, 8, 9, 11, 12, 13, 15, 16, 17, 23, 24, 25]


@pytest.fixture(scope="module")
def model():
    return models.random_model(models.get_preset("tiny"), seed=4, dtype=jnp.float32, init_std=0.2)


def workload(vocab, lengths, seed):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=n).tolist() for n in lengths]


def test_packed_equals_row_groups_and_pads_less(model):
    """The same tokens as row-group steps (fp32, reference attention), with fewer padded tokens and shapes."""
    ps = workload(model.config.vocab_size, EDGES, 0)
    sp = SamplingParams(max_tokens=7, ignore_eos=True)
    out, padded, shapes = {}, {}, {}
    for packed in (True, False):
        with LLM(model, attn=REF, packed_steps=packed, **KW) as llm:
            steps = []
            layout = llm.runner.layout
            llm.runner.layout = lambda o, pending=None, steps=steps, layout=layout: steps.append(
                layout(o, pending)) or steps[-1]
            out[packed] = [o.outputs[0].token_ids for o in llm.generate(ps, sp)]
            real = sum(int(s.counts.sum()) for s in steps)
            padded[packed] = 1 - real / sum(len(s.inputs.tokens) for s in steps)  # padding fraction
            shapes[packed] = llm.num_compiled
            assert all(len(s.inputs.tokens) in (4, 6, 8, 12, 16, 24) for s in steps) or not packed
    assert out[True] == out[False]
    assert padded[True] < padded[False] and padded[True] < 1 / 3, padded
    assert shapes[True] <= 6 < shapes[False], shapes


@pytest.mark.parametrize("kv_cache", ["vattention", "paged", "static"])
def test_packed_kernels_match_a_cache_free_forward(model, kv_cache):
    """Packed steps through the Pallas kernels (interpret mode; bf16 cache): decode rows by the decode kernel,
    prefill rows of any length by the varlen kernel, on every pool; each token is the argmax of a cache-free
    forward (teacher-forced) within bf16 rounding."""
    lengths = [17, 17, 17, 17, 17]  # greedy_deficits wants one prompt length: 17 = one chunk of 16 + 1
    ps = workload(model.config.vocab_size, lengths, 1)
    sp = SamplingParams(max_tokens=9, ignore_eos=True)
    with LLM(model, attn=KERNELS, kv_cache=kv_cache, dtype="bfloat16", **KW) as llm:
        outs = [o.outputs[0].token_ids for o in llm.generate(ps, sp)]
        assert llm.stats.peak_batch > 1
    deficit = greedy_deficits(model, ps, outs)
    assert deficit.max() < 0.5, f"{kv_cache}: worst deficit {deficit.max():.3f}"
