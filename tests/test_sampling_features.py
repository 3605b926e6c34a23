"""vLLM's sampling features on the device: min_tokens, min_p, the penalties and logprobs.

The per-row processors are checked against per-request plain-jnp references on fresh random inputs, then the
engine against reference loops over a full forward of the model.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_vattention.attention import TOLERANCES
from jax_vattention.logits_processors import (
    PAD_ID,
    apply_min_p,
    apply_penalties,
    ban_tokens,
    filter_logits_reference,
    logprobs_reference,
    min_p_reference,
    penalize_reference,
)
from jax_vattention.sampling import (
    Logprob,
    SampleOutput,
    SamplingMode,
    SamplingParams,
    SamplingRows,
    sample,
    sampling_mode,
    token_logprobs,
)

F32 = TOLERANCES["float32"]
V = 300


# -- SamplingParams and the mode ---------------------------------------------------------------
@pytest.mark.parametrize("kw,match", [
    (dict(min_tokens=-1), "min_tokens"), (dict(min_tokens=1.0), "min_tokens"),
    (dict(max_tokens=4, min_tokens=5), "min_tokens must be <= max_tokens=4, got 5"),
    (dict(min_p=1.5), "min_p must be in \\[0, 1\\], got 1.5"), (dict(min_p=-0.1), "min_p"), (dict(min_p="x"), "min_p"),
    (dict(presence_penalty=2.5), "presence_penalty must be in \\[-2, 2\\], got 2.5"),
    (dict(frequency_penalty=-3), "frequency_penalty.*-3"), (dict(frequency_penalty=float("nan")), "frequency_penalty"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be > 0, got 0.0"),
    (dict(repetition_penalty=-1), "repetition_penalty"), (dict(repetition_penalty=True), "repetition_penalty"),
    (dict(logprobs=21), "logprobs.*21"), (dict(logprobs=-1), "logprobs"), (dict(logprobs=1.5), "logprobs"),
    (dict(logprobs=True), "logprobs"),
])
def test_sampling_params_refuse_bad_feature_values(kw, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kw)


def test_sampling_params_defaults_are_neutral_and_vllm_named():
    p = SamplingParams(max_tokens=8, min_tokens=8, min_p=0, presence_penalty=-2, frequency_penalty=2,
                       repetition_penalty=1.3, logprobs=0)
    assert p.min_tokens == 8 and p.logprobs == 0 and p.has_penalties and isinstance(p.min_p, float)
    assert not SamplingParams().has_penalties and SamplingParams().logprobs is None


def test_sampling_mode_covers_only_what_the_batch_uses():
    plain = [SamplingParams(), SamplingParams(temperature=0.7, seed=1)]
    assert sampling_mode(plain) == SamplingMode("sample")
    assert sampling_mode([SamplingParams(min_p=0.2)]) == SamplingMode("greedy")  # min-p cannot change an argmax
    assert sampling_mode([SamplingParams(temperature=1.0, min_p=0.2)]) == SamplingMode("sample", min_p=True)
    assert sampling_mode([SamplingParams(frequency_penalty=0.5)]) == SamplingMode("greedy", penalties=True)
    many = [SamplingParams(max_tokens=9, min_tokens=3)] * 2
    assert sampling_mode(many, [1, 3]).ban and not sampling_mode(many, [3, 5]).ban  # past min_tokens: no ban
    for asked, k in ((0, 0), (1, 1), (3, 4), (5, 8), (16, 16), (17, 20), (20, 20)):
        assert sampling_mode([SamplingParams(logprobs=asked), SamplingParams()]).logprobs == k
    assert str(SamplingMode("filter", penalties=True, logprobs=4)) == "filter+penalties+logprobs4"
    assert SamplingMode.of("greedy") == SamplingMode() and hash(SamplingMode("sample")) == hash(SamplingMode("sample"))
    with pytest.raises(ValueError, match="logprobs"):
        SamplingMode(logprobs=21)


def primitives(mode, rows) -> set[str]:
    """Every primitive the sampler traces to, nested calls included."""
    closed = jax.make_jaxpr(lambda x, r: sample(x, r, mode))(jnp.zeros((len(rows.seeds), V), jnp.float32), rows)
    found, todo = set(), [closed.jaxpr]
    while todo:
        for e in todo.pop().eqns:
            found.add(str(e.primitive))
            todo += [v.jaxpr if hasattr(v, "jaxpr") else v for v in e.params.values()
                     if hasattr(v, "eqns") or hasattr(getattr(v, "jaxpr", None), "eqns")]
    return found


def test_each_feature_compiles_only_when_the_mode_asks_for_it():
    """A plain greedy batch is one argmax (no sort, no scatter, no draw); every feature adds only its own work."""
    for mode in (SamplingMode(), SamplingMode(penalties=True, ban=True), SamplingMode("filter", min_p=True),
                 SamplingMode(logprobs=4)):
        rows = SamplingRows.padding(3, mode)
        assert jax.tree.structure(SamplingRows.padding(3)).num_leaves == 5  # greedy rows carry no extra inputs
        got = primitives(mode, rows)
        assert "argmax" in got
        assert ("scatter-add" in got) == mode.penalties and ("sort" in got) == (mode.kind == "filter")
        assert ("top_k" in got) == (mode.logprobs is not None)
        assert any("random" in g or "threefry" in g for g in got) == (mode.kind != "greedy")
    assert primitives(SamplingMode(), SamplingRows.padding(3)) == {"argmax"}


# -- the processors against their per-request references -----------------------------------------
def random_batch(rng, rows: int = 7):
    """Rows with every feature mixed (some neutral), and their histories."""
    params, counts, outputs, prompts, stops = [], [], [], [], []
    for b in range(rows):
        greedy = b % 3 == 0
        params.append(SamplingParams(
            max_tokens=64, temperature=0.0 if greedy else float(rng.uniform(0.5, 1.5)),
            top_k=int(rng.choice([0, 5, 40])), top_p=float(rng.choice([1.0, 0.9, 0.6])),
            min_p=float(rng.choice([0.0, 0.05, 0.3])), seed=int(rng.integers(0, 2**31)),
            presence_penalty=float(rng.choice([0.0, rng.uniform(-2, 2)])),
            frequency_penalty=float(rng.choice([0.0, rng.uniform(-2, 2)])),
            repetition_penalty=float(rng.choice([1.0, rng.uniform(0.5, 2.0)])),
            min_tokens=int(rng.choice([0, 10])), logprobs=int(rng.integers(0, 6))))
        if b == 1:  # every feature on at least one row
            params[-1] = dataclasses.replace(params[-1], min_p=0.1, repetition_penalty=1.3, min_tokens=30, logprobs=5,
                                             top_k=40, top_p=0.9)
        counts.append(int(rng.integers(0, 20)))
        outputs.append(rng.integers(0, V, counts[-1]).tolist())  # repeats: counts > 1
        prompts.append(rng.integers(0, V, int(rng.integers(1, 40))).tolist())
        stops.append(rng.choice(V, int(rng.integers(0, 4)), replace=False).tolist())
    logits = jnp.asarray(rng.normal(size=(rows, V)) * 3, jnp.float32)
    return logits, params, counts, outputs, prompts, stops


def reference_token(x, p: SamplingParams, count: int, output, prompt, stop) -> tuple[int, jax.Array]:
    """One request's next token from its raw logits ``[V]`` by the references, and its penalized logits."""
    banned = stop if count < p.min_tokens else ()
    x = penalize_reference(x, output, prompt, banned, presence=p.presence_penalty,
                           frequency=p.frequency_penalty, repetition=p.repetition_penalty)
    if p.greedy:
        return int(jnp.argmax(x)), x
    scaled = min_p_reference(x / p.temperature, p.min_p)
    filtered = filter_logits_reference(scaled[None], 1.0, p.top_k, p.top_p)[0]
    key = jax.random.fold_in(jax.random.PRNGKey(p.seed), count)
    return int(jax.random.categorical(key, filtered)), x


def test_processors_match_the_per_request_references(rng):
    logits, params, counts, outputs, prompts, stops = random_batch(rng, rows=10)  # every feature: one compile
    rows = SamplingRows.of(params, counts, outputs=outputs, prompts=prompts, stop_ids=stops)
    mode = sampling_mode(params, counts)
    assert mode == SamplingMode("filter", min_p=True, penalties=True, ban=True, logprobs=8)
    penalized = jax.jit(lambda x, r: apply_penalties(ban_tokens(x, r.banned_ids), r.output_ids, r.prompt_ids,
                                                     r.presence_penalty, r.frequency_penalty,
                                                     r.repetition_penalty))(logits, rows)
    got = jax.jit(sample, static_argnums=2)(logits, rows, mode)
    for b, p in enumerate(params):
        want, x = reference_token(logits[b], p, counts[b], outputs[b], prompts[b], stops[b])
        assert int(got.tokens[b]) == want, (b, p)
        np.testing.assert_array_equal(np.isinf(penalized[b]), np.isinf(x))
        np.testing.assert_allclose(np.asarray(penalized[b]), np.asarray(x), **F32)
        lp, rank, top, top_lp = logprobs_reference(logits[b], want, 8)
        assert int(got.rank[b]) == rank and got.top_ids[b].tolist() == top, b
        np.testing.assert_allclose([float(got.logprob[b]), *np.asarray(got.top_logprobs[b])], [lp, *top_lp], **F32)
    scaled = logits / 0.7
    cut = apply_min_p(scaled, rows.min_p)
    for b, p in enumerate(params):
        np.testing.assert_array_equal(np.isinf(cut[b]), np.isinf(min_p_reference(scaled[b], p.min_p)))


def test_neutral_rows_sample_the_same_whatever_the_rest_of_the_batch_asks(rng):
    """A request without the features draws the same token in a plain batch and in one where others use them all."""
    logits, params, counts, outputs, prompts, stops = random_batch(rng, rows=8)
    neutral = [SamplingParams(temperature=float(rng.uniform(0.5, 1.5)), seed=int(rng.integers(0, 2**31)))
               for _ in range(4)]
    jitted = jax.jit(sample, static_argnums=2)
    alone = jitted(logits[:4], SamplingRows.of(neutral, counts[:4]), SamplingMode("sample")).tokens
    mixed = neutral + params[4:]
    rows = SamplingRows.of(mixed, counts, outputs=outputs, prompts=prompts, stop_ids=stops)
    together = jitted(logits, rows, sampling_mode(mixed, counts)).tokens
    np.testing.assert_array_equal(np.asarray(together[:4]), np.asarray(alone))


def test_sampling_rows_pad_histories_and_ban_only_under_min_tokens():
    ps = [SamplingParams(max_tokens=9, min_tokens=3, repetition_penalty=1.2, seed=0),
          SamplingParams(max_tokens=9, min_tokens=3, presence_penalty=1.0, seed=0), SamplingParams(seed=0)]
    rows = SamplingRows.of(ps, [2, 5, 0], 4, index=[0, 2, 3], outputs=[[7, 7], [1] * 20, [9]],
                           prompts=[[4, 4, 5], [6], [8]], stop_ids=[[1, 2], [3], [4]])
    assert rows.output_ids.shape == (4, 32) and rows.prompt_ids.shape == (4, 16) and rows.banned_ids.shape == (4, 16)
    assert rows.output_ids[0, :3].tolist() == [7, 7, PAD_ID] and rows.output_ids[2, 19] == 1
    assert (rows.output_ids[3] == PAD_ID).all()  # no penalty: no history sent
    assert rows.prompt_ids[0, :3].tolist() == [4, 4, 5] and (rows.prompt_ids[2] == PAD_ID).all()  # no repetition
    assert rows.banned_ids[0, :2].tolist() == [1, 2] and (rows.banned_ids[2] == PAD_ID).all()  # 5 >= min_tokens
    with pytest.raises(ValueError, match="outputs and prompts"):
        SamplingRows.of(ps, [0, 0, 0], stop_ids=[[], [], []])
    with pytest.raises(ValueError, match="stop ids"):
        SamplingRows.of(ps[:1], [0], outputs=[[]], prompts=[[]])


def test_token_logprobs_lists_the_sampled_token_then_the_top_n():
    out = SampleOutput(np.array([5, 2]), np.array([-3.0, -0.5], np.float32), np.array([4, 1]),
                       np.array([[1, 0, 3, 5], [2, 1, 0, 3]]), np.array([[-1.0, -2.0, -2.5, -3.0]] * 2, np.float32))
    d = token_logprobs(out, 0, 2, decode=lambda t: f"<{t}>")
    assert list(d) == [5, 1, 0] and d[5] == Logprob(-3.0, 4, "<5>") and d[0] == Logprob(-2.0, 2, "<0>")
    assert token_logprobs(out, 1, 2) == {2: Logprob(-1.0, 1, None), 1: Logprob(-2.0, 2, None)}  # sampled = top 1
    assert list(token_logprobs(out, 0, 0)) == [5]
    with pytest.raises(ValueError, match="computed no logprobs"):
        token_logprobs(SampleOutput(np.array([1])), 0, 1)


# -- the engine --------------------------------------------------------------------------------
pytest.importorskip("flax")
import models  # noqa: E402
from jax_vattention.attention import AttentionSpec  # noqa: E402
from jax_vattention.engine import LLM  # noqa: E402
from jax_vattention.engine.request import Request  # noqa: E402

REF = AttentionSpec(impl="reference")
MAX_SEQ = 64
FIXED_PROMPT = [257, 310, 497, 373, 323, 278, 286, 478, 142, 417, 343, 1]  # greedy picks 343: in the prompt


@pytest.fixture(scope="module")
def model():
    return models.random_model(models.get_preset("tiny"), seed=3, dtype=jnp.float32, init_std=0.2)


@pytest.fixture(scope="module")
def llm(model):
    # few step shapes (decodes always 4 rows, prefills 16 tokens), so the tests share their compiles
    with LLM(model, max_batch=4, max_seq=MAX_SEQ, attn=REF, page_bytes=4096, min_decode_bucket=4,
             min_prefill_bucket=16) as engine:
        yield engine


def run(llm, prompts, params) -> list[Request]:
    params = params if isinstance(params, list) else [params] * len(prompts)
    reqs = [llm.add_request(p, sp) for p, sp in zip(prompts, params)]
    while llm.scheduler.has_unfinished():
        llm.step()
    return reqs


@jax.jit
def _forward(graphdef, state, tokens):
    from flax import nnx

    logits, _ = nnx.merge(graphdef, state)(tokens[None], jnp.arange(tokens.shape[0])[None], None, attn=REF)
    return logits[0].astype(jnp.float32)  # [T, V]


def forward_logits(model, seq) -> jax.Array:
    """fp32 logits of a full causal forward (no cache) at every position of ``seq``: ``[T, V]`` (one compile: the
    tokens are padded to ``MAX_SEQ``, which causal attention keeps from the positions before)."""
    from flax import nnx

    padded = np.zeros(MAX_SEQ, np.int32)
    padded[:len(seq)] = seq
    return _forward(*nnx.split(model), jnp.asarray(padded))[:len(seq)]


def forward_logprobs(model, seq) -> np.ndarray:
    """log_softmax of ``forward_logits``: ``[T, V]``."""
    return np.asarray(jax.nn.log_softmax(forward_logits(model, seq), axis=-1))


def reference_greedy(model, prompt, p: SamplingParams, stop=()) -> list[int]:
    """Greedy decoding with the references, stopping early where the top two are closer than the engine's error."""
    out: list[int] = []
    while len(out) < p.max_tokens:
        x = forward_logits(model, prompt + out)[-1]  # [V]
        x = penalize_reference(x, out, prompt, stop if len(out) < p.min_tokens else (),
                               presence=p.presence_penalty, frequency=p.frequency_penalty,
                               repetition=p.repetition_penalty)
        top2 = np.sort(np.asarray(x))[-2:]
        if top2[1] - top2[0] < 1e-3:
            break  # ambiguous: the engine's fp32 logits may pick either
        out.append(int(jnp.argmax(x)))
        if out[-1] in stop:
            break
    return out


def test_penalties_on_the_engine_match_a_reference_loop(llm, model, rng):
    """Greedy with the three penalties: the engine's tokens are the reference loop's, and they differ without."""
    prompts = [FIXED_PROMPT] + [rng.integers(0, 512, int(rng.integers(3, 12))).tolist() for _ in range(2)]
    pen = SamplingParams(max_tokens=10, ignore_eos=True, repetition_penalty=1.8, presence_penalty=0.7,
                         frequency_penalty=0.4)
    plain = run(llm, prompts[:1], SamplingParams(max_tokens=10, ignore_eos=True))[0]
    got = run(llm, prompts, pen)
    assert got[0].output != plain.output
    for r, prompt in zip(got, prompts):
        want = reference_greedy(model, prompt, pen)
        assert r.output[:len(want)] == want and len(want) >= 3
    # the penalties used the history of each request only: the same prompt alone gives the same tokens
    assert run(llm, prompts[1:2], pen)[0].output == got[1].output


def test_min_tokens_bans_the_stop_ids_until_reached(llm, model):
    first = run(llm, [FIXED_PROMPT], SamplingParams(max_tokens=6, ignore_eos=True))[0].output[0]
    stop = SamplingParams(max_tokens=12, stop_token_ids=[first])
    early = run(llm, [FIXED_PROMPT], stop)[0]
    assert early.output == [first] and early.finish_reason == "stop"
    held = SamplingParams(max_tokens=12, stop_token_ids=[first], min_tokens=4)
    (r,) = run(llm, [FIXED_PROMPT], held)
    assert first not in r.output[:4] and len(r.output) >= 5
    want = reference_greedy(model, FIXED_PROMPT, held, stop=(first,))
    assert r.output[:len(want)] == want and len(want) >= 4
    # the model's EOS is banned the same way (ignore_eos=False): LLM.add_request puts it in the stop ids
    eos = Request(10**6, list(FIXED_PROMPT), SamplingParams(max_tokens=12, min_tokens=4), stop_ids=(first,))
    llm.scheduler.add(eos)
    while llm.scheduler.has_unfinished():
        llm.step()
    assert eos.output == r.output and eos.finish_reason == r.finish_reason


def test_stop_strings_wait_for_min_tokens():
    pytest.importorskip("tokenizers")
    from jax_vattention.text import Detokenizer

    tok = models.byte_level_tokenizer(258)
    ids = [ord(c) for c in "xbybzb"]
    for min_tokens, n in ((0, 2), (2, 4), (3, 4), (4, 6)):
        params = SamplingParams(max_tokens=10, min_tokens=min_tokens, stop=["b"])
        r = Request(0, [65], params, detokenizer=Detokenizer(tok, [65], params.stop))
        for t in ids:
            r.append_token(t, 0.0)
            if r.finished:
                break
        assert len(r.output) == n and r.finish_reason == "stop", min_tokens  # stops once len(output) > min_tokens
        assert r.text == "xbybzb"[:n - 1] and r.detokenizer.stopped_by == "b"


def test_logprobs_on_the_engine_match_a_reference_forward(llm, model, rng):
    prompts = [rng.integers(0, 512, int(rng.integers(3, 12))).tolist() for _ in range(2)]
    params = [SamplingParams(max_tokens=6, temperature=0.9, seed=int(rng.integers(0, 2**31)), ignore_eos=True,
                             logprobs=5),
              SamplingParams(max_tokens=4, ignore_eos=True, logprobs=0)]
    for r, prompt in zip(run(llm, prompts, params), prompts):
        n = r.params.logprobs
        assert len(r.logprobs) == len(r.output) == r.params.max_tokens
        ref = forward_logprobs(model, prompt + r.output)[len(prompt) - 1:]  # [T, V]: row i predicts output[i]
        for t, entry, lp in zip(r.output, r.logprobs, ref):
            assert list(entry)[0] == t and len(entry) in (n, n + 1) and entry[t].decoded_token is None
            np.testing.assert_allclose(entry[t].logprob, lp[t], **F32)
            band = F32["atol"] + F32["rtol"] * abs(lp[t])
            assert np.sum(lp > lp[t] + band) + 1 <= entry[t].rank <= np.sum(lp >= lp[t] - band)
            items = list(entry.items())  # the sampled token, then the top n (where it is not one of them)
            top = sorted(items[1:] if len(items) == n + 1 else items, key=lambda kv: kv[1].rank)
            assert [e.rank for _, e in top] == list(range(1, n + 1))
            np.testing.assert_allclose([e.logprob for _, e in top], np.sort(lp)[::-1][:n], **F32)
            np.testing.assert_allclose([e.logprob for _, e in top], [lp[tid] for tid, _ in top], **F32)
    assert run(llm, prompts[:1], SamplingParams(max_tokens=2))[0].logprobs is None


def test_a_seed_samples_the_same_in_any_batch(llm, rng, monkeypatch):
    """A seeded request gets the same tokens (and logprobs) alone and beside requests using every feature; a warmup
    with the batch's mode compiles the decode step the run then uses."""
    prompt = rng.integers(0, 512, 7).tolist()
    x = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.95, seed=int(rng.integers(0, 2**31)),
                       ignore_eos=True, logprobs=2)
    alone = run(llm, [prompt], x)[0]
    others = [SamplingParams(max_tokens=8, temperature=0.8, min_p=0.1, repetition_penalty=1.5, seed=1),
              SamplingParams(max_tokens=8, min_tokens=8, stop_token_ids=[alone.output[0]], frequency_penalty=1.0,
                             logprobs=7)]
    every = SamplingMode("filter", min_p=True, penalties=True, ban=True, logprobs=8)
    monkeypatch.setattr(llm.runner, "step_shapes", lambda: [((0, 4, 1),)])  # warm up the decode step only
    llm.warmup((every,))
    warmed = set(llm.runner._shapes)
    assert any(key[:2] == (((0, 4, 1),), every) for key in warmed)
    batch = run(llm, [[5, 6, 7, 8, 9, 10, 11, 12, 13], prompt, [1, 2]], [others[0], x, others[1]])
    assert not any(key[0] == ((0, 4, 1),) for key in set(llm.runner._shapes) - warmed)  # its decodes were warm
    assert batch[1].output == alone.output
    for a, b in zip(alone.logprobs, batch[1].logprobs):
        assert list(a) == list(b)
        np.testing.assert_allclose([e.logprob for e in a.values()], [e.logprob for e in b.values()], **F32)
    assert alone.output[0] not in batch[2].output and len(batch[2].output) == 8  # banned for all its 8 tokens


def test_generator_refuses_what_needs_the_host_between_tokens(model):
    from jax_vattention.cache import StaticKVCache
    from models import GenerationInputError, Generator

    cfg = model.config
    cache = StaticKVCache.create(cfg.num_layers, 2, 32, cfg.num_kv_heads, cfg.head_dim, jnp.float32)
    for kw in (dict(min_tokens=1), dict(repetition_penalty=1.1), dict(presence_penalty=0.1), dict(logprobs=0)):
        with pytest.raises(GenerationInputError, match=f"{next(iter(kw))}=.*use the serving engine"):
            Generator(model).generate([[1, 2]], cache, SamplingParams(max_tokens=4, **kw))
