"""What the engine reports: ``RequestOutput`` per request and ``EngineStats`` over a run."""

from __future__ import annotations

import dataclasses

import numpy as np

from .request import Request

FINISHED_OK = ("length", "stop")  # a request that ended on its own (not cancelled, not failed)


@dataclasses.dataclass(frozen=True)
class RequestOutput:
    request_id: int
    prompt: list[int]
    tokens: list[int]
    finish_reason: str | None
    ttft_s: float | None
    inter_token_s: list[float]
    num_preemptions: int
    latency_s: float | None = None
    error: str | None = None  # why a request finished with "error"
    text: str | None = None  # the output's text, when the engine has a tokenizer (a stop string excluded)

    @classmethod
    def of(cls, r: Request) -> RequestOutput:
        return cls(r.request_id, r.prompt, r.output, r.finish_reason, r.ttft, r.inter_token_times,
                   r.num_preemptions, None if r.finish_time is None else r.finish_time - r.arrival_time,
                   r.error if r.finish_reason == "error" else None, r.text)


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

    def record_step(self, now: float, batch: int, used: int, physical: int) -> None:
        self.steps += 1
        self.peak_batch = max(self.peak_batch, batch)
        self.peak_used_bytes = max(self.peak_used_bytes, used)
        self.peak_physical_bytes = max(self.peak_physical_bytes, physical)
        self.timeline.append((now, batch, used, physical))

    def summary(self, outputs: list[RequestOutput], wall_s: float) -> dict:
        """A run's figures: throughput, TTFT and time-between-tokens percentiles, batch, KV memory, counters."""
        ttft = [o.ttft_s for o in outputs if o.ttft_s is not None]
        tbt = [x for o in outputs for x in o.inter_token_s]
        n_out = sum(len(o.tokens) for o in outputs)

        def pct(xs: list[float], q: float) -> float:
            return float(np.percentile(xs, q)) if xs else float("nan")

        steps = max(self.steps, 1)
        return dict(
            requests=len(outputs), completed=sum(o.finish_reason in FINISHED_OK for o in outputs), wall_s=wall_s,
            requests_per_s=len(outputs) / wall_s, output_tokens_per_s=n_out / wall_s,
            ttft_p50_s=pct(ttft, 50), ttft_p99_s=pct(ttft, 99), tbt_p50_s=pct(tbt, 50), tbt_p99_s=pct(tbt, 99),
            peak_batch=self.peak_batch, peak_used_kv_bytes=self.peak_used_bytes,
            peak_physical_kv_bytes=self.peak_physical_bytes, steps=self.steps,
            schedule_ms_per_step=self.schedule_s / steps * 1e3, map_ahead_ms_per_step=self.map_ahead_s / steps * 1e3,
            preemptions=sum(o.num_preemptions for o in outputs),
            failed=sum(o.finish_reason == "error" for o in outputs))
