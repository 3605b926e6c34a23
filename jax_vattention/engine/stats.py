"""``EngineStats``: what the engine reports over a run (each request's ``RequestOutput`` is in ``outputs``)."""

from __future__ import annotations

import dataclasses

import numpy as np

from .outputs import RequestOutput

FINISHED_OK = ("length", "stop")  # a request that ended on its own (not cancelled, not failed)


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
    # Per dispatched step, host ``perf_counter`` times: when it was handed to the device, and the earliest time
    # the host saw its results ready (``device_idle_fraction``), in dispatch order.
    device_steps: list[tuple[float, float]] = dataclasses.field(default_factory=list)
    sync_fallback_steps: int = 0  # async scheduling: steps that waited for the step in flight first (penalties)
    drains: int = 0  # async scheduling: schedules that waited for the step in flight to free memory
    # prefix caching (``PrefixCache.stats``, refreshed every step): hit rate, tokens reused, cached pages
    prefix_cache: dict | None = None

    def record_device_step(self, dispatched: float, ready: float) -> None:
        self.device_steps.append((dispatched, ready))

    def device_idle_seconds(self, since: float | None = None) -> float | None:
        """Host-measured seconds the device had nothing dispatched: step i+1 dispatched after every earlier step's
        results were seen ready leaves it idle in between. A lower bound: a step's results may be ready before the
        host looks (with async scheduling the host looks before each schedule and dispatch; synchronously it waits
        for them). ``since``: only steps dispatched at or after that ``perf_counter`` time (a benchmark's timed
        part). None without any step."""
        steps = self._steps_since(since)
        return self._idle(steps) if steps else None

    def device_idle_fraction(self, since: float | None = None) -> float:
        """``device_idle_seconds`` over the wall time from the first dispatch to the last result (NaN without
        any step)."""
        steps = self._steps_since(since)
        if not steps:
            return float("nan")
        wall = max(r for _, r in steps) - steps[0][0]
        if wall <= 0:
            return 0.0
        return self._idle(steps) / wall

    def _steps_since(self, since: float | None) -> list[tuple[float, float]]:
        return sorted(s for s in self.device_steps if since is None or s[0] >= since)

    @staticmethod
    def _idle(steps: list[tuple[float, float]]) -> float:
        """Idle seconds between sorted, non-empty ``(dispatched, ready)`` steps."""
        idle, ready = 0.0, steps[0][1]
        for dispatched, r in steps[1:]:
            idle += max(0.0, dispatched - ready)
            ready = max(ready, r)
        return idle

    def record_step(self, now: float, batch: int, used: int, physical: int) -> None:
        self.steps += 1
        self.peak_batch = max(self.peak_batch, batch)
        self.peak_used_bytes = max(self.peak_used_bytes, used)
        self.peak_physical_bytes = max(self.peak_physical_bytes, physical)
        self.timeline.append((now, batch, used, physical))

    def summary(self, outputs: list[RequestOutput], wall_s: float) -> dict:
        """A run's figures: throughput, TTFT and time-between-tokens percentiles, batch, KV memory, counters.

        ``requests``/``completed``/``failed`` count prompts (a prompt with ``n > 1`` is completed when all its
        sequences are, failed when one is); output tokens and time between tokens cover every sequence.
        """
        ttft = [o.metrics.ttft_s for o in outputs if o.metrics.ttft_s is not None]
        tbt = [x for o in outputs for x in o.metrics.inter_token_s]
        n_out = sum(len(c.token_ids) for o in outputs for c in o.outputs)
        n_prompt = sum(len(o.prompt_token_ids) for o in outputs)

        def pct(xs: list[float], q: float) -> float:
            return float(np.percentile(xs, q)) if xs else float("nan")

        steps = max(self.steps, 1)
        return dict(
            requests=len(outputs),
            completed=sum(all(c.finish_reason in FINISHED_OK for c in o.outputs) for o in outputs), wall_s=wall_s,
            requests_per_s=len(outputs) / wall_s, output_tokens_per_s=n_out / wall_s,
            prompt_tokens=n_prompt, output_tokens=n_out, total_tokens_per_s=(n_prompt + n_out) / wall_s,
            ttft_p50_s=pct(ttft, 50), ttft_p99_s=pct(ttft, 99), tbt_p50_s=pct(tbt, 50), tbt_p99_s=pct(tbt, 99),
            peak_batch=self.peak_batch, peak_used_kv_bytes=self.peak_used_bytes,
            peak_physical_kv_bytes=self.peak_physical_bytes, steps=self.steps,
            schedule_ms_per_step=self.schedule_s / steps * 1e3, map_ahead_ms_per_step=self.map_ahead_s / steps * 1e3,
            device_idle_fraction=self.device_idle_fraction(),
            preemptions=sum(o.metrics.num_preemptions for o in outputs),
            failed=sum(any(c.finish_reason == "error" for c in o.outputs) for o in outputs),
            **(self.prefix_cache or {}))
