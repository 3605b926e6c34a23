"""The OpenAI-compatible server on 127.0.0.1, driven by the official ``openai`` client (started and stopped here)."""

import asyncio
import json
import socket
import time
import urllib.error
import urllib.request

import jax.numpy as jnp
import pytest

pytest.importorskip("flax")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")
pytest.importorskip("jinja2")
from live_server import live_server  # noqa: E402

import models  # noqa: E402
from jax_vattention.attention import AttentionSpec  # noqa: E402
from jax_vattention.engine import LLM, AsyncLLM, SamplingParams  # noqa: E402
from jax_vattention.server import build_app  # noqa: E402

CFG = models.get_preset("tiny").replace(vocab_size=258)  # every id is a byte or a special token: real text
TOK = models.byte_level_tokenizer(258)
NAME = "tiny-bytes"


MSGS = [{"role": "user", "content": "Say something ✓"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    model = models.random_model(CFG, seed=7, dtype=jnp.float32, init_std=0.5)
    llm = LLM(model, tokenizer=TOK, chat_template=models.chat_template_for(CFG), max_batch=4, max_seq=128,
              page_bytes=4096, attn=AttentionSpec(impl="reference"))
    engine = AsyncLLM(llm)
    with live_server(build_app(engine, NAME)) as port:
        base = f"http://127.0.0.1:{port}"
        yield base, openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120), llm
    engine.close()
    manager = llm.manager
    llm.close()
    assert manager.stats().reserved_bytes == 0 and manager.stats().pages_mapped == 0  # nothing left mapped


def http(url, body: bytes | None = None, *, raw: bool = False):
    """``(status, parsed JSON or text)`` of a GET (no body) or a JSON POST, 4xx included."""
    req = urllib.request.Request(url, data=body, headers={"content-type": "application/json"} if body else {})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            status, text = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    return status, (text if raw else json.loads(text))


def offline(llm, prompt, **kw):
    """The offline API's completions of ``prompt`` (``n`` of them) for the same sampling settings."""
    return llm.generate([prompt], SamplingParams(**kw))[0].outputs


def test_models_health_and_completions_equal_the_offline_api(server):
    base, client, llm = server
    assert [m.id for m in client.models.list().data] == [NAME]
    assert http(base + "/health") == (200, {"status": "ok"})
    r = client.completions.create(model=NAME, prompt="Hello, server", max_tokens=8, temperature=0.7, seed=3,
                                  extra_body={"ignore_eos": True})
    (want,) = offline(llm, "Hello, server", max_tokens=8, temperature=0.7, seed=3, ignore_eos=True)
    assert r.choices[0].text == want.text and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 8 and r.usage.prompt_tokens == len(TOK.encode("Hello, server").ids)
    n = client.completions.create(model=NAME, prompt="n>1", max_tokens=5, n=3, seed=10, temperature=1.0,
                                  extra_body={"ignore_eos": True})
    assert [c.index for c in n.choices] == [0, 1, 2]
    assert [c.text for c in n.choices] == [c.text for c in offline(llm, "n>1", n=3, max_tokens=5, seed=10,
                                                                   temperature=1.0, ignore_eos=True)]
    assert [c.text for c in n.choices] == [offline(llm, "n>1", max_tokens=5, seed=10 + i, temperature=1.0,
                                                   ignore_eos=True)[0].text for i in range(3)]  # seeds seed + i


def test_streaming_chat_and_stop_strings(server):
    _, client, llm = server
    msgs = MSGS
    full = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=12, temperature=0.0,
                                          extra_body={"ignore_eos": True})
    text = full.choices[0].message.content
    stream = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=12, temperature=0.0, stream=True,
                                            extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == "length"
    if len(text) >= 3:
        stop = text[1:3]
        cut = client.completions.create(model=NAME, prompt=llm.chat_template.render(msgs), max_tokens=12,
                                        temperature=0.0, stop=[stop], extra_body={"ignore_eos": True})
        assert cut.choices[0].text == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"


# The logprobs tests share one sampling mode (a new SamplingMode compiles the step again: seconds on a CPU): a draw
# with 3 logprobs, min_p, the three penalties and min_tokens, on prompts of 33..64 tokens (the chat's is 36).
OPENAI_FIELDS = {"max_tokens": 6, "temperature": 0.9, "presence_penalty": 0.5, "frequency_penalty": 0.4}
VLLM_FIELDS = {"ignore_eos": True, "min_p": 0.05, "repetition_penalty": 1.2, "min_tokens": 2}
PROMPT = "Logprobs, penalties and min_tokens, through the server"


def sampled(outs) -> tuple[list[str], list[float]]:
    """The offline output's tokens as text and their logprobs (what the legacy format lists)."""
    (o,) = outs
    return [e[t].decoded_token for e, t in zip(o.logprobs, o.token_ids)], [e[t].logprob for e, t in
                                                                           zip(o.logprobs, o.token_ids)]


def test_completion_logprobs_equal_the_offline_api_streamed_or_not(server):
    """The legacy format: per token its text, logprob, {text: logprob} of it and the top 3, and text offsets."""
    _, client, llm = server
    r = client.completions.create(model=NAME, prompt=PROMPT, logprobs=3, seed=5, extra_body=VLLM_FIELDS,
                                  **OPENAI_FIELDS)
    (want,) = outs = offline(llm, PROMPT, logprobs=3, seed=5, **VLLM_FIELDS, **OPENAI_FIELDS)
    lp, (tokens, logprobs) = r.choices[0].logprobs, sampled(outs)
    assert r.choices[0].text == want.text and lp.tokens == tokens and len(tokens) == 6
    assert lp.token_logprobs == pytest.approx(logprobs, abs=1e-5)
    assert sum(lp.token_logprobs) == pytest.approx(want.cumulative_logprob, abs=1e-4)
    for top, entry in zip(lp.top_logprobs, want.logprobs):  # the sampled token plus the top 3
        assert top == pytest.approx({v.decoded_token: v.logprob for v in entry.values()}, abs=1e-5)
        assert 3 <= len(entry) <= 4  # (byte tokens that are no whole character all read "\ufffd": one key)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    chunks = list(client.completions.create(model=NAME, prompt=PROMPT, logprobs=3, seed=5, stream=True,
                                            extra_body=VLLM_FIELDS, **OPENAI_FIELDS))
    streamed = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs is not None]
    for field in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):  # the chunks add up to the whole
        assert [x for part in streamed for x in getattr(part, field)] == getattr(lp, field)
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text
    assert client.completions.create(model=NAME, prompt="Hello", max_tokens=2).choices[0].logprobs is None


def test_chat_logprobs_and_top_logprobs_equal_the_offline_chat(server):
    _, client, llm = server
    r = client.chat.completions.create(model=NAME, messages=MSGS, logprobs=True, top_logprobs=3, seed=11,
                                       extra_body=VLLM_FIELDS, **OPENAI_FIELDS)
    (want,) = llm.chat(MSGS, SamplingParams(logprobs=3, seed=11, **VLLM_FIELDS, **OPENAI_FIELDS))[0].outputs
    content = r.choices[0].logprobs.content
    assert r.choices[0].message.content == want.text and len(content) == len(want.token_ids) == 6
    for item, t, entry in zip(content, want.token_ids, want.logprobs):
        assert item.token == entry[t].decoded_token and item.logprob == pytest.approx(entry[t].logprob, abs=1e-5)
        assert item.bytes == list(item.token.encode("utf-8", errors="replace"))
        best = sorted(entry.values(), key=lambda v: v.rank)[:3]  # the 3 most likely, by rank
        assert [x.token for x in item.top_logprobs] == [v.decoded_token for v in best]
        assert [x.logprob for x in item.top_logprobs] == pytest.approx([v.logprob for v in best], abs=1e-5)
    chunks = list(client.chat.completions.create(model=NAME, messages=MSGS, logprobs=True, top_logprobs=3, seed=11,
                                                 stream=True, extra_body=VLLM_FIELDS, **OPENAI_FIELDS))
    streamed = [x for c in chunks if c.choices[0].logprobs for x in c.choices[0].logprobs.content]
    assert [x.model_dump() for x in streamed] == [x.model_dump() for x in content]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text


def test_min_tokens_and_stop_token_ids_give_the_offline_tokens(server):
    """A stop id is banned for min_tokens tokens, then ends the request; the server samples what the offline API
    does (tokens and logprobs)."""
    _, client, llm = server
    kw = dict(logprobs=3, seed=2, **OPENAI_FIELDS)
    free = offline(llm, PROMPT, **VLLM_FIELDS, **kw)[0].token_ids  # no stop id
    j = next(i for i in range(2, len(free)) if free[i] not in free[:i])
    wants = []
    for stop in (free[0], free[j]):
        r = client.completions.create(model=NAME, prompt=PROMPT, extra_body={**VLLM_FIELDS, "stop_token_ids": [stop]},
                                      **kw)
        outs = offline(llm, PROMPT, stop_token_ids=[stop], **VLLM_FIELDS, **kw)
        (c,), (want,) = r.choices, outs
        assert (c.logprobs.tokens, c.text, c.finish_reason) == (sampled(outs)[0], want.text, want.finish_reason)
        assert c.logprobs.token_logprobs == pytest.approx(sampled(outs)[1], abs=1e-5)
        assert r.usage.completion_tokens == len(want.token_ids)
        wants.append(want)
    banned, stopped = wants
    assert len(banned.token_ids) >= 2 and free[0] not in banned.token_ids[:2]  # not sampled before min_tokens=2
    assert stopped.token_ids == free[:j + 1] and stopped.stop_reason == free[j] and c.finish_reason == "stop"


@pytest.mark.parametrize("body,status,match", [
    ({"model": "other", "prompt": "x"}, 404, "does not exist"),
    ({"model": NAME, "prompt": "x", "max_tokens": 10_000}, 400, "exceeds the context"),
    ({"model": NAME, "prompt": "x" * 200}, 400, "more than max_seq"),
    ({"model": NAME, "prompt": "x", "n": 99}, 400, "n=99"),
    ({"model": NAME, "prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"model": NAME, "prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"model": NAME, "prompt": [1, 999]}, 400, "outside"),
    ({"model": NAME, "prompt": ""}, 400, "empty"),
    ({"model": NAME}, 400, "prompt"),
    # Out-of-range sampling values: SamplingParams' check, named by the request's field.
    ({"model": NAME, "prompt": "x", "logprobs": 21}, 400, "logprobs must be an int in [0, 20]"),
    ({"model": NAME, "prompt": "x", "presence_penalty": 3}, 400, "presence_penalty must be in [-2, 2]"),
    ({"model": NAME, "prompt": "x", "repetition_penalty": 0}, 400, "repetition_penalty must be > 0"),
    ({"model": NAME, "prompt": "x", "min_p": 1.5}, 400, "min_p must be in [0, 1]"),
    ({"model": NAME, "prompt": "x", "min_tokens": 20}, 400, "min_tokens must be <= max_tokens=16"),
    ({"model": NAME, "prompt": "x", "stop_token_ids": [258]}, 400, "stop_token_ids must be ids of the vocabulary"),
    ({"model": NAME, "messages": MSGS, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs must be an int"),
    ({"model": NAME, "messages": MSGS, "top_logprobs": 2}, 400, "top_logprobs needs logprobs: true"),
    # Fields still not implemented are refused, never ignored.
    ({"model": NAME, "prompt": "x", "echo": True}, 400, "echo is not supported"),
    ({"model": NAME, "prompt": "x", "logit_bias": {"1": 2}}, 400, "logit_bias is not supported"),
    ({"model": NAME, "prompt": "x", "best_of": 3}, 400, "best_of=3 is not supported"),
    ({"model": NAME, "prompt": "x", "prompt_logprobs": 1}, 400, "prompt_logprobs is not supported"),
    ({"model": NAME, "prompt": "x", "top_logprobs": 2}, 400, "top_logprobs is not supported"),
    ({"model": NAME, "messages": MSGS, "tools": [{"type": "function"}]}, 400, "tools is not supported"),
])
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, body, status, match):
    base, client, _ = server
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    code, r = http(base + path, json.dumps(body).encode())
    assert code == status and match in r["error"]["message"], r
    code, r = http(base + "/v1/completions", b"{not json")
    assert code == 400 and "error" in r
    assert client.completions.create(model=NAME, prompt="still up", max_tokens=2).choices[0].text is not None


def test_many_concurrent_streams_all_terminate(server):
    base, _, llm = server
    aclient = openai.AsyncOpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=300)

    async def one(i):
        stream = await aclient.completions.create(model=NAME, prompt=f"request {i}", max_tokens=4 + i % 5,
                                                  stream=True, extra_body={"ignore_eos": True})
        parts = [c async for c in stream]
        assert parts[-1].choices[0].finish_reason == "length"
        return i

    async def main():
        try:
            return await asyncio.gather(*(one(i) for i in range(64)))
        finally:
            await aclient.close()

    assert sorted(asyncio.run(main())) == list(range(64))
    assert not llm.scheduler.has_unfinished() and llm.manager.stats().live_slots == 0
    _, metrics = http(base + "/metrics", raw=True)
    assert "vattn_time_to_first_token_seconds_bucket" in metrics and "vattn_requests_running 0.0" in metrics
    assert "vattn_prefix_cache_hit_rate 0.0" in metrics  # prefix caching off: reported as no hits
    assert http(base + "/health") == (200, {"status": "ok"})


def test_serve_command_shuts_down_gracefully_on_sigterm():
    """The real ``jax-vattention serve`` process: it answers, then SIGTERM stops it cleanly with the cache closed."""
    import os
    import signal
    import subprocess
    import sys

    port = free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, "-m", "jax_vattention_cli", "serve", "--preset", "tiny", "--port",
                             str(port), "--max-batch", "2", "--max-seq", "256"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            try:
                if http(f"http://127.0.0.1:{port}/health") == (200, {"status": "ok"}):
                    break
            except OSError:
                pass
            assert time.time() < deadline, "the server did not come up"
            time.sleep(0.2)
        body = json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": 3}).encode()
        code, r = http(f"http://127.0.0.1:{port}/v1/completions", body)
        assert code == 200 and r["usage"]["completion_tokens"] == 3
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-2000:]
    assert "serving 'tiny'" in out and "shut down: the cache is closed" in out, out
