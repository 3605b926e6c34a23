"""A load test of the OpenAI-compatible server: 500 concurrent streaming requests on 127.0.0.1.

Bounded in count (500 streams of 2-4 tokens on the tiny preset) and in time (``asyncio.wait_for`` over the whole
load, and a deadline on each step of starting and stopping the server). Nothing is lost (every stream ends with
its finish reason and exactly the text the offline API gives for its prompt, and the server counts every token),
the server stays healthy afterwards, and once it is stopped the cache has nothing mapped.
"""

import asyncio
import re
import time
import urllib.request

import jax.numpy as jnp
import pytest

pytest.importorskip("flax")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")
from live_server import live_server  # noqa: E402

import models  # noqa: E402
from jax_vattention.attention import AttentionSpec  # noqa: E402
from jax_vattention.engine import LLM, AsyncLLM, SamplingParams  # noqa: E402
from jax_vattention.server import build_app  # noqa: E402

CFG = models.get_preset("tiny").replace(vocab_size=258)  # every id is a byte or a special token: real text
TOK = models.byte_level_tokenizer(258)
NAME = "tiny-bytes"
STREAMS = 500
PROMPTS = [f"load {i}: " + "abcdefgh"[: i % 8] for i in range(10)]  # streams share these, so each has a known text
LOAD_TIMEOUT_S = 120  # the whole load; about 10 s on 2 busy CPU cores


def max_tokens(i: int) -> int:
    return 2 + i % 3


def get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=60) as r:
        return r.status, r.read().decode()


def metric(text: str, name: str) -> float:
    """One sample of a Prometheus text exposition (``name`` may carry its labels)."""
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.MULTILINE)
    return float(m.group(1)) if m else 0.0  # a labelled counter has no sample before its first increment


def test_500_concurrent_streams_nothing_lost_and_nothing_left_mapped():
    model = models.random_model(CFG, seed=7, dtype=jnp.float32, init_std=0.5)
    llm = LLM(model, tokenizer=TOK, max_batch=16, max_seq=64, page_bytes=4096, attn=AttentionSpec(impl="reference"),
              min_decode_bucket=16, min_prefill_bucket=16, chunk_size=16)  # 7 step shapes: compiling is slow
    manager = llm.manager
    # The same load offline first: each stream's expected text, and most step shapes compiled before the clock
    # starts (compiling is most of the time on a CPU: the load itself takes about 10 s on 2 busy cores).
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(STREAMS)]
    params = [SamplingParams(max_tokens=max_tokens(i), temperature=0.0, ignore_eos=True) for i in range(STREAMS)]
    want = {(p, sp.max_tokens): o.outputs[0].text for p, sp, o in zip(prompts, params, llm.generate(prompts, params))}
    assert len(want) == 30 and sum(map(len, want.values())) > 30  # real text to compare the streams with
    engine = AsyncLLM(llm)
    try:
        with live_server(build_app(engine, NAME), backlog=2048) as port:
            base = f"http://127.0.0.1:{port}"
            _, before = get(base + "/metrics")

            async def load():
                # One client; openai's default pool allows 1000 connections, more than the 500 streams need.
                client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="unused", max_retries=0,
                                            timeout=LOAD_TIMEOUT_S)

                async def one(i: int):
                    prompt = PROMPTS[i % len(PROMPTS)]
                    stream = await client.completions.create(model=NAME, prompt=prompt, max_tokens=max_tokens(i),
                                                             temperature=0.0, stream=True,
                                                             extra_body={"ignore_eos": True})
                    chunks = [c async for c in stream]
                    reasons = [c.choices[0].finish_reason for c in chunks]
                    return i, "".join(c.choices[0].text for c in chunks), reasons

                try:
                    return await asyncio.gather(*(one(i) for i in range(STREAMS)))
                finally:
                    await client.close()

            start = time.perf_counter()
            results = asyncio.run(asyncio.wait_for(load(), LOAD_TIMEOUT_S))
            elapsed = time.perf_counter() - start
            print(f"\n{STREAMS} concurrent streams finished in {elapsed:.2f} s")

            assert sorted(i for i, _, _ in results) == list(range(STREAMS))
            for i, text, reasons in results:
                assert reasons[-1] == "length" and all(r is None for r in reasons[:-1]), (i, reasons)
                assert text == want[PROMPTS[i % len(PROMPTS)], max_tokens(i)], i  # every token arrived, in order
            assert not llm.scheduler.has_unfinished() and manager.stats().live_slots == 0 and engine.num_streams == 0

            _, after = get(base + "/metrics")
            tokens = "vattn_generation_tokens_total"
            assert metric(after, tokens) - metric(before, tokens) == sum(max_tokens(i) for i in range(STREAMS))
            length = 'vattn_requests_finished_total{reason="length"}'
            assert metric(after, length) - metric(before, length) == STREAMS
            for idle in ("vattn_requests_running", "vattn_requests_waiting", "vattn_kv_mapped_bytes"):
                assert re.search(rf"^{idle} 0\.0$", after, re.MULTILINE), idle
            assert get(base + "/health") == (200, '{"status":"ok"}')
            sync = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=60)
            r = sync.completions.create(model=NAME, prompt=PROMPTS[3], max_tokens=4, temperature=0.0,
                                        extra_body={"ignore_eos": True})
            assert r.choices[0].text == want[PROMPTS[3], 4] and r.usage.completion_tokens == 4
            sync.close()
    finally:
        engine.close()
        llm.close()
    stats = manager.stats()
    assert stats.reserved_bytes == 0 and stats.mapped_bytes == 0 and stats.pages_mapped == 0  # nothing mapped
