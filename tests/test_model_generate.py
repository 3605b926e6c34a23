"""Generation on the vAttention cache (host backend, strict ``unbacked_reads="fault"``: memory past a slot's
mapped pages is PROT_NONE, so a read past the pages the tokens need segfaults instead of reading zeros).

Consistency: full-sequence forward == prefill + single-token decode steps;
vAttention cache == static cache; batched == one request at a time. Memory:
finished rows stop growing and nothing beyond the pages the tokens need is
mapped. Bad input: clear errors, nothing left mapped. Most tests use the jnp
reference attention (fp32); one runs the Pallas kernels in interpret mode.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

# Without the models package's dependencies (e.g. a device image with only jax), skip rather than
# break collection of the whole suite.
pytest.importorskip("flax", reason="models needs flax (pip install -e .)")
pytest.importorskip("safetensors", reason="models needs safetensors (pip install -e .)")

from flax import nnx

import jax_vattention as jv
import models
from jax_vattention import attention as vattn
from jax_vattention.attention import AttentionSpec
from jax_vattention.attention.dispatch import decode_attention_reference, prefill_attention_reference
from jax_vattention.hlo import assert_no_cache_copy, check_compiled, copies_of_views
from jax_vattention.sampling import SamplingParams, SamplingRows, filter_logits_reference
from models import GenerationInputError
from models import decode as dec
from models.testing import assert_same_greedy, rel_error

CFG = models.get_preset("tiny").replace(vocab_size=128, hidden_size=64, intermediate_size=128, head_dim=16,
                                         tie_word_embeddings=False)
REF = AttentionSpec(impl="reference")
PAGE = 4096  # 2 kv heads x 16 x fp32 = 128 B per token: 32 tokens per page
TPP = PAGE // (CFG.num_kv_heads * CFG.head_dim * 4)


@pytest.fixture(scope="module")
def model():
    return models.random_model(CFG, seed=0, init_std=0.25)


@pytest.fixture(scope="module")
def gen(model):
    return models.Generator(model, attn=REF)


# Both KV layouts: per-layer tensors (1) and every layer interleaved per token (CacheConfig.layers_per_group).
LAYOUTS = [1, CFG.num_layers]


def entries(group: int) -> int:
    return 1 if group == 1 else 2 * group


def manager(max_batch=4, max_seq=96, group=1, **kw):
    """A strict cache; ``page_bytes`` scales with the layout's entries per token, so both layouts back the same
    TPP tokens per page and map the same bytes (test_manager covers the interleaved layout's finer pages)."""
    kw.setdefault("page_bytes", PAGE * entries(group))
    kw.setdefault("unbacked_reads", "fault")
    return jv.KVCacheManager(models.cache_config_for(CFG, max_batch=max_batch, max_seq=max_seq, dtype="float32",
                                                     layers_per_group=group, **kw))


def ragged_prompts(rng, n=4, shortest=1, longest=29):
    lens = rng.integers(shortest, longest + 1, size=n)
    lens[rng.integers(n)] = longest  # fixes the padded width (one compilation for all tests)
    return [rng.integers(0, CFG.vocab_size, size=int(k)).tolist() for k in lens]


def random_budgets(rng, n=4, low=1, high=32):
    budgets = rng.integers(low, high + 1, size=n)
    budgets[rng.integers(n)] = high  # fixes the output width and the attention window
    return budgets.tolist()


def pages(tokens):
    return -(-tokens // TPP)


def sp(budgets, stop=(), seed=None, **kw):
    """``SamplingParams`` for one budget (an int) or one per budget (a list).

    ``stop`` replaces the model's EOS (default: no stop token; ``None``: the EOS default;
    a list of lists: one per request). ``seed``: request i samples with ``seed + i``.
    """
    many = isinstance(budgets, (list, tuple))
    out = []
    for i, n in enumerate(budgets if many else [budgets]):
        s = stop[i] if stop and isinstance(stop[0], (list, tuple)) else stop
        extra = dict(kw, seed=seed + i) if seed is not None else kw
        out.append(SamplingParams(max_tokens=n, stop_token_ids=s or (), ignore_eos=s is not None, **extra))
    return out if many else out[0]


# -- consistency -----------------------------------------------------------------
@pytest.mark.parametrize("kind", ["vattention", "vattention-interleaved", "static"])
def test_forward_equals_prefill_plus_decode_steps(model, rng, kind):
    """Chunked prefill of ragged prefixes, then N teacher-forced decode steps, vs one causal forward (fp32)."""
    B, T, N = 3, 40, 12
    tokens = rng.integers(0, CFG.vocab_size, size=(B, T)).astype(np.int32)
    prefix = rng.integers(1, T - N, size=B).astype(np.int32)
    full = np.asarray(models.llama.full_logits(model, tokens))  # [B, T, V]
    graphdef, params = nnx.split(model)
    spec = REF.with_max_len(64)

    def prefill_fn(params, cache, toks, counts):
        logits, cache = models.prefill(nnx.merge(graphdef, params), toks, counts, cache, spec)
        return logits, cache.export()

    def step_fn(params, cache, toks):
        _, logits, cache = models.decode_step(nnx.merge(graphdef, params), toks, cache, spec,
                                              SamplingRows.padding(B))
        return logits, cache.export()

    prefill_fn, step_fn = jax.jit(prefill_fn), jax.jit(step_fn)
    vattention = kind.startswith("vattention")
    with manager(group=CFG.num_layers if kind == "vattention-interleaved" else 1) as m:
        if vattention:
            slots = [m.allocate() for _ in range(B)][::-1]
            cache = m.cache(slots, np.zeros(B, np.int32))
        else:
            cache = models.static_cache_for(CFG, max_batch=4, max_seq=96, dtype="float32").with_rows(
                [2, 0, 3], np.zeros(B, np.int32))
        got, want = [], []
        width, done = 8, np.zeros(B, np.int32)
        last = np.zeros((B, CFG.vocab_size), np.float32)
        while (done < prefix).any():  # chunks of 8: rows finish their prefix at different chunks
            counts = np.minimum(prefix - done, width).astype(np.int32)
            chunk = np.zeros((B, width), np.int32)
            for b in range(B):
                chunk[b, : counts[b]] = tokens[b, done[b]: done[b] + counts[b]]
            logits, exported = prefill_fn(params, cache, jnp.asarray(chunk), jnp.asarray(counts))
            cache = cache.restore(exported)
            last = np.where((counts > 0)[:, None], np.asarray(logits), last)
            done += counts
        got.append(last)
        want.append(full[np.arange(B), prefix - 1])
        for i in range(N):
            pos = prefix + i
            logits, exported = step_fn(params, cache, jnp.asarray(tokens[np.arange(B), pos]))
            cache = cache.restore(exported)
            got.append(np.asarray(logits))
            want.append(full[np.arange(B), pos])
        np.testing.assert_array_equal(np.asarray(cache.lengths), prefix + N)
        if vattention:
            assert [m.capacity(s) for s in slots] == [pages(int(n)) * TPP for n in prefix + N]
    err = rel_error(np.stack(got), np.stack(want))
    assert err <= 1e-5, f"prefill + decode vs full forward: rel. error {err:.2e}"


@pytest.mark.parametrize("group", LAYOUTS)
def test_vattention_and_static_cache_same_greedy_tokens(model, gen, rng, group):
    prompts = ragged_prompts(rng)
    budgets = random_budgets(rng)
    with manager(group=group) as m:
        a = gen.generate(prompts, m, sp(budgets))
    static = models.static_cache_for(CFG, max_batch=4, max_seq=96, dtype="float32")
    b = gen.generate(prompts, static, sp(budgets))
    assert [len(t) for t in a.tokens] == budgets
    assert_same_greedy(a.tokens, b.tokens, prompts, model, what="vattention vs static")
    assert b.static_cache is not None and b.static_cache.nbytes == a.static_bytes
    assert a.mapped_bytes < a.static_bytes


@pytest.mark.parametrize("sampling", [dict(), dict(temperature=0.8, top_k=20, top_p=0.9)], ids=["greedy", "sampled"])
def test_batched_equals_one_at_a_time(model, gen, rng, sampling):
    # Lengths and budgets keep every single-request run in one shape bucket (one compilation).
    prompts = ragged_prompts(rng, shortest=17)
    budgets = random_budgets(rng, low=17)
    key = int(rng.integers(2**30))
    with manager() as m:
        batched = gen.generate(prompts, m, sp(budgets, seed=key, **sampling))
        single = [gen.generate([p], m, sp(n, seed=key + i, **sampling)).tokens[0]
                  for i, (p, n) in enumerate(zip(prompts, budgets))]
        assert m.stats().live_slots == 0
    if SamplingParams(**sampling).greedy:
        assert_same_greedy(batched.tokens, single, prompts, model, what="batched vs single")
    else:
        assert batched.tokens == single


@pytest.mark.parametrize("group", LAYOUTS)
def test_stop_tokens_budgets_and_memory(gen, rng, group):
    """Per-request budgets and stop tokens; finished rows stop growing; mapped == what the tokens need."""
    prompts = ragged_prompts(rng)
    budgets = [1, 5, 32, 19]
    with manager(group=group) as m:
        free = gen.generate(prompts, m, sp(budgets))
        assert [len(t) for t in free.tokens] == budgets and set(free.finish_reasons) == {"length"}
        stop = free.tokens[2][6]
        cut = free.tokens[2].index(stop) + 1
        stops = [[], [], [stop], []]  # per request
        m.trim()  # unmap the pages the freed slots keep (deferred reclamation): count only this run's
        r = gen.generate(prompts, m, sp(budgets, stop=stops))
        assert r.tokens[2] == free.tokens[2][:cut] and r.finish_reasons[2] == "stop"
        assert [r.tokens[i] for i in (0, 1, 3)] == [free.tokens[i] for i in (0, 1, 3)]
        lengths = np.array([len(p) for p in prompts]) + np.array([len(t) for t in r.tokens]) - 1
        assert r.cache_lengths == lengths.tolist()
        assert r.slot_capacity == [pages(int(n)) * TPP for n in lengths]  # the stopped row stopped growing
        tensors = 2 * CFG.num_layers
        assert r.mapped_bytes == tensors * sum(pages(int(n)) for n in lengths) * PAGE
        token_bytes = CFG.num_kv_heads * CFG.head_dim * 4
        assert r.mapped_bytes <= tensors * (int(lengths.sum()) * token_bytes + len(prompts) * PAGE)
        assert r.needed_bytes == int(lengths.sum()) * tensors * token_bytes
        assert r.decode_steps == max(len(t) for t in r.tokens) - 1
        assert m.stats().live_slots == 0  # slots freed after the run


def test_stop_on_eos_from_config(model, rng):
    """Default stop tokens are the config's eos ids; a row that stops early is padded by nothing."""
    prompts = ragged_prompts(rng)
    g = models.Generator(model, attn=REF)
    with manager() as m:
        free = g.generate(prompts, m, sp(24))
        eos = free.tokens[0][3]
        g.config = CFG.replace(eos_token_ids=(eos,))
        r = g.generate(prompts, m, sp(24, stop=None))
    for got, ref in zip(r.tokens, free.tokens):
        want = ref[: ref.index(eos) + 1] if eos in ref else ref
        assert got == want


def test_chunked_prefill_and_chunked_decode_loop(model, gen, rng):
    prompts = ragged_prompts(rng)
    with manager() as m:
        whole = gen.generate(prompts, m, sp(30))
        chunked = gen.generate(prompts, m, sp(30), prefill_chunk=8, decode_chunk=7,
                               progress=True)
        again = gen.generate(prompts, m, sp(30))
    assert again.compile_seconds == 0.0  # compiled once per shape, reused
    assert_same_greedy(whole.tokens, chunked.tokens, prompts, model, what="chunked")
    assert chunked.decode_steps == whole.decode_steps == 29


def test_sampling_settings(gen, rng):
    prompts = ragged_prompts(rng)
    key = int(rng.integers(2**30))
    with manager() as m:

        def run(s, k=key):
            return gen.generate(prompts, m, [sp(16, seed=k + i, **s) for i in range(len(prompts))]).tokens

        greedy = run(dict())
        assert run(dict(temperature=1.0, top_k=1)) == greedy
        hot = dict(temperature=1.5)
        a = run(hot)
        assert run(hot) == a  # same seeds, same tokens
        assert run(hot, key + 1000) != a
        assert a != greedy


def test_filter_logits_matches_numpy(rng):
    logits = rng.standard_normal((5, 50)).astype(np.float32) * 3
    for k, p in [(7, 1.0), (0, 0.6), (10, 0.3), (0, 1.0)]:
        got = np.asarray(filter_logits_reference(jnp.asarray(logits), 0.7, k, p))
        for row, out in zip(logits / 0.7, got):
            order = np.argsort(-row)
            keep = np.zeros(50, bool)
            keep[order[: k or 50]] = True
            # top-p acts on the distribution left by top-k (renormalised), as in HF's warpers
            masked = np.where(keep, row, -np.inf)
            probs = np.exp(masked - row.max()) / np.exp(masked - row.max()).sum()
            before = np.cumsum(probs[order]) - probs[order]
            if p < 1.0:  # top_p == 1 means no nucleus cut (the cumsum can round past 1)
                keep[order[before >= p]] = False
            assert np.array_equal(np.isfinite(out), keep), (k, p)
            np.testing.assert_allclose(out[keep], row[keep], rtol=1e-6)


# -- copy-free compiled programs ---------------------------------------------------
@pytest.mark.parametrize("group", LAYOUTS)
def test_compiled_prefill_and_decode_loop_copy_no_cache(model, group):
    graphdef, params = nnx.split(model)
    spec = REF.with_max_len(64)
    # The size-based check needs a cache larger than any activation: [4, 512, 2, 16] = 64Ki elements.
    with manager(max_batch=4, max_seq=512, group=group) as m:
        cache = m.cache([m.allocate() for _ in range(3)], np.zeros(3, np.int32))
        tokens, counts = jnp.zeros((3, 16), jnp.int32), jnp.array([3, 16, 9], jnp.int32)
        logits = jnp.zeros((3, CFG.vocab_size), jnp.float32)
        prefill_program, decode_program = dec.programs(cache.donates)
        text = prefill_program.lower(graphdef, params, cache, tokens, counts, logits, attn=spec).compile().as_text()
        assert_no_cache_copy(text, m)
        assert "vattn_grow" in text and "vattn_write" in text
        rows = SamplingRows.of([SamplingParams(temperature=1.0, top_p=0.9, seed=0)] * 3, [0] * 3)
        stop = jnp.full((3, 1), -1, jnp.int32)
        carry = dec.start_carry(logits, rows, jnp.full((3,), 8), stop, 8, "greedy")
        lowered = decode_program.lower(graphdef, params, cache, carry, jnp.int32(7), jnp.full((3,), 8), stop,
                                       rows, attn=spec, mode="filter")
        text = lowered.compile().as_text()
        assert_no_cache_copy(text, m)
        assert "while" in text and "vattn_grow" in text
        # A full batch with a full-length window: the reference's gathered window is as large as a cache
        # tensor, so any transposed copy of it would be flagged; the loop must have none.
        fourth = m.allocate()  # every slot allocated: a cache's rows must be live slots
        full = m.cache(np.arange(4, dtype=np.int32), np.zeros(4, np.int32))
        rows4, stop4 = SamplingRows.padding(4), jnp.full((4, 1), -1, jnp.int32)
        carry4 = dec.start_carry(jnp.zeros((4, CFG.vocab_size)), rows4, jnp.full((4,), 8), stop4, 8, "greedy")
        text = decode_program.lower(graphdef, params, full, carry4, jnp.int32(7), jnp.full((4,), 8), stop4, rows4,
                                    attn=REF.with_max_len(512), mode="greedy").compile().as_text()
        assert_no_cache_copy(text, m)
        # Negative controls: returning a view from a top-level jit, or a transposed read of it, copies the cache;
        # the operand-tracing guard the Generator applies to prefill programs sees both, and no activations.
        bad = jax.jit(lambda c: (c.tensors[0], c.state)).lower(cache).compile().as_text()
        with pytest.raises(jv.VAttentionError, match="cache-sized"):
            assert_no_cache_copy(bad, m)
        with pytest.raises(jv.VAttentionError, match="copies a cache view"):
            check_compiled(bad, m, strict=False)
        view = m.config.tensor_shape(m.max_seq)
        swap = (1, 0, *range(2, len(view)))
        bad = jax.jit(lambda c: c.tensors[-1].transpose(swap)[::2]).lower(cache).compile().as_text()
        assert copies_of_views(bad, view)
        big = jax.jit(lambda c: jnp.ones(view[::-1]).transpose(*reversed(range(len(view)))) * c.lengths[0])
        big = big.lower(cache)
        assert copies_of_views(big.compile().as_text(), view) == []  # an activation, not the view
        for s in [*np.asarray(cache.slots).tolist(), fourth]:
            m.free(int(s))


# -- bad input ---------------------------------------------------------------------
@pytest.mark.parametrize("prompts,budget,match", [
    ([[1] * 97], 1, "97 tokens, longer than max_seq=96"),
    ([[1] * 90, [2]], 8, "90 prompt tokens \\+ max_tokens=8 need 97"),
    ([[1, 2], [3]], [4], "one per prompt \\(2\\)"),
    ([[1, 2], []], 4, "prompt 1 must be a non-empty"),
    ([[1.7, 2.2]], 4, "integer token ids"),
    ([[True, False]], 4, "integer token ids"),
    (["12"], 4, "is a string"),
    ([1, 2, 3], 4, "for one prompt pass \\[ids\\]"),
    ([[1, 128]], 4, "outside \\[0, vocab_size=128\\)"),
    ([[1]] * 5, 4, "5 prompts exceed the cache's max_batch=4"),
    ([], 4, "non-empty list"),
])
def test_bad_requests_leave_nothing_mapped(gen, prompts, budget, match):
    with manager() as m:
        with pytest.raises(GenerationInputError, match=match):
            gen.generate(prompts, m, sp(budget, stop=None))
        st = m.stats()
        assert st.pages_mapped == 0 and st.live_slots == 0 and st.maps == 0


def test_bad_settings(gen, model):
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1.0)
    for bad in (0, -3):
        with pytest.raises(ValueError, match=f"max_tokens must be a positive int, got {bad}"):
            SamplingParams(max_tokens=bad)
    with manager() as m:
        for chunk in (0, -1, 1.5, True):  # a negative chunk used to spin forever in the decode loop
            with pytest.raises(GenerationInputError, match="decode_chunk"):
                gen.generate([[1]], m, sp(2), decode_chunk=chunk)
            with pytest.raises(GenerationInputError, match="prefill_chunk"):
                gen.generate([[1]], m, sp(2), prefill_chunk=chunk)
        assert m.stats().pages_mapped == 0 and m.stats().live_slots == 0
    with manager() as m:
        slots = [m.allocate() for _ in range(3)]
        with pytest.raises(GenerationInputError, match="only 1 free slots"):
            gen.generate([[1], [2]], m, sp(2, stop=None))
        for s in slots:
            m.free(s)
        m.trim()
        with pytest.raises(models.UnsupportedModelError, match="sliding_window=16"):
            windowed = models.Generator(models.random_model(CFG.replace(sliding_window=16)))
            windowed.generate([[1] * 10], m, sp(8, stop=None))
        assert m.stats().pages_mapped == 0
    other = jv.CacheConfig(num_layers=3, max_batch=2, max_seq=64, kv_heads=2, head_dim=16, dtype="float32",
                           page_bytes=PAGE)
    with jv.KVCacheManager(other) as m:
        with pytest.raises(GenerationInputError, match="does not fit the model"):
            gen.generate([[1]], m, sp(2, stop=None))
    with jv.KVCacheManager(models.cache_config_for(CFG, max_batch=2, max_seq=64, dtype="float32",
                                                  page_bytes=PAGE)) as m:
        with pytest.raises(GenerationInputError, match="stop strings need text"):
            gen.generate([[1]], m, SamplingParams(max_tokens=2, stop=["x"]))
        assert m.stats().pages_mapped == 0
    with pytest.raises(TypeError, match="KVCacheManager or a StaticKVCache"):
        gen.generate([[1]], object(), sp(2, stop=None))


@pytest.mark.parametrize("group", LAYOUTS)
def test_pool_exhausted_in_decode_loop_cleans_up(gen, rng, group):
    """Growth past the page budget fails inside the jitted loop; the slots are freed and unmapped."""
    # 2 pages per tensor: the same bytes in both layouts
    with manager(max_batch=2, max_seq=96, group=group, pool_bytes=2 * CFG.num_layers * 2 * PAGE) as m:
        prompt = rng.integers(0, CFG.vocab_size, size=20).tolist()
        with pytest.raises(jax.errors.JaxRuntimeError, match="PoolExhaustedError"):
            gen.generate([prompt], m, sp(60))  # needs 3 pages per tensor
        st = m.stats()
        assert st.pages_mapped == 0 and st.live_slots == 0
        ok = gen.generate([prompt], m, sp(40))  # fits: the manager still works
        assert len(ok.tokens[0]) == 40


# -- attention implementations -----------------------------------------------------
def test_jnp_reference_matches_package_reference(rng):
    """The dispatch's any-dtype jnp attention agrees with the attention package's bf16 references."""
    mb, seq, hkv, d, hq = 4, 64, 2, 64, 8
    k = jnp.asarray(rng.standard_normal((mb, seq, hkv, d)), jnp.bfloat16)
    v = jnp.asarray(rng.standard_normal((mb, seq, hkv, d)), jnp.bfloat16)
    slots = jnp.array([3, 0, 2], jnp.int32)
    lengths = jnp.asarray(rng.integers(1, seq + 1, size=3), jnp.int32)
    q = jnp.asarray(rng.standard_normal((3, hq, d)), jnp.bfloat16)
    vattn.assert_close(decode_attention_reference(q, k, v, slots, lengths, window=seq),
                       vattn.decode_attention_reference(q, k, v, slots, lengths), what="decode")
    q_lens = jnp.minimum(lengths, 12)
    qp = jnp.asarray(rng.standard_normal((3, 12, hq, d)), jnp.bfloat16)
    vattn.assert_close(prefill_attention_reference(qp, k, v, slots, lengths - q_lens, q_lens, window=seq),
                       vattn.chunked_prefill_attention_reference(qp, k, v, slots, lengths - q_lens, q_lens),
                       what="prefill")


@pytest.mark.parametrize("group", LAYOUTS)
def test_pallas_kernels_in_interpret_mode_match_reference(rng, group):
    """bf16, head_dim 64: the Pallas decode + chunked-prefill kernels (interpret mode) vs the jnp reference."""
    cfg = CFG.replace(hidden_size=128, head_dim=64, intermediate_size=128)
    model = models.random_model(cfg, seed=int(rng.integers(1000)), init_std=0.2, dtype=jnp.bfloat16)
    prompts = [rng.integers(0, cfg.vocab_size, size=int(n)).tolist() for n in (5, 37, 1)]
    cache_cfg = models.cache_config_for(cfg, max_batch=3, max_seq=96, dtype="bfloat16",
                                        page_bytes=8192 * entries(group), unbacked_reads="fault",
                                        layers_per_group=group)
    out = {}
    for impl in ("kernel", "reference"):
        g = models.Generator(model, attn=AttentionSpec(impl=impl, interpret=True, block_k=32))
        with jv.KVCacheManager(cache_cfg) as m:  # 32 tokens per page: block_k=32 reads only mapped pages
            out[impl] = g.generate(prompts, m, sp([12, 20, 30]), prefill_chunk=16)
    assert [len(t) for t in out["kernel"].tokens] == [12, 20, 30]
    # bf16 logits of magnitude ~8 are quantised in steps of 1/16; the two attention paths round differently.
    assert_same_greedy(out["kernel"].tokens, out["reference"].tokens, prompts, model, tie_tol=0.3,
                       what="kernel vs reference (bf16)")
    with jv.KVCacheManager(dataclasses.replace(cache_cfg, page_bytes=4096 * entries(group))) as m:
        g = models.Generator(model, attn=AttentionSpec(impl="kernel", interpret=True, block_k=32))
        with pytest.raises(GenerationInputError, match="does not divide"):  # 16 tokens per page < block_k
            g.generate(prompts, m, sp(4, stop=None))
        assert m.stats().pages_mapped == 0
