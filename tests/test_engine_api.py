"""The engine's public API as a new user meets it: threads, prompt types, EOS, seeds, stats, messages."""

import pathlib
import threading

import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("flax")
import models  # noqa: E402
from jax_vattention.attention import AttentionSpec  # noqa: E402
from jax_vattention.engine import LLM, EngineConfig, SamplingParams  # noqa: E402
from jax_vattention.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput  # noqa: E402
from jax_vattention.engine.stats import EngineStats  # noqa: E402
from jax_vattention.errors import CacheValueError  # noqa: E402

DATA = pathlib.Path(__file__).resolve().parent / "data"
KW = dict(max_batch=4, max_seq=128, attn=AttentionSpec(impl="reference"), page_bytes=4096)


@pytest.fixture(scope="module")
def llm():
    model = models.random_model(models.get_preset("tiny"), seed=3, dtype=jnp.float32, init_std=0.2)
    with LLM(model, **KW) as engine:
        yield engine


def test_two_threads_calling_generate_never_interleave(llm):
    """Each thread gets exactly what it would get alone (the engine serializes its public calls)."""
    rng = np.random.default_rng(0)
    work = [[rng.integers(0, 500, size=int(n)).tolist() for n in rng.integers(3, 40, size=3)] for _ in range(2)]
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    alone = [[o.outputs[0].token_ids for o in llm.generate(w, params)] for w in work]
    got: dict[int, list] = {}
    errors: list[BaseException] = []

    def run(i):
        try:
            got[i] = [o.outputs[0].token_ids for o in llm.generate(work[i], params)]
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert [got[0], got[1]] == alone
    assert not llm.scheduler.has_unfinished() and llm.manager.stats().live_slots == 0


@pytest.mark.parametrize("prompts,match", [
    ([[1.7, 2.2]], "integer token ids"),
    ([[True, False]], "integer token ids"),
    (["12"], "text prompts? needs? a tokenizer"),
    ([[]], "non-empty"),
    ([[1, 10**6]], "vocab_size"),
])
def test_prompts_are_checked_not_coerced(llm, prompts, match):
    with pytest.raises(ValueError, match=match):
        llm.generate(prompts, SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match=match):
        llm.add_request(prompts[0], SamplingParams(max_tokens=2))
    assert not llm.scheduler.has_unfinished()


def test_seed_none_is_independent_and_a_seed_reproduces(llm):
    p = [[5, 6, 7, 8]] * 4
    free = [o.outputs[0].token_ids for o in llm.generate(p, SamplingParams(max_tokens=8, temperature=1.0,
                                                                            ignore_eos=True))]
    assert len({tuple(t) for t in free}) > 1, "identical prompts with seed=None sampled identically"
    seeded = SamplingParams(max_tokens=8, temperature=1.0, ignore_eos=True, seed=11)
    a = [o.outputs[0].token_ids for o in llm.generate(p, seeded)]
    assert len({tuple(t) for t in a}) == 1 and a == [o.outputs[0].token_ids for o in llm.generate(p, seeded)]


def test_step_with_nothing_queued_returns_nothing(llm):
    assert llm.step() == []


def test_engine_stops_at_the_model_eos_unless_ignore_eos():
    model = models.load_model(DATA / "hf_llama", dtype="float32")
    eos = model.config.eos_token_ids
    assert eos, "the checked-in Llama test checkpoint declares an EOS id"
    with LLM(model, **KW) as llm:
        prompt = [1, 5, 9]
        free = llm.generate([prompt], SamplingParams(max_tokens=24, ignore_eos=True))[0].outputs[0]
        forced = free.token_ids[3]  # make a token the model emits the EOS: patch the config, not the weights
        llm.model.config = llm.model.config.replace(eos_token_ids=(forced,))
        stopped = llm.generate([prompt], SamplingParams(max_tokens=24))[0].outputs[0]
        assert stopped.finish_reason == "stop"
        assert stopped.token_ids == free.token_ids[: free.token_ids.index(forced) + 1]
        assert stopped.stop_reason is None  # the model's EOS (vLLM: stop_reason names only stop strings and ids)
        again = llm.generate([prompt], SamplingParams(max_tokens=24, ignore_eos=True))[0].outputs[0]
        assert again.finish_reason == "length" and again.token_ids == free.token_ids
        by_id = llm.generate([prompt], SamplingParams(max_tokens=24, ignore_eos=True, stop_token_ids=[forced]))
        assert by_id[0].outputs[0].token_ids == stopped.token_ids and by_id[0].outputs[0].stop_reason == forced


def test_summary_counts_stopped_requests_as_complete():
    def out(i, reasons, ttft=None, gaps=()):
        seqs = [CompletionOutput(j, None, [2] * (j + 1), finish_reason=r) for j, r in enumerate(reasons)]
        return RequestOutput(i, None, [1], seqs, True, RequestMetrics(0.0, ttft, ttft, list(gaps), 1.0, i))

    outs = [out(0, ["stop"], 0.1), out(1, ["length"], 0.1, [0.01]), out(2, ["cancelled"]), out(3, ["error"]),
            out(4, ["length", "stop"], 0.2, [0.03]), out(5, ["length", "error"])]
    s = EngineStats().summary(outs, 1.0)
    assert s["completed"] == 3 and s["failed"] == 2 and s["requests"] == 6 and s["preemptions"] == 15
    assert s["output_tokens_per_s"] == 1 + 1 + 1 + 1 + 3 + 3  # every sequence's tokens
    assert s["prompt_tokens"] == 6 and s["total_tokens_per_s"] == 6 + 10  # each prompt once, whatever its n
    assert s["ttft_p50_s"] == 0.1 and s["tbt_p99_s"] <= 0.03


def test_engine_construction_errors_name_the_problem():
    with pytest.raises(TypeError, match="CausalLM"):
        LLM(None)
    with pytest.raises(ValueError, match="EngineConfig.max_batch"):
        EngineConfig(max_batch=0)
    with pytest.raises(ValueError, match="EngineConfig.max_seq"):
        EngineConfig(max_seq=2.5)
    with pytest.raises(ValueError, match="kv_cache"):
        EngineConfig(kv_cache="dense")
    with pytest.raises(ValueError, match="deferred_reclaim"):
        EngineConfig(deferred_reclaim="no")
    for bad in (0, -2, True, 1.5, "half"):
        with pytest.raises(ValueError, match="EngineConfig.layers_per_group"):
            EngineConfig(layers_per_group=bad)
    model = models.random_model(models.get_preset("tiny"), seed=0)
    with pytest.raises(TypeError, match="not both"):
        LLM(model, EngineConfig(), max_batch=2)
    with pytest.raises(CacheValueError, match=r"layers_per_group must be an int in \[1, 2\].*got 3"):
        LLM(model, layers_per_group=3, max_batch=2, max_seq=64, page_bytes=4096)  # the tiny preset has 2 layers
