"""The HTTP server under load (issue 18): TTFT and time between tokens at given request rates, per KV cache.

For each ``--kv-cache`` kind, starts ``python -m jax_vattention_cli serve`` (Llama-3-8B shape, all 32 layers, bf16,
random weights by default; ``--warmup`` compiles every step shape before it listens) on 127.0.0.1, then, for each
``--request-rate`` R, sends the same ``--requests`` N requests of a seeded ShareGPT-like workload
(``jax_vattention.engine.workloads``: prompts as token-id lists, ``max_tokens`` = the workload's output length,
greedy, ``ignore_eos``) with Poisson arrivals at R req/s (the same arrival times for every cache), each streamed
(``stream: true`` with ``stream_options`` ``include_usage`` and ``continuous_usage_stats``, so every chunk says how
many tokens it carries). Per request it records the send time, the arrival of each token-bearing chunk and the end
of the stream; reported per rate: throughput, TTFT, time between tokens (gaps between consecutive token-bearing
chunks), TPOT and end-to-end latency (p50 / p90 / p99), and the server's own ``/metrics`` (tokens, finished
requests, mean TTFT and time between tokens, scraped before and after) as a cross-check. The caches are compared
side by side (same workload, same arrivals, same budget): the ratios are what counts.

Correctness first, the run fails loudly otherwise: every request must stream exactly its ``max_tokens`` tokens and
finish with ``"length"``; the server's token and finish counters must match what the clients received; one greedy
request (with its tokens' logprobs) before the load must give the same tokens after it; SIGTERM must stop the
server with exit status 0 and its cache closed within a bound.

    python benchmarks/bench_server.py                                   # H200: llama-3-8b, 8 GiB KV, 4 and 8 req/s
    python benchmarks/bench_server.py --request-rate 8 --requests 200 --kv-cache vattention,paged
    python benchmarks/bench_server.py --quick                           # tiny preset on the CPU, in seconds
    python benchmarks/bench_server.py --report benchmarks/results/server_....json   # the tables of a JSON

On a device machine without FastAPI/uvicorn: ``scripts/device_run.sh bench-server`` (the wheels of
``scripts/fetch_device_wheels.sh``, carried as ``.whl/server``).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # the device name below must not take GPU memory

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
import common  # noqa: E402

import models  # noqa: E402
from jax_vattention.engine.workloads import Workload, sharegpt_like  # noqa: E402

try:
    import httpx
except ImportError:  # the CPU image ships httpx's successor under its own name
    import httpx2 as httpx  # type: ignore[no-redef]

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODEL_NAME = "bench"
GIB = 1 << 30
SERVER_COUNTERS = {
    "tokens": "vattn_generation_tokens_total",
    "finished_length": 'vattn_requests_finished_total{reason="length"}',
    "ttft_sum": "vattn_time_to_first_token_seconds_sum",
    "ttft_count": "vattn_time_to_first_token_seconds_count",
    "tbt_sum": "vattn_time_between_tokens_seconds_sum",
    "tbt_count": "vattn_time_between_tokens_seconds_count",
}


class BenchError(RuntimeError):
    """The run cannot be trusted: a request came back short or wrong, or the server misbehaved."""


# -- the server ------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, timeout: float = 30) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read().decode()


class Server:
    """One ``jax-vattention serve`` process, its output in ``log``."""

    def __init__(self, args, kind: str, log: pathlib.Path):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.cmd = [sys.executable, "-m", "jax_vattention_cli", "serve", "--preset", args.preset,
                    "--served-model-name", MODEL_NAME, "--host", "127.0.0.1", "--port", str(self.port),
                    "--kv-cache", kind, "--max-num-seqs", str(args.max_num_seqs),
                    "--max-model-len", str(args.max_model_len),
                    "--max-num-batched-tokens", str(args.max_num_batched_tokens), "--chunk-size", str(args.chunk_size),
                    "--max-prefill-rows", "1", "--min-decode-bucket", str(min(args.min_decode_bucket,
                                                                                 args.max_num_seqs)),
                    "--min-prefill-bucket", str(min(args.min_prefill_bucket, args.chunk_size)),
                    "--lookahead", str(args.lookahead), "--compile-threads", str(args.compile_threads),
                    "--seed", str(args.seed)]
        if args.layers is not None:
            self.cmd += ["--layers", str(args.layers)]
        if args.kv_budget_gib is not None:
            self.cmd += ["--kv-budget-gib", str(args.kv_budget_gib)]
        if not args.no_warmup:
            self.cmd.append("--warmup")
        self.proc: subprocess.Popen | None = None
        self._out = None

    def output(self, tail: int = 4000) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return text[-tail:]

    def start(self, timeout: float) -> float:
        """Start it and wait (at most ``timeout`` s) until ``/health`` answers; returns the seconds it took."""
        t0 = time.perf_counter()
        self._out = open(self.log, "w")  # closed in stop
        self.proc = subprocess.Popen(self.cmd, stdout=self._out, stderr=subprocess.STDOUT, cwd=ROOT,
                                     env=dict(os.environ, PYTHONUNBUFFERED="1"))
        while True:
            if self.proc.poll() is not None:
                raise BenchError(f"the server exited with status {self.proc.returncode} before answering:\n"
                                 f"{self.output()}")
            try:
                code, body = get(self.base + "/health", timeout=5)
                if code == 200 and json.loads(body).get("status") == "ok":
                    return time.perf_counter() - t0
            except (OSError, ValueError):
                pass
            if time.perf_counter() - t0 > timeout:
                raise BenchError(f"the server did not answer /health within {timeout:.0f} s:\n{self.output()}")
            time.sleep(0.25)

    def compiled(self) -> dict:
        """What the server said it compiled: in its warmup (shapes, seconds) and in all (at its exit)."""
        text = self.output(1 << 20)
        warm = re.search(r"compiled (\d+) step shapes in ([0-9.]+) s", text)
        total = re.search(r"^(\d+) step shapes compiled in all", text, re.MULTILINE)
        return dict(warmup_shapes=int(warm.group(1)) if warm else None,
                    warmup_s=float(warm.group(2)) if warm else None,
                    shapes_at_exit=int(total.group(1)) if total else None)

    def stop(self, timeout: float) -> dict:
        """SIGTERM, then wait at most ``timeout`` s: the exit status, the seconds, whether it said its cache closed."""
        assert self.proc is not None
        t0 = time.perf_counter()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise BenchError(f"the server did not exit within {timeout:.0f} s of SIGTERM:\n{self.output()}") from None
        finally:
            if self._out is not None:
                self._out.close()
        closed = re.search(r"^shut down: the cache is closed$", self.output(1 << 20), re.MULTILINE) is not None
        return dict(returncode=code, seconds=round(time.perf_counter() - t0, 2), cache_closed=closed)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        if self._out is not None:
            self._out.close()


def scrape(base: str) -> dict[str, float]:
    """The server's counters of ``SERVER_COUNTERS`` (0 for a labelled counter not yet incremented)."""
    _, text = get(base + "/metrics")
    out = {}
    for key, name in SERVER_COUNTERS.items():
        m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.MULTILINE)
        out[key] = float(m.group(1)) if m else 0.0
    return out


# -- the client --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Record:
    """One streamed request, times from ``time.perf_counter``."""

    index: int
    prompt_tokens: int
    max_tokens: int
    scheduled: float = 0.0  # when its Poisson arrival said to send it
    sent: float = 0.0
    chunks: list[tuple[float, int]] = dataclasses.field(default_factory=list)  # (arrival, tokens) with tokens > 0
    end: float = 0.0  # ``data: [DONE]``
    done: bool = False
    finish_reason: str | None = None
    usage_tokens: int | None = None  # the include_usage chunk's completion_tokens
    error: str | None = None

    @property
    def tokens(self) -> int:
        return sum(n for _, n in self.chunks)

    def problem(self) -> str | None:
        """Why this request does not count as complete and correct, or None."""
        if self.error:
            return self.error
        if not self.done:
            return "no data: [DONE]"
        if self.finish_reason != "length":
            return f"finish_reason {self.finish_reason!r}, not 'length'"
        if self.tokens != self.max_tokens or self.usage_tokens != self.max_tokens:
            return f"{self.tokens} tokens streamed (usage says {self.usage_tokens}), max_tokens={self.max_tokens}"
        return None


def completion_body(prompt: list[int], max_tokens: int, **extra) -> dict:
    return {"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
            **extra}


async def stream_one(client, rec: Record, prompt: list[int]) -> None:
    body = completion_body(prompt, rec.max_tokens, stream=True,
                           stream_options={"include_usage": True, "continuous_usage_stats": True})
    seen = 0
    rec.sent = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                rec.error = f"HTTP {r.status_code}: {(await r.aread())[:300]!r}"
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                now = time.perf_counter()
                data = line[6:]
                if data == "[DONE]":
                    rec.end, rec.done = now, True
                    break
                event = json.loads(data)
                if "error" in event:
                    rec.error = f"error event: {event['error']}"
                    return
                usage = event.get("usage")
                if event["choices"]:
                    choice = event["choices"][0]
                    if usage is None:
                        rec.error = "a chunk without usage: the server ignored stream_options"
                        return
                    n, seen = usage["completion_tokens"] - seen, usage["completion_tokens"]
                    if n > 0:
                        rec.chunks.append((now, n))
                    rec.finish_reason = choice.get("finish_reason") or rec.finish_reason
                elif usage is not None:  # include_usage: the last chunk
                    rec.usage_tokens = usage["completion_tokens"]
    except (httpx.HTTPError, OSError, ValueError, KeyError) as e:
        rec.error = f"{type(e).__name__}: {e}"


def arrivals(n: int, rate: float, seed: int) -> np.ndarray:
    """Send offsets (s) of ``n`` Poisson arrivals at ``rate`` req/s, the first at 0 (``inf``: all at 0)."""
    if math.isinf(rate):
        return np.zeros(n)
    gaps = np.random.default_rng([seed, round(rate * 1000)]).exponential(1.0 / rate, size=n)
    return np.concatenate([[0.0], np.cumsum(gaps[1:])])


async def drive(base: str, wl: Workload, offsets: np.ndarray, timeout: float) -> tuple[list[Record], float]:
    """Send ``wl`` at ``offsets`` and wait for every stream (at most ``timeout`` s after the last send)."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    records = [Record(i, len(p), sp.max_tokens) for i, (p, sp) in enumerate(zip(wl.prompts, wl.params))]
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=httpx.Timeout(timeout, connect=60)) as client:
        t0 = time.perf_counter()
        tasks = []
        for rec, offset, prompt in zip(records, offsets, wl.prompts):
            rec.scheduled = t0 + float(offset)
            delay = rec.scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(stream_one(client, rec, prompt)))
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        for t in pending:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for rec, t in zip(records, tasks):
        if t.cancelled() and rec.error is None:
            rec.error = f"still streaming {timeout:.0f} s after the last request was sent"
    return records, t0


def greedy_check(base: str, prompt: list[int], max_tokens: int) -> dict:
    """One greedy request with its tokens' logprobs (each token's text: ``<|reserved_N|>`` for most ids)."""
    body = json.dumps(completion_body(prompt, max_tokens, logprobs=0)).encode()
    req = urllib.request.Request(base + "/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        out = json.loads(r.read())
    choice = out["choices"][0]
    return dict(tokens=choice["logprobs"]["tokens"], logprobs=choice["logprobs"]["token_logprobs"],
                finish_reason=choice["finish_reason"], completion_tokens=out["usage"]["completion_tokens"])


# -- the numbers -------------------------------------------------------------------------------------------------
def pcts(xs, prefix: str) -> dict[str, float | None]:
    a = np.asarray(xs, dtype=np.float64)
    if a.size == 0:
        return {f"{prefix}_{k}": None for k in ("mean_s", "p50_s", "p90_s", "p99_s")}
    return {f"{prefix}_mean_s": float(a.mean()), f"{prefix}_p50_s": float(np.percentile(a, 50)),
            f"{prefix}_p90_s": float(np.percentile(a, 90)), f"{prefix}_p99_s": float(np.percentile(a, 99))}


def summarize(records: list[Record], rate: float, t0: float, before: dict, after: dict) -> dict:
    done = [r for r in records if r.problem() is None]
    ttft = [r.chunks[0][0] - r.sent for r in done]
    tbt = [g for r in done for g in np.diff([t for t, _ in r.chunks])]
    tpot = [(r.chunks[-1][0] - r.chunks[0][0]) / (r.tokens - 1) for r in done if r.tokens > 1]
    e2e = [r.end - r.sent for r in done]
    start, end = min(r.sent for r in records), max((r.end for r in done), default=t0)
    duration = max(end - start, 1e-9)
    tokens = sum(r.tokens for r in done)
    chunk_sizes = [n for r in done for _, n in r.chunks]
    delta = {k: after[k] - before[k] for k in SERVER_COUNTERS}
    server = dict(tokens=int(delta["tokens"]), finished_length=int(delta["finished_length"]),
                  ttft_mean_s=delta["ttft_sum"] / delta["ttft_count"] if delta["ttft_count"] else None,
                  tbt_mean_s=delta["tbt_sum"] / delta["tbt_count"] if delta["tbt_count"] else None)
    return dict(request_rate=rate, requests=len(records), completed=len(done), duration_s=duration,
                requests_per_s=len(done) / duration, output_tokens=tokens, output_tokens_per_s=tokens / duration,
                prompt_tokens=sum(r.prompt_tokens for r in done),
                **pcts(ttft, "ttft"), **pcts(tbt, "tbt"), **pcts(tpot, "tpot"), **pcts(e2e, "e2e"),
                token_chunks=len(chunk_sizes), multi_token_chunks=sum(n > 1 for n in chunk_sizes),
                max_tokens_per_chunk=max(chunk_sizes, default=0),
                send_lag_max_s=max(r.sent - r.scheduled for r in records), server=server)


def check_rate(records: list[Record], summary: dict, kind: str, rate: float) -> None:
    bad = [(r.index, r.problem()) for r in records if r.problem() is not None]
    if bad:
        raise BenchError(f"{kind} at {rate:g} req/s: {len(bad)} of {len(records)} requests incomplete or wrong, "
                         f"e.g. {bad[:5]}")
    s = summary["server"]
    if s["tokens"] != summary["output_tokens"] or s["finished_length"] != summary["completed"]:
        raise BenchError(f"{kind} at {rate:g} req/s: the server counted {s['tokens']} tokens and "
                         f"{s['finished_length']} finished requests, the clients got {summary['output_tokens']} and "
                         f"{summary['completed']}")


def ms(x) -> str:
    return "n/a" if x is None else f"{x * 1e3:.1f}"


def markdown(payload: dict) -> str:
    cfg, results = payload["config"], payload["results"]
    md = ["| KV cache | rate (req/s) | done | req/s | out tok/s | TTFT p50 / p90 / p99 (ms) | TBT p50 / p90 / p99 (ms) "
          "| TPOT p50 (ms) | E2E p50 / p99 (s) | server TTFT / TBT mean (ms) |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for kind, res in results.items():
        for rate, r in res.get("rates", {}).items():
            md.append(f"| {kind} | {rate} | {r['completed']}/{r['requests']} | {r['requests_per_s']:.2f} | "
                      f"{r['output_tokens_per_s']:.0f} | {ms(r['ttft_p50_s'])} / {ms(r['ttft_p90_s'])} / "
                      f"{ms(r['ttft_p99_s'])} | {ms(r['tbt_p50_s'])} / {ms(r['tbt_p90_s'])} / {ms(r['tbt_p99_s'])} | "
                      f"{ms(r['tpot_p50_s'])} | {r['e2e_p50_s']:.2f} / {r['e2e_p99_s']:.2f} | "
                      f"{ms(r['server']['ttft_mean_s'])} / {ms(r['server']['tbt_mean_s'])} |")
    for rate, ratios in payload.get("ratios", {}).items():
        md.append(f"\n{payload['ratio_names'][0]} / {payload['ratio_names'][1]} at {rate} req/s: "
                  + ", ".join(f"{k} **{v:.3f}**" for k, v in ratios.items() if v is not None))
    md.append("\nservers: " + "; ".join(
        f"{kind}: up in {res['server']['startup_s']:.1f} s (warmup: {res['server']['warmup_shapes']} step shapes in "
        f"{res['server']['warmup_s']} s; {res['server']['shapes_at_exit']} at exit, the greedy check's logprobs "
        f"included), "
        f"SIGTERM -> exit {res['server']['returncode']} in {res['server']['shutdown_s']:.1f} s, "
        f"greedy check {'same tokens' if res['check']['same_tokens'] else 'DIFFERENT'} "
        f"({res['check']['tokens']} tokens, max |d logprob| {res['check']['max_logprob_diff']:.2g})"
        for kind, res in results.items() if "server" in res))
    chunks = {f"{k} {rate}": r["max_tokens_per_chunk"] for k, res in results.items()
              for rate, r in res.get("rates", {}).items()}
    md.append(f"\nlargest tokens per streamed chunk: {json.dumps(chunks)}; TBT = gaps between token-bearing chunks")
    md.append(f"\nsetup: {cfg['workload']}; {cfg['layers']} layers of {cfg['preset']}; max_num_seqs "
              f"{cfg['max_num_seqs']}, max_model_len {cfg['max_model_len']}, KV budget "
              f"{'every row at max_model_len' if cfg['kv_budget_gib'] is None else str(cfg['kv_budget_gib']) + ' GiB'}"
              f", max_num_batched_tokens {cfg['max_num_batched_tokens']}, chunk {cfg['chunk_size']}, lookahead "
              f"{cfg['lookahead']}; Poisson arrivals, seed {cfg['seed']}")
    return "\n".join(md)


RATIO_KEYS = ("ttft_p50_s", "ttft_p99_s", "tbt_p50_s", "tbt_p99_s", "tpot_p50_s", "e2e_p50_s", "output_tokens_per_s")


def ratios(results: dict, a: str, b: str) -> dict:
    out = {}
    for rate, ra in results[a]["rates"].items():
        rb = results[b]["rates"].get(rate)
        if rb is not None:
            out[rate] = {k: (ra[k] / rb[k] if ra[k] is not None and rb[k] else None) for k in RATIO_KEYS}
    return out


# -- main --------------------------------------------------------------------------------------------------------
def rate_list(text: str) -> list[float]:
    rates = [float(x) for x in text.split(",") if x.strip()]
    if not rates or any(not r > 0 for r in rates):
        raise argparse.ArgumentTypeError(f"--request-rate takes positive req/s separated by commas, got {text!r}")
    return rates


def rate_key(rate: float) -> str:
    return "inf" if math.isinf(rate) else f"{rate:g}"


def run_kind(args, kind: str, wl: Workload, check_prompt: list[int], log: pathlib.Path, result: dict) -> None:
    """One server of cache ``kind``: its numbers go into ``result`` as they come (a failure keeps what ran)."""
    server = Server(args, kind, log)
    print(f"[{kind}] {' '.join(server.cmd[1:])}", flush=True)
    result["rates"] = {}
    try:
        startup = server.start(args.startup_timeout)
        result["server"] = dict(startup_s=startup, **server.compiled(), command=server.cmd[1:])
        print(f"[{kind}] up in {startup:.1f} s (warmup {result['server']['warmup_s']} s)", flush=True)
        first = greedy_check(server.base, check_prompt, args.check_tokens)
        for rate in args.request_rate:
            before = scrape(server.base)
            records, t0 = asyncio.run(drive(server.base, wl, arrivals(len(wl), rate, args.seed), args.drain_timeout))
            summary = summarize(records, rate, t0, before, scrape(server.base))
            result["rates"][rate_key(rate)] = summary
            check_rate(records, summary, kind, rate)
            print(f"[{kind}] {rate:g} req/s: {summary['requests_per_s']:.2f} req/s, "
                  f"{summary['output_tokens_per_s']:.0f} out tok/s, TTFT p50 {ms(summary['ttft_p50_s'])} / p99 "
                  f"{ms(summary['ttft_p99_s'])} ms, TBT p50 {ms(summary['tbt_p50_s'])} / p99 "
                  f"{ms(summary['tbt_p99_s'])} ms, E2E p50 {summary['e2e_p50_s']:.2f} s", flush=True)
        again = greedy_check(server.base, check_prompt, args.check_tokens)
        same = first["tokens"] == again["tokens"]
        diff = max((abs(a - b) for a, b in zip(first["logprobs"], again["logprobs"])), default=0.0)
        result["check"] = dict(same_tokens=same, tokens=len(first["tokens"]), max_logprob_diff=diff,
                               finish_reason=first["finish_reason"])
        if not same or first["completion_tokens"] != args.check_tokens or first["finish_reason"] != "length":
            raise BenchError(f"{kind}: the greedy request gave {first['tokens']} ({first['finish_reason']}) before "
                             f"the load and {again['tokens']} after")
        stop = server.stop(args.shutdown_timeout)
        result["server"].update(returncode=stop["returncode"], shutdown_s=stop["seconds"],
                                cache_closed=stop["cache_closed"], shapes_at_exit=server.compiled()["shapes_at_exit"])
        if stop["returncode"] != 0 or not stop["cache_closed"]:
            raise BenchError(f"{kind}: SIGTERM ended the server with status {stop['returncode']} "
                             f"(cache closed: {stop['cache_closed']}):\n{server.output()}")
        print(f"[{kind}] SIGTERM: exit 0 in {stop['seconds']:.1f} s, cache closed", flush=True)
    finally:
        server.kill()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama-3-8b")
    ap.add_argument("--layers", type=int, default=None, help="override the preset's layer count")
    ap.add_argument("--kv-cache", default="vattention,paged", help="caches to compare, in order (a,b: a/b ratios)")
    ap.add_argument("--request-rate", type=rate_list, default=None,
                    help="req/s, e.g. 4,8 (inf: all at once; default 4,8, --quick 20)")
    ap.add_argument("--requests", type=int, default=None, help="requests per rate (default 128, --quick 16)")
    ap.add_argument("--max-num-seqs", type=int, default=128)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--kv-budget-gib", type=float, default=8.0, help="KV budget of every cache (0: every row full)")
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--chunk-size", type=int, default=512)
    ap.add_argument("--lookahead", type=int, default=64, help="vAttention eager allocation (bench_serving's)")
    ap.add_argument("--min-decode-bucket", type=int, default=32, help="smallest decode batch compiled")
    ap.add_argument("--min-prefill-bucket", type=int, default=128, help="smallest prefill chunk compiled")
    ap.add_argument("--compile-threads", type=int, default=4)
    ap.add_argument("--no-warmup", action="store_true", help="do not pass --warmup (compiles land in the timings)")
    ap.add_argument("--check-tokens", type=int, default=16, help="tokens of the greedy before/after request")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--startup-timeout", type=float, default=420, help="s until /health answers (incl. warmup)")
    ap.add_argument("--drain-timeout", type=float, default=240, help="s after the last send until all streams end")
    ap.add_argument("--shutdown-timeout", type=float, default=90, help="s from SIGTERM to the exit")
    ap.add_argument("--quick", action="store_true", help="tiny preset, 16 short requests at 20 req/s (CPU: seconds)")
    ap.add_argument("--results-dir", default=None, help="where the JSON and markdown go (default benchmarks/results)")
    ap.add_argument("--report", metavar="JSON", help="print the tables of an earlier run's JSON; runs nothing")
    args = ap.parse_args(argv)
    if args.report:
        print(markdown(json.loads(pathlib.Path(args.report).read_text())))
        return 0
    workload_kw: dict = {}
    if args.quick:
        args.preset = "tiny"
        args.max_num_seqs, args.max_model_len, args.kv_budget_gib = 8, 128, 0
        args.max_num_batched_tokens = args.chunk_size = args.min_prefill_bucket = 64
        args.min_decode_bucket, args.check_tokens, args.compile_threads = 8, 8, 1
        args.startup_timeout, args.drain_timeout = min(args.startup_timeout, 180), min(args.drain_timeout, 120)
        workload_kw = dict(prompt_median=24, max_prompt=80, output_median=12, output_sigma=0.5, max_output=40)
    if args.requests is None:
        args.requests = 16 if args.quick else 128
    if args.request_rate is None:
        args.request_rate = [20.0] if args.quick else [4.0, 8.0]
    if args.kv_budget_gib == 0:
        args.kv_budget_gib = None
    kinds = [k for k in args.kv_cache.split(",") if k]
    if not kinds or set(kinds) - {"vattention", "paged", "static"} or len(set(kinds)) != len(kinds):
        ap.error(f"--kv-cache takes distinct vattention, paged, static separated by commas, got {args.kv_cache!r}")
    if args.requests <= 0:
        ap.error("--requests must be positive")
    if args.results_dir:
        common.RESULTS_DIR = pathlib.Path(args.results_dir)
    cfg = models.get_preset(args.preset)
    layers = args.layers or cfg.num_layers
    wl = sharegpt_like(args.requests, vocab_size=cfg.vocab_size, seed=args.seed, **workload_kw)
    if wl.max_len() > args.max_model_len:
        ap.error(f"the workload's longest request ({wl.max_len()} tokens) exceeds --max-model-len {args.max_model_len}")
    check_prompt = np.random.default_rng(args.seed + 1).integers(0, cfg.vocab_size, size=48).tolist()
    print(f"{layers} layers of {args.preset}; {wl.describe()}; rates {args.request_rate} req/s; caches {kinds}",
          flush=True)

    name = "server_quick" if args.quick else f"server_{args.preset}" + (
        f"_{layers}l" if layers != cfg.num_layers else "") + f"_{args.requests}req"
    payload: dict = dict(config=dict(preset=args.preset, layers=layers, requests=args.requests,
                                     request_rates=[rate_key(r) for r in args.request_rate], kv_caches=kinds,
                                     max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                                     kv_budget_gib=args.kv_budget_gib,
                                     max_num_batched_tokens=args.max_num_batched_tokens, chunk_size=args.chunk_size,
                                     lookahead=args.lookahead, warmup=not args.no_warmup, seed=args.seed,
                                     workload=wl.describe()),
                         results={})
    log_dir = pathlib.Path(os.environ.get("OUT") or tempfile.mkdtemp(prefix="bench_server_"))
    log_dir.mkdir(parents=True, exist_ok=True)
    error = None
    try:
        for kind in kinds:
            result = payload["results"].setdefault(kind, {})
            run_kind(args, kind, wl, check_prompt, log_dir / f"{name}_{kind}.log", result)
    except BenchError as e:
        error = str(e)
    except Exception as e:  # anything else (the client, the network): still write what ran, then fail
        traceback.print_exc()
        error = f"{type(e).__name__}: {e}"
    if error is not None:
        payload["error"] = error
    if len(payload["results"]) >= 2 and error is None:
        a, b = kinds[0], kinds[1]
        payload["ratio_names"] = [a, b]
        payload["ratios"] = ratios(payload["results"], a, b)
    table = markdown(payload) if error is None else f"FAILED: {error}"
    print(table)
    paths = common.write_results(name, payload, table)  # the device name: jax here, after every server has exited
    print("wrote", *paths, f"(server logs in {log_dir})")
    if error is not None:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
