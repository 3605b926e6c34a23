"""AsyncLLM: one engine loop, callers streaming from event loops; early exit aborts and frees the slot."""

import asyncio
import contextlib
import threading

import jax.numpy as jnp
import pytest

pytest.importorskip("flax")
pytest.importorskip("tokenizers")
import models  # noqa: E402
from jax_vattention.attention import AttentionSpec  # noqa: E402
from jax_vattention.engine import LLM, SamplingParams  # noqa: E402
from jax_vattention.engine.async_llm import AsyncLLM  # noqa: E402
from jax_vattention.errors import CacheClosedError  # noqa: E402

CFG = models.get_preset("tiny").replace(vocab_size=258)  # every id is a byte or a special token: real text
TOK = models.byte_level_tokenizer(258)
KW = dict(max_batch=2, max_seq=128, page_bytes=4096, attn=AttentionSpec(impl="reference"))
PROMPTS = ["Hello, engine", "naïve ✓ streaming", [5, 6, 7, 8]]


@pytest.fixture(scope="module")
def model():
    return models.random_model(CFG, seed=5, dtype=jnp.float32, init_std=0.5)


async def collect(engine, prompt, params):
    deltas = [d async for d in engine.generate(prompt, params)]
    assert deltas[-1].finished and all(not d.finished for d in deltas[:-1])
    return deltas


def test_concurrent_streams_equal_offline_generation(model):
    params = [SamplingParams(max_tokens=10 + 3 * i, temperature=0.9, seed=11 + i, ignore_eos=True)
              for i in range(len(PROMPTS))]
    with LLM(model, tokenizer=TOK, **KW) as llm:
        want = llm.generate(PROMPTS, params)
        with AsyncLLM(llm) as engine:

            async def main():  # three streams on two slots: one waits for a free slot
                return await asyncio.gather(*(collect(engine, p, sp) for p, sp in zip(PROMPTS, params)))

            got = asyncio.run(main())
            assert engine.num_streams == 0
        assert llm.manager.stats().live_slots == 0
    for deltas, w in zip(got, want):
        out, w = deltas[-1].output.outputs[0], w.outputs[0]
        assert out.token_ids == w.token_ids and [t for d in deltas for t in d.token_ids] == w.token_ids
        assert "".join(d.text for d in deltas) == out.text == w.text  # streamed text adds up to the final text
        assert deltas[-1].finish_reason == "length"


def test_leaving_a_stream_early_aborts_and_frees_the_slot(model):
    with LLM(model, tokenizer=TOK, **{**KW, "max_batch": 1}) as llm, AsyncLLM(llm) as engine:

        long = SamplingParams(max_tokens=100, ignore_eos=True)

        def idle():
            return llm.manager.stats().live_slots == 0 and not llm.scheduler.has_unfinished()

        async def main():
            seen = 0
            async with contextlib.aclosing(engine.generate("abandon me", long)) as stream:
                async for d in stream:
                    seen += len(d.token_ids)
                    if seen >= 2:
                        break  # closing the stream aborts the request
            assert idle()

            async def consume():
                async for _ in engine.generate("cancel me", long):
                    pass

            task = asyncio.create_task(consume())
            while not llm.scheduler.running:  # until it holds the slot
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert idle()
            # the only slot serves the next request
            return await collect(engine, [1, 2, 3], SamplingParams(max_tokens=4, ignore_eos=True))

        deltas = asyncio.run(main())
        assert len(deltas[-1].output.outputs[0].token_ids) == 4 and deltas[-1].output.prompt is None


def test_requests_from_another_thread_and_after_close(model):
    with LLM(model, tokenizer=TOK, **KW) as llm:
        engine = AsyncLLM(llm)
        results = {}

        def caller(name, prompt):
            results[name] = asyncio.run(collect(engine, prompt, SamplingParams(max_tokens=5, ignore_eos=True)))

        threads = [threading.Thread(target=caller, args=(i, p)) for i, p in enumerate(PROMPTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert sorted(results) == [0, 1, 2]
        assert all(len(d[-1].output.outputs[0].token_ids) == 5 for d in results.values())
        assert [results[i][-1].output.prompt for i in range(3)] == [*PROMPTS[:2], None]  # the text, if given
        with pytest.raises(ValueError, match="tokenizer|vocab_size|non-empty"):  # bad input: before any stream
            asyncio.run(collect(engine, [], SamplingParams(max_tokens=2)))
        engine.close()
        engine.close()  # idempotent
        with pytest.raises(CacheClosedError, match="stopped"):
            asyncio.run(collect(engine, [1], SamplingParams(max_tokens=2)))
        assert llm.manager.stats().live_slots == 0
