"""Continuous batching with Sarathi-Serve stall-free schedules on the vAttention cache.

Every iteration has a token budget. Running decodes go first and are never
paused (only preemption under memory pressure removes one); the rest of the
budget goes to prefill chunks, first of requests already running, then of
newly admitted ones. A request is admitted only when the page pool can hold its
tokens plus headroom. Pages are mapped here, on the host, before the step is
dispatched, so a step never fails for memory; when the pool runs out, the most
recently admitted request is preempted: its slot is freed and it is recomputed
later from its tokens. A backend fault while mapping (a failed ``cuMemCreate``
or ``cuMemMap``) preempts the request it hit, which is retried; after
``max_faults`` faults in a row the request finishes with reason ``"error"``.
No other request is touched either way.

The scheduler works on any ``KVPool`` (``jax_vattention.cache``: vAttention,
static or paged; wrap a ``KVCacheManager`` in a ``VAttentionPool``). The
pool answers with typed ``GrowResult`` values (done, out of pages, or a backend
fault), so no exception steers the schedule.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Mapping

from ..cache import GrowResult, KVPool
from ..errors import PoolExhaustedError
from ..sampling import TokenLogprobs
from .prefix_cache import PrefixCache
from .request import Request, Status


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    max_batch: int  # requests holding a slot at once (<= the cache's max_batch)
    token_budget: int = 512  # tokens per iteration: decodes + prefill chunks
    chunk_size: int = 512  # largest prefill chunk of one request in one iteration
    admission_headroom: int = 16  # tokens beyond a request's known tokens the pool must hold to admit it
    best_fit: bool = True  # reuse the free slot whose deferred pages best fit the request
    max_prefill_rows: int = 4  # prefill chunks per iteration (bounds the compiled shapes)
    max_faults: int = 3  # consecutive backend faults after which a request fails
    max_seq: int | None = None  # longest request (prompt + max_tokens); default: the pool's max_seq

    def __post_init__(self):
        for name in ("max_batch", "token_budget", "chunk_size", "max_prefill_rows", "max_faults"):
            if getattr(self, name) <= 0:
                raise ValueError(f"SchedulerConfig.{name} must be positive, got {getattr(self, name)}")
        if self.admission_headroom < 0:
            raise ValueError("SchedulerConfig.admission_headroom must be >= 0")


@dataclasses.dataclass(frozen=True)
class Chunk:
    """``num_tokens`` tokens of ``request`` starting at position ``start``.

    ``samples``: whether the chunk reaches the end of the request's tokens when it is scheduled, so a token is
    sampled (fixed then: with async scheduling the request's tokens grow while the chunk's step runs).
    """

    request: Request
    start: int
    num_tokens: int
    samples: bool = dataclasses.field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "samples", self.start + self.num_tokens == self.request.num_tokens)


class NeedsDrain(Exception):
    """``schedule(in_flight=True)`` would preempt for memory: the frees it needs wait for the step in flight.

    The engine reconciles that step (its slots are then free) and schedules again. ``failed``: requests the
    abandoned schedule already finished with ``"error"`` (backend faults), still to report.
    """

    def __init__(self, failed: list[Request]):
        super().__init__("the pool is full while a step is in flight")
        self.failed = failed


@dataclasses.dataclass
class SchedulerOutput:
    decodes: list[Chunk]
    prefills: list[Chunk]
    preempted: list[Request]
    failed: list[Request] = dataclasses.field(default_factory=list)  # finished with "error" (backend faults)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.decodes + self.prefills)

    @property
    def empty(self) -> bool:
        return not self.decodes and not self.prefills


class Scheduler:
    def __init__(self, pool: KVPool, config: SchedulerConfig, prefix: PrefixCache | None = None):
        if config.max_batch > pool.max_batch:
            raise ValueError(
                f"SchedulerConfig.max_batch={config.max_batch} exceeds the cache's max_batch={pool.max_batch}"
            )
        self.pool = pool
        self.config = config
        self.prefix = prefix  # prefix caching: cached full pages mapped into new slots (None: off)
        # Requests must fit the configured limit, not the page-rounded one the pool may have.
        self.max_seq = min(pool.max_seq, config.max_seq or pool.max_seq)
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []  # admission order
        self.num_preemptions = 0
        self.num_faults = 0
        # Async scheduling: slots that dispatched steps still write (count of steps), and slots released while
        # busy, freed once no step in flight writes them (the pool may unmap a freed slot's pages at once).
        self._busy: collections.Counter[int] = collections.Counter()
        self._deferred_frees: list[int] = []

    # -- queue -------------------------------------------------------------
    def add(self, request: Request) -> None:
        need = len(request.prompt) + request.params.max_tokens
        if not request.prompt:
            raise ValueError("the prompt is empty")
        if need > self.max_seq:
            raise ValueError(
                f"the prompt ({len(request.prompt)} tokens) + max_tokens ({request.params.max_tokens}) "
                f"exceeds max_seq={self.max_seq}"
            )
        if self.pool.pages_needed(need) > self.pool.pages_total():
            raise PoolExhaustedError(
                f"the prompt + max_tokens ({need} tokens) need {self.pool.pages_needed(need)} pages, more than "
                f"the whole pool ({self.pool.pages_total()} pages); it could never run"
            )
        request.status = Status.WAITING
        self.waiting.append(request)

    def cancel(self, request_id: int) -> bool:
        """Finish a request now, freeing its slot. Returns whether it was found unfinished."""
        for r in list(self.waiting) + self.running:
            if r.request_id == request_id:
                if r in self.waiting:
                    self.waiting.remove(r)
                else:
                    self._release(r)
                r.finish("cancelled", time.perf_counter())
                return True
        return False

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # -- one iteration -----------------------------------------------------
    def schedule(self, *, in_flight: bool = False) -> SchedulerOutput:
        """The next step. ``in_flight`` (async scheduling): a dispatched step's results are not applied yet, so
        requests may hold pending tokens (a decode of one takes it on the device), a request whose pending
        tokens reach ``max_tokens`` is not scheduled again, and memory pressure raises ``NeedsDrain`` instead of
        preempting (a slot a step in flight writes frees only after it)."""
        out = SchedulerOutput([], [], [])
        budget = self.config.token_budget
        # 1. Every running decode, never paused. Map its next token's page now.
        for r in list(self.running):
            if r.status is not Status.RUNNING or r.remaining != 1 or r.num_generated >= r.params.max_tokens:
                continue  # (the last: pending tokens reach max_tokens, it finishes when they arrive)
            if self._reserve(r, r.num_cached + 1, out, in_flight):
                out.decodes.append(Chunk(r, r.num_cached, 1))
        out.decodes = [c for c in out.decodes if c.request.status is Status.RUNNING]
        budget -= len(out.decodes)
        budget = self._fill(out, budget)
        # Only prefills hold the pool and none of them can take its next chunk (admission checks a request's
        # own tokens, not what the running prefills still need): preempt the newest until something runs.
        # (With a step in flight, applying its results makes progress first.)
        while out.empty and self.running and not out.failed and not in_flight:
            self._preempt(self.running[-1], out)
            budget = self._fill(out, budget)
        return out

    def _fill(self, out: SchedulerOutput, budget: int) -> int:
        """Steps 2 and 3 of ``schedule``: chunks of running prefills, then admissions. Returns the budget left."""
        # 2. Chunks of prefills already running.
        for r in list(self.running):
            if budget <= 0 or len(out.prefills) >= self.config.max_prefill_rows:
                break
            if r.status is not Status.RUNNING or r.remaining <= 1 or any(c.request is r for c in out.prefills):
                continue
            n = min(r.remaining, self.config.chunk_size, budget)
            if self._grow(r, r.num_cached + n, out):
                out.prefills.append(Chunk(r, r.num_cached, n))
                budget -= n
        # 3. Admit waiting requests, first come first served.
        while (budget > 0 and self.waiting and len(self.running) < self.config.max_batch
               and len(out.prefills) < self.config.max_prefill_rows):
            r = self.waiting[0]
            if r.num_pending:  # preempted while its step ran: its tokens are known when that step is applied
                break
            if not self._pool_can_hold(min(r.num_tokens + self.config.admission_headroom,
                                           len(r.prompt) + r.params.max_tokens)):
                break
            n = min(r.remaining, self.config.chunk_size, budget)
            alloc = self.pool.allocate(n if self.config.best_fit and self.prefix is None else 0)
            slot, result = alloc.slot, alloc.result
            if slot is not None and self.prefix is not None:  # map its cached prefix, then back its first chunk
                reused, result = self.prefix.admit(r, slot)
                if result.ok:
                    r.num_cached = reused
                    n = min(r.remaining, self.config.chunk_size, budget)
                    result = self.pool.grow(slot, reused + n)
                if not result.ok:
                    self.prefix.retire(r)  # r holds no slot yet: this only lets go of its cached pages
                    r.num_cached = 0
                    self.pool.free(slot)
            elif slot is not None and not self.config.best_fit:
                result = self.pool.grow(slot, n)
                if not result.ok:
                    self.pool.free(slot)
            if result.exhausted and self._evict_cached(self.pool.pages_needed(n)):
                continue  # unheld cached pages made room: try again
            if result.exhausted:
                break
            if not result.ok:
                if self._count_fault(r, result):
                    self.waiting.popleft()
                    self._fail(r, out)
                continue  # retry (bounded: every fault counts toward max_faults)
            assert slot is not None
            self.waiting.popleft()
            r.slot, r.status = slot, Status.RUNNING
            self.running.append(r)
            out.prefills.append(Chunk(r, r.num_cached, n))
            budget -= n
        return budget

    def update(self, out: SchedulerOutput, sampled: Mapping[int, int | tuple[int, TokenLogprobs]],
               now: float | None = None) -> list[Request]:
        """Record a finished step: advance caches, append sampled tokens. Returns requests that finished.

        ``sampled`` maps a request id to its token, or to ``(token, logprobs)`` when the request asked for logprobs.
        """
        now = time.perf_counter() if now is None else now
        finished = []
        for chunk in out.decodes + out.prefills:
            r = chunk.request
            if r.status is not Status.RUNNING:  # cancelled while the step ran
                continue
            r.num_cached = chunk.start + chunk.num_tokens
            if chunk.samples:
                r.num_faults = 0  # real progress: faults count again from zero
                value = sampled[r.request_id]
                token, logprobs = value if isinstance(value, tuple) else (value, None)
                r.append_token(token, now, logprobs)
                if r.finished:
                    self._release(r)
                    finished.append(r)
        self._commit_prefills(out)
        return finished

    def reconcile(self, out: SchedulerOutput, sampled: Mapping[int, int | tuple[int, TokenLogprobs]],
                  now: float | None = None, *, start: int = 0, progress: list[int] | None = None) -> list[Request]:
        """``update`` for async scheduling: apply a step whose caches were advanced when it was dispatched.

        Each sampling row's pending token becomes its sampled token. A request that finished (or was cancelled)
        since the step was dispatched drops it; one preempted since gets it (it was computed from its tokens),
        and leaves the queue if it finishes with it. Chunks from index ``start`` on; ``progress[0]`` counts the
        chunks applied (a failure part-way leaves the rest to the engine's rollback). Returns requests that
        finished.
        """
        now = time.perf_counter() if now is None else now
        finished = []
        chunks = out.decodes + out.prefills
        for i in range(start, len(chunks)):
            chunk = chunks[i]
            r = chunk.request
            if chunk.samples and r.status is not Status.FINISHED:
                r.num_faults = 0  # real progress: faults count again from zero
                value = sampled[r.request_id]
                token, logprobs = value if isinstance(value, tuple) else (value, None)
                r.num_pending -= 1
                r.append_token(token, now, logprobs)
                if r.finished:
                    if r in self.waiting:
                        self.waiting.remove(r)
                    self._release(r)
                    finished.append(r)
            elif chunk.samples:
                r.num_pending = max(0, r.num_pending - 1)
            if progress is not None:
                progress[0] = i + 1
        self._commit_prefills(out)
        return finished

    def _commit_prefills(self, out: SchedulerOutput) -> None:
        """Prefix caching: index the pages the step's prefill chunks filled, for requests admitted from now on."""
        if self.prefix is not None:
            for chunk in out.prefills:
                if chunk.request.status is Status.RUNNING:
                    self.prefix.commit(chunk.request)

    # -- slots that steps in flight write (async scheduling) ------------------
    def mark_busy(self, slots) -> None:
        """A dispatched step writes ``slots``: releasing one defers its ``free`` until ``mark_done``."""
        self._busy.update(int(s) for s in slots)

    def mark_done(self, slots) -> None:
        """A step that wrote ``slots`` has finished on the device: free the deferred slots nothing writes now."""
        self._busy.subtract(int(s) for s in slots)
        self._busy = +self._busy  # drop zero counts
        keep = []
        for slot in self._deferred_frees:
            if self._busy[slot] > 0:
                keep.append(slot)
            else:
                self.pool.free(slot)
        self._deferred_frees = keep

    @property
    def deferred_frees(self) -> tuple[int, ...]:
        """Slots released while a step in flight writes them, not yet returned to the pool."""
        return tuple(self._deferred_frees)

    # -- memory ------------------------------------------------------------
    def _pool_can_hold(self, tokens: int) -> bool:
        need = self.pool.pages_needed(min(tokens, self.pool.max_seq))
        return need <= self.pool.pages_total() - self.pool.pages_live()

    def _try_grow(self, r: Request, tokens: int, out: SchedulerOutput) -> bool | None:
        """Grow ``r``; True on success, False when the pool is full, None after a backend fault (handled)."""
        assert r.slot is not None
        result = self.pool.grow(r.slot, tokens)
        while result.exhausted and self._evict_cached(self.pool.pages_needed(max(1, tokens - r.num_cached))):
            result = self.pool.grow(r.slot, tokens)  # unheld cached pages made room
        if result.ok:
            return True
        if result.exhausted:
            return False
        if self._count_fault(r, result):
            self._release(r)
            self._fail(r, out)
        else:
            self._preempt(r, out)
        return None

    def _grow(self, r: Request, tokens: int, out: SchedulerOutput) -> bool:
        return bool(self._try_grow(r, tokens, out))

    def _count_fault(self, r: Request, result: GrowResult) -> bool:
        """Record a backend fault on ``r``; True when it has now failed too often to retry."""
        self.num_faults += 1
        r.num_faults += 1
        r.error = result.fault
        return r.num_faults >= self.config.max_faults

    @staticmethod
    def _fail(r: Request, out: SchedulerOutput) -> None:
        """Finish ``r`` with ``"error"`` (its slot already released); the engine reports it as done."""
        r.finish("error", time.perf_counter())
        out.failed.append(r)

    def _reserve(self, r: Request, tokens: int, out: SchedulerOutput, in_flight: bool = False) -> bool:
        """Map pages for a decode, preempting the newest requests until they fit (with a step in flight, raise
        ``NeedsDrain`` instead: the victims' pages would free only after it)."""
        while True:
            ok = self._try_grow(r, tokens, out)
            if ok is not False:
                return bool(ok)
            if in_flight:
                raise NeedsDrain(out.failed)
            victim = self.running[-1]
            self._preempt(victim, out)
            if victim is r:
                return False

    def _preempt(self, r: Request, out: SchedulerOutput) -> None:
        self._release(r)
        r.status, r.num_cached = Status.WAITING, 0  # recompute from its tokens later
        r.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(r)
        out.preempted.append(r)

    def _evict_cached(self, pages: int) -> bool:
        """Under pool pressure, unpin unheld cached pages worth ``pages``; whether any went."""
        return self.prefix is not None and self.prefix.evict(pages) > 0

    def _release(self, r: Request) -> None:
        if self.prefix is not None:
            self.prefix.retire(r)  # index its full pages before the slot goes
        if r.slot is not None:
            if self._busy[r.slot] > 0:
                self._deferred_frees.append(r.slot)
            else:
                self.pool.free(r.slot)
        r.slot = None
        if r in self.running:
            self.running.remove(r)
