"""Prometheus metrics of the server (its own registry): requests, KV memory, tokens, TTFT and time between tokens."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..engine.async_llm import AsyncLLM, StreamDelta

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServerMetrics:
    def __init__(self, engine: AsyncLLM):
        self.engine = engine
        self.registry = r = CollectorRegistry()
        self.running = Gauge("vattn_requests_running", "requests holding a slot", registry=r)
        self.waiting = Gauge("vattn_requests_waiting", "requests queued", registry=r)
        self.kv_mapped = Gauge("vattn_kv_mapped_bytes", "KV bytes mapped into live slots", registry=r)
        self.kv_physical = Gauge("vattn_kv_physical_bytes", "KV bytes of physical pages held", registry=r)
        self.kv_reserved = Gauge("vattn_kv_reserved_bytes", "virtual KV bytes reserved", registry=r)
        self.tokens = Counter("vattn_generation_tokens", "tokens generated", registry=r)
        self.finished = Counter("vattn_requests_finished", "requests finished", ["reason"], registry=r)
        self.ttft = Histogram("vattn_time_to_first_token_seconds", "time to first token", buckets=LATENCY_BUCKETS,
                              registry=r)
        self.tbt = Histogram("vattn_time_between_tokens_seconds", "time between tokens", buckets=LATENCY_BUCKETS,
                             registry=r)
        self.prefix_hit_rate = Gauge("vattn_prefix_cache_hit_rate",
                                     "prompt tokens served from cached pages / prompt tokens looked up", registry=r)
        self.prefix_hit_tokens = Gauge("vattn_prefix_cache_hit_tokens", "prompt tokens not prefilled (reused)",
                                       registry=r)
        self.prefix_pages = Gauge("vattn_prefix_cache_pages", "pages in the prefix index", registry=r)
        self._start = time.perf_counter()

    def observe(self, delta: StreamDelta) -> None:
        self.tokens.inc(len(delta.token_ids))
        if delta.finished and delta.output is not None:
            metrics = delta.output.metrics
            self.finished.labels(delta.finish_reason or "unknown").inc()
            if metrics.ttft_s is not None:
                self.ttft.observe(metrics.ttft_s)
            for gap in metrics.inter_token_s:
                self.tbt.observe(gap)

    def render(self) -> bytes:
        llm = self.engine.llm
        self.running.set(len(llm.scheduler.running))
        self.waiting.set(len(llm.scheduler.waiting))
        used, physical = llm.pool.memory()
        self.kv_mapped.set(used)
        self.kv_physical.set(physical)
        manager = getattr(llm.pool, "manager", None)
        self.kv_reserved.set(manager.stats().reserved_bytes if manager is not None and not manager.closed else 0)
        prefix = llm.stats.prefix_cache or {}
        self.prefix_hit_rate.set(prefix.get("prefix_cache_hit_rate", 0.0))
        self.prefix_hit_tokens.set(prefix.get("prefix_cache_hit_tokens", 0))
        self.prefix_pages.set(prefix.get("prefix_cache_pages", 0))
        return generate_latest(self.registry)
