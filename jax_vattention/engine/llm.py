"""An offline serving engine: ``LLM(model).generate(prompts, SamplingParams)``.

Each iteration the scheduler picks running decodes plus prefill chunks within
the token budget (mapping their pages on the host first); the engine packs
them into one hybrid batch ``tokens [B, T]`` with per-row counts (1 for a
decode, up to ``chunk_size`` for a prefill chunk) and runs one jitted
prefill-style step on the vAttention cache. B and T are bucketed to powers of
two, so a long run compiles a bounded number of shapes (``num_compiled``).

With ``overlap_allocation`` (the default), the pages each row's next decode
needs are mapped while the current step runs on the device (vAttention's
overlapped allocation; JAX dispatch is asynchronous, so no thread is needed).

Sampling is per request and reproducible: the key of a request's n-th token is
``fold_in(PRNGKey(params.seed), n)``, whatever batch it lands in and whether
it was preempted and recomputed.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from ..manager import KVCacheManager
from .request import Request, SamplingParams
from .scheduler import Scheduler, SchedulerConfig, SchedulerOutput


@dataclasses.dataclass(frozen=True)
class RequestOutput:
    request_id: int
    prompt: list[int]
    tokens: list[int]
    finish_reason: str
    ttft_s: float | None
    inter_token_s: list[float]
    num_preemptions: int


def _bucket(n: int, cap: int) -> int:
    return min(cap, 1 << max(0, (n - 1).bit_length()))


class LLM:
    """Continuous batching of a ``models`` Llama-family model on a vAttention cache."""

    def __init__(self, model, *, max_batch: int = 8, max_seq: int = 2048, dtype: str | None = None,
                 pool_bytes: int | None = None, page_bytes: int | None = None, token_budget: int = 256,
                 chunk_size: int = 128, admission_headroom: int = 16, attn=None, overlap_allocation: bool = True):
        import models  # the model package ships with jax_vattention
        from models.attention import AttentionSpec

        self.model = model
        cfg = model.config
        dtype = dtype or jnp.dtype(jax.tree.leaves(model)[0].dtype).name
        extra = {k: v for k, v in (("pool_bytes", pool_bytes), ("page_bytes", page_bytes)) if v is not None}
        self.manager = KVCacheManager(models.cache_config_for(cfg, max_batch=max_batch, max_seq=max_seq, dtype=dtype,
                                                              **extra))
        self.scheduler = Scheduler(self.manager, SchedulerConfig(
            max_batch=max_batch, token_budget=token_budget, chunk_size=chunk_size,
            admission_headroom=admission_headroom))
        self.attn = (attn or AttentionSpec()).resolve(dtype, cfg.head_dim, self.manager.device.platform)
        self.overlap_allocation = overlap_allocation
        self._shapes: set[tuple[int, int]] = set()
        self._next_id = 0
        self._step = jax.jit(self._forward, static_argnames=("graphdef",))

    # -- one hybrid step ---------------------------------------------------
    def _forward(self, graphdef, params, cache, tokens, counts):
        from flax import nnx

        from models.decode import prefill

        model = nnx.merge(graphdef, params)
        logits, cache = prefill(model, tokens, counts, cache, self.attn)  # pages are already mapped
        return logits, cache.state

    def _run(self, out: SchedulerOutput) -> dict[int, int]:
        from flax import nnx

        chunks = out.decodes + out.prefills
        B = _bucket(len(chunks), self.scheduler.config.max_batch)
        T = _bucket(max(c.num_tokens for c in chunks), self.scheduler.config.chunk_size)
        self._shapes.add((B, T))
        tokens = np.zeros((B, T), np.int32)
        counts = np.zeros(B, np.int32)
        slots = np.full(B, chunks[0].request.slot, np.int32)  # padding rows: count 0 on a live slot
        starts = np.full(B, chunks[0].start, np.int32)
        for i, c in enumerate(chunks):
            tokens[i, : c.num_tokens] = c.request.tokens[c.start : c.start + c.num_tokens]
            counts[i], slots[i], starts[i] = c.num_tokens, c.request.slot, c.start
        cache = self.manager.cache(slots, starts)
        graphdef, params = nnx.split(self.model)
        logits, _ = self._step(graphdef, params, cache, jnp.asarray(tokens), jnp.asarray(counts))
        if self.overlap_allocation:
            self._map_next_step(chunks)  # while the step runs on the device (dispatch is asynchronous)
        logits = np.asarray(logits)
        sampled = {}
        for i, c in enumerate(chunks):
            if c.samples:
                sampled[c.request.request_id] = self._sample(logits[i], c.request)
        return sampled

    def _map_next_step(self, chunks) -> None:
        """Overlapped allocation: map the page each sampling row's next decode will need.

        Runs between dispatching step t and reading its results, so the mapping
        work hides behind the device; the scheduler's own grow for step t+1 then
        finds the pages mapped. A row that finishes keeps the page for the next
        request (deferred reclamation); a full pool is left to the scheduler.
        """
        from ..errors import PoolExhaustedError

        for c in chunks:
            r = c.request
            if not c.samples or len(r.output) + 1 >= r.params.max_tokens:
                continue
            try:
                self.manager.grow(r.slot, min(c.start + c.num_tokens + 1, self.manager.max_seq))
            except PoolExhaustedError:
                return

    @staticmethod
    def _sample(logits: np.ndarray, r: Request) -> int:
        p = r.params
        if p.temperature == 0:
            return int(np.argmax(logits))
        from models.sampling import SamplingConfig, filter_logits

        cfg = SamplingConfig(temperature=p.temperature, top_k=p.top_k, top_p=p.top_p)
        key = jax.random.fold_in(jax.random.PRNGKey(p.seed), len(r.output))
        return int(jax.random.categorical(key, filter_logits(jnp.asarray(logits)[None], cfg)[0]))

    # -- public ------------------------------------------------------------
    @property
    def num_compiled(self) -> int:
        """Distinct (batch, chunk) shapes the step has been compiled for."""
        return len(self._shapes)

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] = SamplingParams()) -> list[RequestOutput]:
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} SamplingParams")
        vocab = self.model.config.vocab_size
        requests = []
        for prompt, p in zip(prompts, params):
            prompt = [int(t) for t in prompt]
            if any(not 0 <= t < vocab for t in prompt):
                raise ValueError(f"prompt token ids must be in [0, {vocab})")
            requests.append(Request(self._next_id, prompt, p))
            self._next_id += 1
        for r in requests:
            self.scheduler.add(r)
        while self.scheduler.has_unfinished():
            out = self.scheduler.schedule()
            if out.empty:
                raise RuntimeError("the scheduler made no progress (pool too small for any waiting request)")
            sampled = self._run(out)
            self.scheduler.update(out, sampled, time.perf_counter())
        return [RequestOutput(r.request_id, r.prompt, r.output, r.finish_reason, r.ttft, r.inter_token_times,
                              r.num_preemptions) for r in requests]

    def close(self) -> None:
        self.manager.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
