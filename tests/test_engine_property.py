"""Property-based test of the engine's public API: a hypothesis state machine over one ``LLM``.

Operations, interleaved at random: ``add_request`` (good and bad prompts, greedy and seeded
sampling), ``step``, ``abort_request``, ``generate`` (which also drains what is queued), and
``close`` once at the end. Invariants, after every operation:

* every request ends exactly once, and ``step`` reports only newly finished requests;
* unfinished requests are queued or running, each exactly once, and the running ones hold the
  slots the cache reports as live;
* no operation crashes; bad input raises ``ValueError`` and changes nothing.

After the run: a sample of the requests that finished on their own equals one-request-at-a-time
generation with the same seeds (greedy up to near-ties, sampled exactly), a cancelled request's
tokens are a prefix of its solo run, and after ``close`` nothing is mapped, reserved or queued.
At least 2,000 operations run per CI run.
"""

import random

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

pytest.importorskip("flax")
import models  # noqa: E402
from jax_vattention.attention import AttentionSpec  # noqa: E402
from jax_vattention.engine import LLM, SamplingParams, Status  # noqa: E402
from jax_vattention.errors import CacheClosedError  # noqa: E402
from models.testing import assert_same_greedy  # noqa: E402

CFG = models.get_preset("tiny").replace(vocab_size=256)
# fp32 tiny model in the engine's default layout (both layers interleaved): 2 KiB per token, 2 tokens per 4 KiB
# page, one tensor. The longest request (30 + 20 tokens) holds 25 pages; the budget of 40 (80 tokens) holds one and
# a half, so four slots preempt under pressure, and nearly every token crosses a page.
ENGINE = dict(max_batch=4, max_seq=64, page_bytes=4096, pool_bytes=40 * 4096, token_budget=24, chunk_size=16,
              max_prefill_rows=2, min_decode_bucket=4, min_prefill_bucket=16,
              attn=AttentionSpec(impl="reference"))
STEPS, EXAMPLES = 50, 44  # about 2,100 operations; hypothesis ends some examples early, so the test repeats
CHECKED = 40  # requests compared with their one-at-a-time run
STATS = {"operations": 0, "requests": 0, "cancels": 0, "generate_calls": 0, "bad_inputs": 0, "steps": 0,
         "preemptions": 0}

prompts = st.lists(st.integers(0, CFG.vocab_size - 1), min_size=1, max_size=30)
params = st.builds(
    lambda n, hot, seed: SamplingParams(max_tokens=n, temperature=1.0 if hot else 0.0, top_k=40 if hot else 0,
                                        seed=seed),
    st.integers(1, 20), st.booleans(), st.integers(0, 2**20))


class EngineMachine(RuleBasedStateMachine):
    llm: LLM  # one engine for the whole run (its compiled steps are reused)
    finished: dict = {}  # request id -> (prompt, params, tokens, reason): everything that ended, over all examples

    def __init__(self):
        super().__init__()
        self.requests = []  # Request objects of this example
        self.ended: set[int] = set()

    def _op(self):
        STATS["operations"] += 1

    def _collect(self):
        """Record requests that ended (in ``step``, ``generate`` or by abort), once each."""
        for r in self.requests:
            if r.finished and r.request_id not in self.ended:
                self.ended.add(r.request_id)
                EngineMachine.finished[r.request_id] = (tuple(r.prompt), r.params, list(r.output), r.finish_reason)

    @rule(prompt=prompts, p=params)
    def add(self, prompt, p):
        self._op()
        self.requests.append(self.llm.add_request(prompt, p))
        STATS["requests"] += 1

    @rule(bad=st.sampled_from([[], [1.5, 2.0], [True, False], "12", [CFG.vocab_size], [-1], [1] * 70]))
    def add_bad(self, bad):
        self._op()
        before = (len(self.llm.scheduler.waiting), len(self.llm.scheduler.running))
        with pytest.raises(ValueError):
            self.llm.add_request(bad, SamplingParams(max_tokens=2))
        assert (len(self.llm.scheduler.waiting), len(self.llm.scheduler.running)) == before
        STATS["bad_inputs"] += 1

    @rule()
    def step(self):
        self._op()
        already = set(self.ended)
        done = self.llm.step()
        ids = [r.request_id for r in done]
        assert len(ids) == len(set(ids)) and not (set(ids) & already), "a request was reported twice"
        assert all(r.finished for r in done)
        STATS["steps"] += 1
        self._collect()

    @precondition(lambda self: any(not r.finished for r in self.requests))
    @rule(data=st.data())
    def abort(self, data):
        self._op()
        live = [r for r in self.requests if not r.finished]
        r = data.draw(st.sampled_from(live))
        assert self.llm.abort_request(r.request_id)
        assert r.finished and r.finish_reason == "cancelled" and r.slot is None
        assert not self.llm.abort_request(r.request_id)  # once
        STATS["cancels"] += 1
        self._collect()

    @rule(prompt=st.lists(st.integers(0, CFG.vocab_size - 1), min_size=30, max_size=30), seed=st.integers(0, 99))
    def pressure(self, prompt, seed):
        """Four of the longest requests at once (100 pages wanted of 40): running ones must be preempted as they
        grow, so every run covers preemption whatever else hypothesis draws."""
        self._op()
        for i in range(4):
            p = SamplingParams(max_tokens=20, temperature=0.0, seed=seed + i)
            self.requests.append(self.llm.add_request(prompt[i:] + prompt[:i], p))
        STATS["requests"] += 4
        for _ in range(3):
            self.step()

    @rule(batch=st.lists(st.tuples(prompts, params), min_size=1, max_size=3))
    def generate(self, batch):
        self._op()
        outs = self.llm.generate([p for p, _ in batch], [sp for _, sp in batch])
        assert [o.prompt_token_ids for o in outs] == [p for p, _ in batch]
        assert all(o.outputs[0].finish_reason in ("length", "stop") for o in outs)
        for o, (p, sp) in zip(outs, batch):
            assert len(o.outputs[0].token_ids) == sp.max_tokens or o.outputs[0].finish_reason == "stop"
            c = o.outputs[0]
            EngineMachine.finished[o.request_id] = (tuple(p), sp, list(c.token_ids), c.finish_reason)
        assert not self.llm.scheduler.has_unfinished()  # generate drains the queue too
        STATS["generate_calls"] += 1
        STATS["requests"] += len(batch)
        self._collect()

    @invariant()
    def books_balance(self):
        s = self.llm.scheduler
        queued = [r.request_id for r in s.waiting] + [r.request_id for r in s.running]
        assert len(queued) == len(set(queued)), "a request is queued twice"
        unfinished = {r.request_id for r in self.requests if not r.finished}
        assert unfinished == set(queued)
        assert all(r.status is Status.RUNNING and r.slot is not None for r in s.running)
        assert self.llm.manager.stats().live_slots == len(s.running)

    def teardown(self):
        for r in self.requests:  # leave the shared engine idle for the next example
            if not r.finished:
                self.llm.abort_request(r.request_id)
        STATS["preemptions"] = self.llm.scheduler.num_preemptions  # cumulative over the examples


EngineMachine.TestCase.settings = settings(max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None,
                                           suppress_health_check=list(HealthCheck))


def test_engine_api_state_machine(rng):
    model = models.random_model(CFG, seed=int(rng.integers(1000)), dtype=jnp.float32, init_std=0.2)
    STATS.update(dict.fromkeys(STATS, 0))
    EngineMachine.finished = {}
    with LLM(model, **ENGINE) as llm:
        llm.warmup(("greedy", "filter"))
        EngineMachine.llm = llm
        try:
            for _ in range(3):  # hypothesis ends some examples early: run again until 2,000 operations ran
                EngineMachine.TestCase().runTest()
                if STATS["operations"] >= 2000:
                    break
        finally:
            del EngineMachine.llm  # a class attribute would keep the engine (and its manager) alive to exit
        manager = llm.manager
    # close: nothing mapped, reserved or queued; every call refused
    assert manager.closed and manager.stats().reserved_bytes == 0 and manager.stats().pages_mapped == 0
    assert not llm.scheduler.has_unfinished()
    with pytest.raises(CacheClosedError):
        llm.add_request([1, 2], SamplingParams(max_tokens=2))
    for call in (llm.step, llm.warmup, lambda: llm.generate([[1]]), lambda: llm.abort_request(0)):
        with pytest.raises(CacheClosedError):
            call()
    llm.close()  # idempotent
    assert STATS["operations"] >= 2000, STATS

    # outputs equal one-request-at-a-time generation with the same seeds (a sample of them)
    ended = list(EngineMachine.finished.values())
    sample = random.Random(int(rng.integers(2**31))).sample(ended, min(CHECKED, len(ended)))
    with LLM(model, **{**ENGINE, "max_batch": 1}) as solo:
        want = {k: solo.generate([list(k[0])], k[1])[0].outputs[0].token_ids
                for k in {(p, sp) for p, sp, _, _ in sample}}
    greedy = [(p, got, want[(p, sp)]) for p, sp, got, reason in sample if sp.greedy and reason != "cancelled"]
    sampled = [(got, want[(p, sp)]) for p, sp, got, reason in sample if not sp.greedy and reason != "cancelled"]
    cancelled = [(got, want[(p, sp)]) for p, sp, got, reason in sample if reason == "cancelled"]
    assert_same_greedy([g for _, g, _ in greedy], [w for _, _, w in greedy], [list(p) for p, _, _ in greedy], model,
                       what="engine vs one at a time")
    assert all(got == w for got, w in sampled), "a seeded sampled request differs from its solo run"
    assert all(w[: len(got)] == got for got, w in cancelled), "a cancelled request is not a prefix of its solo run"
    print(f"engine state machine: {STATS}, finished={len(ended)}, checked={len(sample)} "
          f"(greedy {len(greedy)}, sampled {len(sampled)}, cancelled {len(cancelled)})")
    assert STATS["preemptions"] > 0 and STATS["cancels"] > 0 and STATS["bad_inputs"] > 0
    assert np.isfinite(len(ended))
