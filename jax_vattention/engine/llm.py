"""An offline serving engine: ``LLM(model, ...).generate(prompts, SamplingParams)`` (vLLM-like).

Each iteration the scheduler picks the running decodes plus prefill chunks
within the token budget and maps their pages on the host. The engine lays the
step out as flat tokens in two row groups, ``decodes [Bd] x 1`` and
``prefill chunks [Bp] x T``: the projections and MLP run once over all tokens
(one pass over the weights), and each group gets its own attention kernel
(decode, chunked prefill). Sampling runs on the device, so a step returns
``[Bd + Bp]`` token ids, not logits. ``Bd``, ``Bp`` and ``T`` are bucketed to
powers of two, so a long run compiles few shapes (``num_compiled``).

vAttention's allocation optimizations are switchable so their effect can be
measured:

* ``overlap_allocation``: ``"thread"`` maps the pages step t+1 will need on a
  background thread while step t runs on the device; ``"inline"`` does it on
  the calling thread after dispatch (JAX dispatch is asynchronous, so this
  also overlaps); ``"off"`` leaves all mapping to the scheduler, between steps.
* ``lookahead``: eager allocation, mapping that many tokens beyond the next step.
* ``deferred_reclaim`` / ``best_fit``: finished requests keep their pages and
  new ones take the free slot whose pages fit best; with reclamation off, pages
  are unmapped when a request finishes. Pool pressure reclaims deferred pages.
* ``premap``: every slot mapped to ``max_seq`` before the run (the control).

``kv_cache`` picks the memory: ``"vattention"``, or the baselines ``"paged"``
(block tables and JAX's Pallas ``paged_attention``) and ``"static"``
(``max_batch x max_seq`` preallocated), each within ``pool_bytes``.

Sampling is per request and reproducible: the key of a request's n-th token is
``fold_in(PRNGKey(params.seed), n)``, whatever batch it lands in and whether
it was preempted and recomputed.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import BackendError, PoolExhaustedError
from .request import Request, SamplingParams
from .sampling import sample_rows, sampling_mode
from .scheduler import Scheduler, SchedulerConfig, SchedulerOutput

KV_CACHES = ("vattention", "paged", "static")
OVERLAP_MODES = ("thread", "inline", "off")


@dataclasses.dataclass(frozen=True)
class RequestOutput:
    request_id: int
    prompt: list[int]
    tokens: list[int]
    finish_reason: str
    ttft_s: float | None
    inter_token_s: list[float]
    num_preemptions: int
    latency_s: float | None = None
    error: str | None = None  # why a request finished with "error"


@dataclasses.dataclass
class EngineStats:
    """Counters of one engine over its lifetime; ``timeline`` rows are ``(t_s, batch, used_bytes, physical_bytes)``."""

    steps: int = 0
    schedule_s: float = 0.0  # host time in the scheduler (includes mapping on the critical path)
    map_ahead_s: float = 0.0  # time spent mapping ahead (overlapped with the device when enabled)
    peak_batch: int = 0
    peak_used_bytes: int = 0
    peak_physical_bytes: int = 0
    timeline: list[tuple[float, int, int, int]] = dataclasses.field(default_factory=list)

    def summary(self, outputs: list[RequestOutput], wall_s: float) -> dict:
        """A run's figures: throughput, TTFT and time-between-tokens percentiles, batch, KV memory, counters."""
        ttft = [o.ttft_s for o in outputs if o.ttft_s is not None]
        tbt = [x for o in outputs for x in o.inter_token_s]
        n_out = sum(len(o.tokens) for o in outputs)
        pct = lambda xs, q: float(np.percentile(xs, q)) if xs else float("nan")  # noqa: E731
        steps = max(self.steps, 1)
        return dict(
            requests=len(outputs), completed=sum(o.finish_reason == "length" for o in outputs), wall_s=wall_s,
            requests_per_s=len(outputs) / wall_s, output_tokens_per_s=n_out / wall_s,
            ttft_p50_s=pct(ttft, 50), ttft_p99_s=pct(ttft, 99), tbt_p50_s=pct(tbt, 50), tbt_p99_s=pct(tbt, 99),
            peak_batch=self.peak_batch, peak_used_kv_bytes=self.peak_used_bytes,
            peak_physical_kv_bytes=self.peak_physical_bytes, steps=self.steps,
            schedule_ms_per_step=self.schedule_s / steps * 1e3, map_ahead_ms_per_step=self.map_ahead_s / steps * 1e3,
            preemptions=sum(o.num_preemptions for o in outputs),
            failed=sum(o.finish_reason == "error" for o in outputs))


def _bucket(n: int, cap: int, floor: int = 1) -> int:
    return min(cap, max(floor, 1 << max(0, (n - 1).bit_length())))


class LLM:
    """Continuous batching of a ``models`` Llama-family model on a vAttention (or baseline) KV cache."""

    def __init__(self, model, *, kv_cache: str = "vattention", max_batch: int = 8, max_seq: int = 2048,
                 dtype: str | None = None, pool_bytes: int | None = None, page_bytes: int | None = None,
                 page_size: int = 16, token_budget: int = 256, chunk_size: int = 128, max_prefill_rows: int = 4,
                 admission_headroom: int = 16, attn=None, overlap_allocation: str | bool = "thread",
                 lookahead: int = 0, deferred_reclaim: bool = True, best_fit: bool = True, premap: bool = False,
                 min_decode_bucket: int = 1, min_prefill_bucket: int = 1):
        from flax import nnx

        import models
        from models.attention import AttentionSpec

        if kv_cache not in KV_CACHES:
            raise ValueError(f"kv_cache must be one of {KV_CACHES}, got {kv_cache!r}")
        if isinstance(overlap_allocation, bool):
            overlap_allocation = "thread" if overlap_allocation else "off"
        if overlap_allocation not in OVERLAP_MODES:
            raise ValueError(f"overlap_allocation must be one of {OVERLAP_MODES}, got {overlap_allocation!r}")
        if isinstance(lookahead, bool) or not isinstance(lookahead, int) or lookahead < 0:
            raise ValueError(f"lookahead must be an int >= 0, got {lookahead!r}")
        if premap and kv_cache != "vattention":
            raise ValueError("premap applies to the vattention cache only")
        self.model = model
        cfg = model.config
        dtype = dtype or jnp.dtype(jax.tree.leaves(model)[0].dtype).name
        self.pool = self._make_pool(kv_cache, cfg, max_batch, max_seq, dtype, pool_bytes, page_bytes, page_size,
                                    deferred_reclaim)
        self.kv_cache = kv_cache
        if premap:
            self.pool.premap()
        self.scheduler = Scheduler(self.pool, SchedulerConfig(
            max_batch=min(max_batch, self.pool.max_batch), token_budget=token_budget, chunk_size=chunk_size,
            admission_headroom=admission_headroom, best_fit=best_fit, max_prefill_rows=max_prefill_rows))
        platform = getattr(getattr(self.pool, "manager", None), "device", None)
        platform = platform.platform if platform is not None else models.attention.default_platform()
        self.attn = (attn or AttentionSpec()).resolve(dtype, cfg.head_dim, platform)
        self.overlap_allocation = overlap_allocation
        self.lookahead = lookahead
        self.min_decode_bucket = min_decode_bucket
        self.min_prefill_bucket = min_prefill_bucket
        self.stats = EngineStats()
        self._graphdef, self._params = nnx.split(model)
        self._shapes: set[tuple] = set()
        self._next_id = 0
        self._executor = None  # the map-ahead thread, started on first use
        donate = ("cache",) if self.pool.donate else ()
        self._step = jax.jit(self._forward, static_argnames=("graphdef", "segments", "mode"), donate_argnames=donate)

    @staticmethod
    def _make_pool(kind, cfg, max_batch, max_seq, dtype, pool_bytes, page_bytes, page_size, deferred_reclaim):
        import models

        from ..manager import KVCacheManager, default_device
        from .kv_pools import StaticPool, VAttentionPool

        shape = dict(num_layers=cfg.num_layers, max_batch=max_batch, max_seq=max_seq, kv_heads=cfg.num_kv_heads,
                     head_dim=cfg.head_dim, dtype=dtype, pool_bytes=pool_bytes)
        if kind == "vattention":
            extra = {k: v for k, v in (("pool_bytes", pool_bytes), ("page_bytes", page_bytes)) if v is not None}
            manager = KVCacheManager(models.cache_config_for(cfg, max_batch=max_batch, max_seq=max_seq, dtype=dtype,
                                                             **extra))
            return VAttentionPool(manager, deferred_reclaim=deferred_reclaim)
        if kind == "static":
            return StaticPool(**shape, device=default_device())
        from models.paged_cache import PagedKVPool

        return PagedKVPool(**shape, page_size=page_size, device=default_device())

    @property
    def manager(self):
        """The ``KVCacheManager`` of a vAttention engine."""
        return self.pool.manager

    # -- one step --------------------------------------------------------------
    def _forward(self, graphdef, params, cache, tokens, positions, logit_index, temperature, top_k, top_p, seeds,
                 counts, *, segments, mode):
        from flax import nnx

        model = nnx.merge(graphdef, params)
        logits, cache = model.forward_segments(tokens, positions, cache, segments, attn=self.attn,
                                               logit_index=logit_index)  # [R, V]
        next_tokens = sample_rows(logits.astype(jnp.float32), temperature, top_k, top_p, seeds, counts, mode)
        return next_tokens, (cache if self.pool.donate else cache.state)

    def _dispatch(self, out: SchedulerOutput):
        """Lay the step out, dispatch it (asynchronously); returns ``(chunks, next_tokens [R])``."""
        cap = self.scheduler.config.max_batch
        groups = []  # (chunks, rows, T)
        if out.decodes:
            groups.append((out.decodes, _bucket(len(out.decodes), cap, self.min_decode_bucket), 1))
        if out.prefills:
            t = _bucket(max(c.num_tokens for c in out.prefills), self.scheduler.config.chunk_size,
                        self.min_prefill_bucket)
            groups.append((out.prefills, _bucket(len(out.prefills), self.scheduler.config.max_prefill_rows), t))
        rows = sum(g[1] for g in groups)
        n_tok = sum(g[1] * g[2] for g in groups)
        pad_slot = (out.decodes or out.prefills)[0].request.slot  # padding rows: count 0 on a live slot
        slots = np.full(rows, pad_slot, np.int32)
        starts, counts = np.zeros(rows, np.int32), np.zeros(rows, np.int32)
        tokens, positions = np.zeros(n_tok, np.int32), np.zeros(n_tok, np.int32)
        logit_index = np.zeros(rows, np.int32)
        temperature, top_p = np.zeros(rows, np.float32), np.ones(rows, np.float32)
        top_k, seeds, n_out = np.zeros(rows, np.int32), np.zeros(rows, np.int32), np.zeros(rows, np.int32)
        segments, chunks, row, off = [], [], 0, 0
        for group, n_rows, t in groups:
            segments.append((row, row + n_rows, t))
            for i, c in enumerate(group):
                r, b, o = c.request, row + i, off + i * t
                tokens[o:o + c.num_tokens] = r.token_slice(c.start, c.num_tokens)
                positions[o:o + c.num_tokens] = np.arange(c.start, c.start + c.num_tokens)
                slots[b], starts[b], counts[b] = r.slot, c.start, c.num_tokens
                logit_index[b] = o + c.num_tokens - 1
                p = r.params
                temperature[b], top_k[b], top_p[b] = p.temperature, p.top_k, p.top_p
                seeds[b], n_out[b] = p.seed, len(r.output)
                chunks.append((b, c))
            row, off = row + n_rows, off + n_rows * t
        mode = sampling_mode([c.request.params for _, c in chunks])
        segments = tuple(segments)
        self._shapes.add((segments, mode))
        cache = self.pool.cache(slots, starts, counts)
        # host arrays go straight in: jit's C++ fast path transfers them (the step has no effects)
        next_tokens, exported = self._step(self._graphdef, self._params, cache, tokens, positions, logit_index,
                                           temperature, top_k, top_p, seeds, n_out, segments=segments, mode=mode)
        self.pool.adopt(exported)
        return chunks, next_tokens

    def _map_ahead(self, chunks) -> None:
        """Map what each row's next step will write: overlapped (and eager) allocation.

        Runs while the dispatched step executes; the scheduler's own grow for
        the next step then finds the pages mapped. A full pool is left to the
        scheduler (which preempts); a finished row's pages are reused
        (deferred reclamation) or unmapped by ``free``.
        """
        t0 = time.perf_counter()
        for _, c in chunks:
            r = c.request
            done = c.start + c.num_tokens
            if c.samples:
                if len(r.output) + 1 >= r.params.max_tokens:
                    continue  # finishes with this step's sample
                target = min(done + 1 + self.lookahead, len(r.prompt) + r.params.max_tokens - 1)
            else:  # the next prefill chunk
                target = min(r.num_tokens, done + self.scheduler.config.chunk_size + self.lookahead)
            try:
                self.pool.grow(r.slot, min(target, self.pool.max_seq))
            except (PoolExhaustedError, BackendError):
                break  # the scheduler retries this grow and handles the failure
        self.stats.map_ahead_s += time.perf_counter() - t0

    def _run(self, out: SchedulerOutput) -> dict[int, int]:
        chunks, next_tokens = self._dispatch(out)
        future = None
        if self.overlap_allocation == "thread":
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="vattn-map-ahead")
            future = self._executor.submit(self._map_ahead, chunks)
        elif self.overlap_allocation == "inline":
            self._map_ahead(chunks)
        try:
            next_tokens = np.asarray(next_tokens)  # waits for the device
        except BaseException:
            if future is not None:
                concurrent.futures.wait([future])  # the pool is the scheduler's again; keep the step's error
            raise
        if future is not None:
            future.result()
        self.pool.check_errors()  # a write refused on the GPU never passes silently
        return {c.request.request_id: int(next_tokens[b]) for b, c in chunks if c.samples}

    # -- public ------------------------------------------------------------------
    def step_shapes(self) -> list[tuple]:
        """Every row-group layout the bucketing can produce."""
        c = self.scheduler.config
        decode = sorted({_bucket(n, c.max_batch, self.min_decode_bucket) for n in range(1, c.max_batch + 1)})
        rows = sorted({_bucket(n, c.max_prefill_rows) for n in range(1, c.max_prefill_rows + 1)})
        chunk = sorted({_bucket(n, c.chunk_size, self.min_prefill_bucket) for n in range(1, c.chunk_size + 1)})
        layouts = [((0, d, 1),) for d in decode]
        for d in [0, *decode]:
            layouts += [((0, d, 1), (d, d + p, t))[1 if d == 0 else 0:] for p in rows for t in chunk]
        return layouts

    def warmup(self, modes=("greedy",), *, compile_threads: int = 1) -> float:
        """Compile every step shape (``step_shapes`` x ``modes``) now, so timed runs never compile; returns seconds.

        Shapes are lowered one by one, compiled on ``compile_threads`` threads
        (XLA compiles outside the GIL), then run once each with padding rows
        only, which finds the compiled executables in jax's cache.
        """
        t0 = time.perf_counter()
        slot = self.pool.allocate(1)  # the jnp reference reads token 0 even at length 0: keep it backed
        try:
            jobs = [(segments, mode) for segments in self.step_shapes() for mode in modes]

            def args(segments):
                rows, n_tok = segments[-1][1], sum((r1 - r0) * t for r0, r1, t in segments)
                zi, zf = np.zeros(rows, np.int32), np.zeros(rows, np.float32)
                cache = self.pool.cache(np.full(rows, slot, np.int32), zi, zi)  # padding rows: nothing is written
                return (self._graphdef, self._params, cache, np.zeros(n_tok, np.int32), np.zeros(n_tok, np.int32),
                        zi, zf, zi, zf + 1, zi, zi)

            if compile_threads > 1 and len(jobs) > 1:
                lowered = [self._step.lower(*args(sg), segments=sg, mode=m) for sg, m in jobs]
                with concurrent.futures.ThreadPoolExecutor(compile_threads) as ex:
                    list(ex.map(lambda low: low.compile(), lowered))
            for segments, mode in jobs:
                tokens, exported = self._step(*args(segments), segments=segments, mode=mode)
                self.pool.adopt(exported)
                tokens.block_until_ready()
                self._shapes.add((segments, mode))
        finally:
            self.pool.free(slot)
        return time.perf_counter() - t0

    @property
    def num_compiled(self) -> int:
        """Distinct step shapes (row groups, sampling mode) compiled so far."""
        return len(self._shapes)

    def add_request(self, prompt, params: SamplingParams = SamplingParams()) -> Request:
        vocab = self.model.config.vocab_size
        prompt = [int(t) for t in prompt]
        if any(not 0 <= t < vocab for t in prompt):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        r = Request(self._next_id, prompt, params)
        self.scheduler.add(r)
        self._next_id += 1
        return r

    def step(self) -> list[Request]:
        """Run one iteration; returns the requests that finished in it."""
        t0 = time.perf_counter()
        out = self.scheduler.schedule()
        self.stats.schedule_s += time.perf_counter() - t0
        if out.empty:
            if out.failed:
                return out.failed
            raise RuntimeError("the scheduler made no progress (pool too small for any waiting request)")
        sampled = self._run(out)
        now = time.perf_counter()
        finished = out.failed + self.scheduler.update(out, sampled, now)
        s = self.stats
        s.steps += 1
        used, physical = self.pool.memory()
        s.peak_batch = max(s.peak_batch, len(out.decodes) + len(out.prefills))
        s.peak_used_bytes, s.peak_physical_bytes = max(s.peak_used_bytes, used), max(s.peak_physical_bytes, physical)
        s.timeline.append((now, len(out.decodes) + len(out.prefills), used, physical))
        return finished

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] = SamplingParams(), *,
                 progress: bool = False) -> list[RequestOutput]:
        """Run every prompt to completion; outputs in request order. ``progress`` shows a tqdm bar."""
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} SamplingParams")
        requests = []
        try:
            for prompt, p in zip(prompts, params):
                requests.append(self.add_request(prompt, p))
        except BaseException:
            for r in requests:
                self.scheduler.cancel(r.request_id)
            raise
        from tqdm.auto import tqdm

        try:
            with tqdm(total=len(requests), disable=not progress, desc="requests", unit="req",
                      mininterval=2.0) as bar:
                while self.scheduler.has_unfinished():
                    bar.update(len(self.step()))
        except BaseException:
            for r in requests:  # leave no request queued and no slot held behind the exception
                if not r.finished:
                    self.scheduler.cancel(r.request_id)
            raise
        return [RequestOutput(r.request_id, r.prompt, r.output, r.finish_reason, r.ttft, r.inter_token_times,
                              r.num_preemptions, None if r.finish_time is None else r.finish_time - r.arrival_time,
                              r.error if r.finish_reason == "error" else None)
                for r in requests]

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        self.pool.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
