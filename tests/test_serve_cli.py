"""``jax-vattention serve``'s sizing flags (vLLM's names) down to the EngineConfig, the server's ``stream_options``,
and ``benchmarks/bench_server.py --quick`` end to end (the tiny preset on the CPU)."""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from jax_vattention_cli.serve import GIB, add_serve_parser, engine_settings

ROOT = pathlib.Path(__file__).resolve().parents[1]


def serve_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["serve", *argv])


def test_sizing_flags_reach_the_engine_config():
    pytest.importorskip("flax")
    from jax_vattention_cli.serve import build_engine

    args = serve_args("--preset", "tiny", "--layers", "3", "--max-num-seqs", "4", "--max-model-len", "256",
                      "--max-num-batched-tokens", "96", "--chunk-size", "32", "--kv-cache", "paged",
                      "--kv-budget-gib", "0.001", "--max-prefill-rows", "2", "--lookahead", "8",
                      "--min-decode-bucket", "2", "--min-prefill-bucket", "16", "--served-model-name", "m")
    llm, name = build_engine(args)
    with llm:
        c = llm.config
        assert name == "m" and llm.model.config.num_layers == 3
        assert (c.kv_cache, c.max_batch, c.max_seq, c.token_budget, c.chunk_size) == ("paged", 4, 256, 96, 32)
        assert c.pool_bytes == int(0.001 * GIB) and c.max_prefill_rows == 2 and c.lookahead == 8
        assert (c.min_decode_bucket, c.min_prefill_bucket) == (2, 16)


def test_old_names_still_work_and_unset_flags_keep_the_engine_defaults():
    from jax_vattention.engine import EngineConfig

    old = engine_settings(serve_args("--max-batch", "3", "--max-seq", "512"))
    new = engine_settings(serve_args("--max-num-seqs", "3", "--max-model-len", "512"))
    assert old == new == dict(kv_cache="vattention", max_batch=3, max_seq=512)
    c = EngineConfig(**new)
    assert c.token_budget == EngineConfig.token_budget and c.pool_bytes is None
    assert serve_args().warmup is False and serve_args("--warmup").warmup is True
    switches = engine_settings(serve_args("--no-enable-prefix-caching", "--no-packed-steps", "--min-token-bucket",
                                          "4"))
    assert switches["enable_prefix_caching"] is False and switches["packed_steps"] is False
    assert engine_settings(serve_args("--enable-prefix-caching"))["enable_prefix_caching"] is True
    assert engine_settings(serve_args("--tensor-parallel-size", "2"))["tensor_parallel"] == 2
    with pytest.raises(ValueError, match="--tensor-parallel-size must be positive"):
        engine_settings(serve_args("--tensor-parallel-size", "0"))
    assert EngineConfig(**new).enable_prefix_caching is False  # off unless asked for
    assert EngineConfig(**switches).min_token_bucket == 4


@pytest.mark.parametrize("argv,match", [
    (["--max-num-seqs", "0"], "--max-num-seqs must be positive, got 0"),
    (["--max-model-len", "-5"], "--max-model-len must be positive"),
    (["--max-num-batched-tokens", "0"], "--max-num-batched-tokens must be positive"),
    (["--chunk-size", "0"], "--chunk-size must be positive"),
    (["--lookahead", "-1"], "--lookahead must be at least 0"),
    (["--compile-threads", "0"], "--compile-threads must be positive"),
    (["--layers", "0"], "--layers must be positive"),
    (["--model", "/nonexistent", "--layers", "2"], "--layers overrides a preset's layer count"),
    (["--kv-budget-gib", "0"], "--kv-budget-gib must be a positive number of GiB"),
    (["--kv-budget-gib", "nan"], "--kv-budget-gib must be a positive number of GiB"),
    (["--kv-budget-gib", "inf"], "--kv-budget-gib must be a positive number of GiB"),
    (["--kv-cache", "paged", "--layers-per-group", "1"], "--layers-per-group is the vAttention layout"),
])
def test_bad_sizing_flags_name_the_flag(argv, match):
    with pytest.raises(ValueError, match=match.replace("(", r"\(")):
        engine_settings(serve_args(*argv))


def test_bad_flag_is_exit_status_2_without_a_traceback(capsys):
    pytest.importorskip("uvicorn")
    from jax_vattention_cli.main import main

    assert main(["serve", "--preset", "tiny", "--kv-budget-gib", "-1"]) == 2
    err = capsys.readouterr().err
    assert "error: --kv-budget-gib must be a positive number of GiB" in err and "Traceback" not in err
    with pytest.raises(SystemExit):  # argparse's own: not a choice
        main(["serve", "--kv-cache", "dense"])


def sse(url: str, body: dict) -> list[dict]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        lines = [line.decode().strip() for line in r]
    data = [line[len("data: "):] for line in lines if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def test_stream_options_usage_per_chunk_and_at_the_end():
    pytest.importorskip("flax")
    pytest.importorskip("uvicorn")
    pytest.importorskip("fastapi")
    from live_server import live_server

    import models
    from jax_vattention.attention import AttentionSpec
    from jax_vattention.engine import LLM, AsyncLLM
    from jax_vattention.server import build_app

    cfg = models.get_preset("tiny")
    llm = LLM(models.random_model(cfg, seed=3), tokenizer=models.tokenizer_for(cfg),
              chat_template=models.chat_template_for(cfg), max_batch=2, max_seq=64, page_bytes=4096,
              attn=AttentionSpec(impl="reference"), min_decode_bucket=2, min_prefill_bucket=32, chunk_size=32)
    engine = AsyncLLM(llm)
    try:
        with live_server(build_app(engine, "t")) as port:
            base = f"http://127.0.0.1:{port}/v1"
            both = {"include_usage": True, "continuous_usage_stats": True}
            events = sse(base + "/completions", {"model": "t", "prompt": [1, 2, 3], "max_tokens": 4, "stream": True,
                                                 "ignore_eos": True, "temperature": 0, "stream_options": both})
            *chunks, last = events
            assert [c["usage"]["completion_tokens"] for c in chunks][-1] == 4 and all(c["choices"] for c in chunks)
            assert sum(c["usage"]["completion_tokens"] - p["usage"]["completion_tokens"]
                       for p, c in zip([{"usage": {"completion_tokens": 0}}, *chunks], chunks)) == 4
            assert last["choices"] == [] and last["usage"] == {"prompt_tokens": 3, "completion_tokens": 4,
                                                                "total_tokens": 7}
            assert last["object"] == "text_completion" and last["id"] == chunks[0]["id"]
            # chat, n=2, include_usage only: no usage per chunk, the total of both choices at the end
            events = sse(base + "/chat/completions", {"model": "t", "messages": [{"role": "user", "content": "hi"}],
                                                      "max_tokens": 3, "n": 2, "stream": True, "ignore_eos": True,
                                                      "stream_options": {"include_usage": True}})
            assert all("usage" not in e for e in events[:-1]) and events[-1]["object"] == "chat.completion.chunk"
            assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 6
            # without stream_options nothing changes; stream_options without stream, or an unknown option, is a 400
            plain = sse(base + "/completions", {"model": "t", "prompt": "a", "max_tokens": 2, "stream": True})
            assert all("usage" not in e for e in plain)
            for body, match in (({"stream_options": {"include_usage": True}}, "only allowed with stream: true"),
                                ({"stream": True, "stream_options": {"usage": True}}, "stream_options.usage")):
                req = urllib.request.Request(base + "/completions", json.dumps({"model": "t", "prompt": "a", **body})
                                             .encode(), {"Content-Type": "application/json"})
                with pytest.raises(urllib.error.HTTPError) as e:
                    urllib.request.urlopen(req, timeout=60)
                assert e.value.code == 400 and match in json.loads(e.value.read())["error"]["message"]
    finally:
        engine.close()
        llm.close()


def test_bench_server_quick_end_to_end(tmp_path):
    """The benchmark's whole path on the tiny preset: two `serve` processes (vattention, paged) with --warmup, 16
    streamed requests at 20 req/s each, every request exact, the greedy check, SIGTERM, the JSON and markdown."""
    pytest.importorskip("flax")
    pytest.importorskip("uvicorn")
    pytest.importorskip("fastapi")
    try:
        import httpx  # noqa: F401
    except ImportError:
        pytest.importorskip("httpx2")
    env = {k: v for k, v in os.environ.items() if k != "OUT"}  # results and logs stay in tmp_path
    env.update(JAX_PLATFORMS="cpu", OUT=str(tmp_path / "out"))
    t0 = time.time()
    proc = subprocess.run([sys.executable, "benchmarks/bench_server.py", "--quick", "--results-dir", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    payload = json.loads((tmp_path / "server_quick_cpu.json").read_text())
    assert payload["device"] == "cpu" and "error" not in payload
    assert payload["config"]["kv_caches"] == ["vattention", "paged"] and payload["config"]["request_rates"] == ["20"]
    for kind in ("vattention", "paged"):
        res = payload["results"][kind]
        assert res["check"]["same_tokens"] and res["check"]["tokens"] == 8
        assert res["server"]["returncode"] == 0 and res["server"]["cache_closed"]
        assert res["server"]["warmup_shapes"] >= 1 and res["server"]["shapes_at_exit"] >= res["server"]["warmup_shapes"]
        r = res["rates"]["20"]
        assert r["completed"] == r["requests"] == 16
        assert r["server"]["tokens"] == r["output_tokens"] and r["server"]["finished_length"] == 16
        for key in ("ttft", "tbt", "tpot", "e2e"):
            assert 0 < r[f"{key}_p50_s"] <= r[f"{key}_p99_s"], key
        assert r["output_tokens_per_s"] > 0 and r["max_tokens_per_chunk"] >= 1
    assert set(payload["ratios"]["20"]) >= {"ttft_p50_s", "tbt_p50_s", "tbt_p99_s", "output_tokens_per_s"}
    md = (tmp_path / "server_quick_cpu.md").read_text()
    assert "| vattention | 20 | 16/16 |" in md and "vattention / paged at 20 req/s" in md
    out = tmp_path / "out"  # $OUT: the server logs and a copy of the results (what the device tool brings back)
    assert (out / "server_quick_cpu.json").exists() and "compiled" in (out / "server_quick_paged.log").read_text()
    print(f"bench_server --quick: {time.time() - t0:.1f} s")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_server

    assert bench_server.markdown(payload) == md.split("\n\n", 1)[1].rstrip("\n")  # --report rebuilds the tables


def test_bench_server_refuses_short_or_miscounted_streams():
    """The benchmark's correctness guard without a server: a short stream, a wrong finish reason, a usage that
    disagrees with the chunks, or server counters that disagree with the clients each fail the run."""
    pytest.importorskip("flax")
    try:
        import httpx  # noqa: F401
    except ImportError:
        pytest.importorskip("httpx2")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_server as b

    def rec(tokens, usage, finish="length", done=True):
        r = b.Record(0, 5, 3, scheduled=0.0, sent=0.0, end=1.0, done=done, finish_reason=finish, usage_tokens=usage)
        r.chunks = [(0.1 * (i + 1), n) for i, n in enumerate(tokens)]
        return r

    assert rec([1, 1, 1], 3).problem() is None and rec([1, 2], 3).problem() is None  # two tokens in one chunk
    assert "2 tokens streamed" in rec([1, 1], 2).problem()
    assert "usage says 2" in rec([1, 1, 1], 2).problem()
    assert "finish_reason 'stop'" in rec([1, 1, 1], 3, finish="stop").problem()
    assert "[DONE]" in rec([1, 1, 1], 3, done=False).problem()
    zero = dict.fromkeys(b.SERVER_COUNTERS, 0.0)
    good = [rec([1, 1, 1], 3), rec([2, 1], 3)]
    counted = dict(zero, tokens=6.0, finished_length=2.0, ttft_sum=0.2, ttft_count=2.0, tbt_sum=0.2, tbt_count=4.0)
    s = b.summarize(good, 4.0, 0.0, zero, counted)
    b.check_rate(good, s, "k", 4.0)
    assert s["multi_token_chunks"] == 1 and s["max_tokens_per_chunk"] == 2 and s["output_tokens"] == 6
    assert s["ttft_p50_s"] == pytest.approx(0.1) and s["server"]["ttft_mean_s"] == pytest.approx(0.1)
    with pytest.raises(b.BenchError, match="the server counted 5 tokens"):
        b.check_rate(good, b.summarize(good, 4.0, 0.0, zero, dict(counted, tokens=5.0)), "k", 4.0)
    bad = [*good, rec([1], 1)]
    with pytest.raises(b.BenchError, match="1 of 3 requests incomplete or wrong"):
        b.check_rate(bad, b.summarize(bad, 4.0, 0.0, zero, counted), "k", 4.0)
    # Poisson arrivals: seeded per rate, mean gap 1/rate; inf sends everything at once
    a = b.arrivals(2000, 8.0, 0)
    assert a[0] == 0 and (a == b.arrivals(2000, 8.0, 0)).all() and abs(a[-1] / 1999 - 1 / 8) < 0.01
    assert not b.arrivals(5, float("inf"), 0).any()
