"""``AsyncSteps``: the engine's async scheduling (``EngineConfig.async_scheduling``, off by default; vLLM's
``async_scheduling``). ``LLM.step`` then schedules, lays out and dispatches step t+1 while step t runs, and only
then reads step t's tokens:

* When step t is dispatched, its rows' caches advance at once and every
  sampling row gets a pending token (``Request.num_pending``): it counts in the
  request's length and in its sampling key's count, so step t+1 samples what
  the synchronous engine would. Step t+1's decode of a pending token takes its
  input on the device from step t's token slab (``ModelRunner.dispatch``: one
  slab shape for every step, so async steps run the executables the
  synchronous ones and warmup compiled), so the host never waits for the
  device between steps.
* Step t's results are applied one step late (``Scheduler.reconcile``): tokens,
  stop ids, stop strings, ``max_tokens``, detokenization and logprobs. A
  request that finished at step t was (unless its count already reached
  ``max_tokens``) scheduled again in step t+1: that token is dropped, and its
  slot is freed once step t+1 has run (a slot a step in flight writes is never
  freed under it, so its pages stay mapped). A request cancelled while a step
  runs drops its in-flight token the same way; one preempted (a backend fault
  while mapping) keeps it.
* Memory pressure: preemption frees pages only after the step in flight, so a
  schedule that would preempt first waits for step t (``NeedsDrain``), applies
  it and schedules synchronously; that step preempts what the synchronous
  engine would.
* Fallback to a synchronous step: a step in flight with a sampling row that has
  penalties (the next step needs the row's whole token history on the host)
  is waited for and applied before the next schedule. min_tokens (a count),
  logprobs (read with the step's tokens) and stop strings (an extra token is
  dropped) work one step late.
* Mapping ahead runs on the engine thread right after dispatch (it overlaps the
  device either way; a thread would race the scheduler for the pool).
* When nothing is left to run, the last step in flight is applied before
  ``step`` (or ``abort_request``) returns; an exception in a step, and
  ``close``, wait for the steps in flight and roll their requests back to
  before them (no request is lost, no slot stays held).
"""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import TYPE_CHECKING

import jax

from .model_runner import StepLayout, StepOutput
from .request import Request, Status
from .scheduler import NeedsDrain, SchedulerOutput

if TYPE_CHECKING:
    from .llm import LLM


@dataclasses.dataclass(eq=False)
class InFlight:
    """A step dispatched by async scheduling whose results are not applied yet."""

    out: SchedulerOutput
    step: StepLayout
    result: StepOutput  # device arrays
    dispatched: float  # perf_counter when it was handed to the device
    rows: dict[int, int]  # request id -> row, of the rows that sample
    slots: list[int]  # the slots it writes
    ready: float | None = None  # the earliest time the host saw its results ready
    applied: int = 0  # chunks whose results are applied (a failure part-way leaves the rest to roll back)
    advanced: bool = False  # its rows' caches advanced and pending tokens counted


class AsyncSteps:
    """The steps an ``LLM`` has in flight, oldest first, and how they are dispatched, applied and rolled back.

    It works on its engine's scheduler, runner, pool, map-ahead and stats (read from the engine each time: a
    caller may replace ``llm.stats``), under the engine's lock.
    """

    def __init__(self, llm: LLM):
        self.llm = llm
        self.in_flight: collections.deque[InFlight] = collections.deque()

    def __bool__(self) -> bool:
        """Whether a step is in flight."""
        return bool(self.in_flight)

    def step(self) -> list[Request]:
        """One async iteration (see the module's docstring); an exception rolls the steps in flight back."""
        try:
            return self._step()
        except BaseException:
            self.abandon()  # no request lost, no slot held behind the error
            raise

    def _step(self) -> list[Request]:
        llm = self.llm
        finished: list[Request] = []
        prev = self.in_flight[-1] if self.in_flight else None  # at most one step is in flight between calls
        self._poll_ready()
        if prev is not None and self._needs_sync(prev):
            llm.stats.sync_fallback_steps += 1
            finished += self._reconcile(prev)
            prev = None
        t0 = time.perf_counter()
        try:
            out = llm.scheduler.schedule(in_flight=prev is not None)
        except NeedsDrain as e:  # preemption would wait for the step in flight: apply it, then schedule
            assert prev is not None
            llm.stats.drains += 1
            finished += e.failed
            finished += self._reconcile(prev)
            prev = None
            out = llm.scheduler.schedule()
        llm.stats.schedule_s += time.perf_counter() - t0
        finished += out.failed
        if not out.empty:
            self._dispatch(out, prev)
        if prev is not None:
            finished += self._reconcile(prev)
        elif out.empty:
            if finished:
                return finished
            if not llm.scheduler.has_unfinished():
                return []
            raise RuntimeError("the scheduler made no progress (pool too small for any waiting request)")
        if self.in_flight and not llm.scheduler.has_unfinished():
            finished += self.drain()  # nothing left to schedule: settle the last step now
        return finished

    def _needs_sync(self, fl: InFlight) -> bool:
        """Whether the next step needs ``fl``'s tokens on the host: a sampling row with penalties (the history)."""
        return any(c.samples and c.request.params.has_penalties and not c.request.finished
                   for c in fl.out.decodes + fl.out.prefills)

    def _dispatch(self, out: SchedulerOutput, prev: InFlight | None) -> None:
        llm = self.llm
        step = llm.runner.layout(out, pending={} if prev is None else prev.rows)
        self._poll_ready()
        result = llm.runner.dispatch(step, None if prev is None else prev.result)
        fl = InFlight(out, step, result, time.perf_counter(),
                      rows={c.request.request_id: b for b, c in step.chunks if c.samples},
                      slots=[int(step.slots[b]) for b, _ in step.chunks])
        self.in_flight.append(fl)
        llm.scheduler.mark_busy(fl.slots)
        before = llm.map_ahead.seconds
        llm.map_ahead.map_now(step.chunks)  # while the step runs, before the rows advance (as in a sync step)
        llm.stats.map_ahead_s += llm.map_ahead.seconds - before
        for _, c in step.chunks:  # the rows advance now; sampled tokens are pending until reconciled
            c.request.num_cached = c.start + c.num_tokens
            if c.samples:
                c.request.num_pending += 1
        fl.advanced = True

    def _poll_ready(self) -> None:
        """Note the steps in flight whose results are ready (the idle-time estimate: the earliest sighting)."""
        for fl in self.in_flight:
            is_ready = getattr(fl.result.sampled.tokens, "is_ready", None)  # a jax.Array's (host arrays are ready)
            if fl.ready is None and (is_ready is None or is_ready()):
                fl.ready = time.perf_counter()

    def _reconcile(self, fl: InFlight) -> list[Request]:
        """Wait for the oldest step in flight and apply its results; returns the requests that finished."""
        llm = self.llm
        assert self.in_flight and self.in_flight[0] is fl, "steps are applied in dispatch order"
        host = jax.device_get(fl.result.sampled)  # waits for the device (tokens [R]; logprobs if the mode has them)
        now = time.perf_counter()
        fl.ready = now if fl.ready is None else fl.ready
        llm.pool.check_errors()  # a write refused on the GPU never passes silently
        sampled = llm._sampled_tokens(fl.step, host)
        progress = [fl.applied]
        try:
            finished = llm.scheduler.reconcile(fl.out, sampled, now, start=fl.applied, progress=progress)
        finally:
            fl.applied = progress[0]
        self.in_flight.popleft()
        llm.scheduler.mark_done(fl.slots)  # slots released while it ran are free now
        llm.stats.record_device_step(fl.dispatched, fl.ready)
        llm.stats.record_step(now, len(fl.step.chunks), *llm.pool.memory())
        return finished

    def drain(self) -> list[Request]:
        """Apply every step in flight (rolling back on an error); returns the requests that finished."""
        finished: list[Request] = []
        try:
            while self.in_flight:
                finished += self._reconcile(self.in_flight[0])
        except BaseException:
            self.abandon()
            raise
        return finished

    def abandon(self) -> None:
        """Wait for the steps in flight (ignoring their errors) and roll their unapplied rows back: caches to
        where the step started, pending tokens dropped (they are sampled again, with the same keys), slots
        released while they ran freed."""
        for fl in self.in_flight:
            try:
                jax.block_until_ready(fl.result.sampled)
            except BaseException:  # noqa: S110 - the step's own error is what the caller sees
                pass
        while self.in_flight:
            fl = self.in_flight.popleft()
            for c in (fl.out.decodes + fl.out.prefills)[fl.applied:] if fl.advanced else ():
                r = c.request
                if c.samples and r.num_pending:
                    r.num_pending -= 1
                if r.status is Status.RUNNING:
                    r.num_cached = min(r.num_cached, c.start)
            self.llm.scheduler.mark_done(fl.slots)
