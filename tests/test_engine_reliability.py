"""Engine reliability (issue 6): injected backend faults, concurrent API calls, clean shutdown, a long run.

* Fault injection: ``manager._inject_failures`` makes the next page creations /
  mappings raise ``BackendError``. A transient fault preempts the request it
  hit, which is recomputed with exactly the same greedy tokens; a persistent
  fault fails only the request it hits (``finish_reason == "error"``) after
  ``SchedulerConfig.max_faults`` faults in a row. After every run the manager's
  books balance and agree with the address space (``/proc/self/maps``), and
  after ``close()`` nothing is mapped or reserved.
* Concurrency: ``overlap_allocation="thread"`` maps pages on the
  ``vattn-map-ahead`` thread while other Python threads hammer the same manager
  (stats, capacity, their own slots' allocate / grow / write / free, trim). Run
  in a subprocess with a timeout, so a deadlock fails instead of hanging.
* Shutdown: ``close()`` stops the map-ahead thread; exiting without ``close()``
  is quick, with exit status 0 and nothing on stderr.
* ``benchmarks/long_run.py`` on a few hundred requests.

Three tests pin engine bugs these tests found and that were then fixed: a
fault at admission with nothing running, a persistent fault on a request whose
recompute takes several chunks, and an exception out of a step leaving
requests queued and slots held.

The fault tests share one engine (one set of compiled step shapes); each test
leaves it idle and consistent, which the next test checks again.
"""

from __future__ import annotations

import collections
import contextlib
import importlib.util
import json
import math
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("flax")
import models  # noqa: E402
from jax_vattention.attention import AttentionSpec  # noqa: E402
from jax_vattention.engine import SamplingParams  # noqa: E402
from jax_vattention.engine.llm import LLM  # noqa: E402
from jax_vattention.engine.request import Status  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def load_long_run():
    spec = importlib.util.spec_from_file_location("long_run", ROOT / "benchmarks" / "long_run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


LONG_RUN = load_long_run()  # benchmarks/long_run.py: the script under test, and its address-space helpers
tensor_ranges, pool_bytes_mapped = LONG_RUN.tensor_ranges, LONG_RUN.mapped_in
REF = AttentionSpec(impl="reference")
CPU = jax.devices("cpu")[0]
# 8 tokens a page for the tiny preset in fp32 (2 kv heads x 64 x 4 bytes = 512 bytes a token): requests cross
# pages every few steps, so a run maps pages all the time. The decode bucket is pinned to the batch (few compiled
# shapes: the fault tests share one engine).
ENGINE_KW = dict(max_batch=4, max_seq=256, attn=REF, page_bytes=4096, token_budget=64, chunk_size=32,
                 max_prefill_rows=2, min_decode_bucket=4)
# What the fault tests injected (that fired) and lost; checked and printed by test_fault_summary.
FAULTS = collections.Counter()


# -- shared engine and workload ---------------------------------------------------
@pytest.fixture(scope="module")
def model():
    with jax.default_device(CPU):
        return models.random_model(models.get_preset("tiny"), seed=1, dtype=jnp.float32, init_std=0.2)


def workload(seed, n=12, prompt=(4, 60), out=(8, 30)):
    rng = np.random.default_rng(seed)
    ps = [rng.integers(0, 512, size=int(rng.integers(*prompt))).tolist() for _ in range(n)]
    return ps, [SamplingParams(max_tokens=int(m)) for m in rng.integers(*out, size=n)]


PROMPTS, PARAMS = workload(0)


class FaultHarness:
    """Arms injected faults at chosen points of a run and counts those that fire.

    Wraps (on the instances only) the pool's ``grow`` / ``allocate`` (count the
    backend faults they report to the engine as typed results; per-request
    "poisoned" mappings), the scheduler's ``schedule`` and the engine's
    map-ahead pass (``llm.map_ahead._map``; faults armed
    for one scheduling pass or one map-ahead pass, disarmed after it, so they
    land where intended). Wrapping changes no behaviour.
    """

    def __init__(self, llm):
        self.llm, self.m, self.sched, self.pool = llm, llm.manager, llm.scheduler, llm.pool
        self.poisoned: set[int] = set()  # request ids whose every page mapping fails
        self.plan: dict[tuple[int, str], tuple[int, int]] = {}  # (step, "schedule"|"map_ahead") -> (creates, maps)
        self.step_no = 0
        self.fired = 0  # backend faults reported to the engine (each is one injected fault that fired)
        self.fired_in_map_ahead = 0
        grow, allocate, schedule = self.pool.grow, self.pool.allocate, self.sched.schedule
        map_ahead = llm.map_ahead._map

        def counted(fn, who):
            def call(*args):
                r = who(*args)
                armed = r is not None and r.request_id in self.poisoned
                if armed:
                    self.m._inject_failures(maps=1)
                try:
                    out = fn(*args)
                finally:
                    if armed:
                        self.m._inject_failures(0, 0)
                result = getattr(out, "result", out)  # an Allocation carries its GrowResult
                if result.fault is not None:
                    self.fired += 1
                return out
            return call

        self.pool.grow = counted(grow, lambda slot, tokens: next((r for r in self.sched.running if r.slot == slot),
                                                                  None))
        self.pool.allocate = counted(allocate, lambda *a: self.sched.waiting[0] if self.sched.waiting else None)

        def armed_schedule():
            with self.armed("schedule"):
                return schedule()

        def armed_map_ahead(chunks):
            before = self.fired
            with self.armed("map_ahead"):
                map_ahead(chunks)
            self.fired_in_map_ahead += self.fired - before

        self.sched.schedule, llm.map_ahead._map = armed_schedule, armed_map_ahead

    @contextlib.contextmanager
    def armed(self, where):
        faults = self.plan.get((self.step_no, where))
        if faults:
            self.m._inject_failures(*faults)
        try:
            yield
        finally:
            if faults:
                self.m._inject_failures(0, 0)

    def drive(self, prompts, params, *, before_step=None, max_steps=2000):
        """``add_request`` + ``step()`` until done (``max_steps`` catches a livelock); returns the requests."""
        reqs = [self.llm.add_request(p, s) for p, s in zip(prompts, params)]
        self.step_no = 0
        while self.sched.has_unfinished():
            assert self.step_no < max_steps, f"no termination after {max_steps} steps (livelock)"
            if before_step is not None:
                before_step(self.step_no, reqs)
            self.llm.step()
            self.step_no += 1
        return reqs

    def reset(self):
        """Idle again whatever a test did: nothing armed or poisoned, nothing queued."""
        self.plan.clear()
        self.poisoned.clear()
        self.m._inject_failures(0, 0)
        for r in [*self.sched.waiting, *self.sched.running]:
            self.sched.cancel(r.request_id)


@pytest.fixture(scope="module")
def engine(model):
    with jax.default_device(CPU):
        llm = LLM(model, **ENGINE_KW)  # overlap_allocation="thread" (the default)
        harness = FaultHarness(llm)
        try:
            yield harness
        finally:
            llm.close()


@pytest.fixture(scope="module")
def baseline(engine):
    """Fault-free greedy tokens of the shared workload."""
    outs = engine.llm.generate(PROMPTS, PARAMS)
    assert all(o.outputs[0].finish_reason == "length" and len(o.outputs[0].token_ids) == s.max_tokens
               for o, s in zip(outs, PARAMS))
    assert_consistent(engine.m)
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture
def harness(engine, baseline):
    assert_consistent(engine.m)  # what the previous test left
    yield engine
    engine.reset()
    engine.pool.deferred_reclaim, engine.llm.overlap_allocation = True, "thread"


# -- invariants ---------------------------------------------------------------------
def assert_consistent(m):
    """An idle manager: no live slot; every mapped page is deferred in a free slot; the books balance."""
    s = m.stats()
    tensors = m.config.num_tensors  # 2 per layer, or one per group of interleaved layers
    tokens_per_page = m.config.page_bytes // m.config.token_bytes
    assert s.live_slots == 0 and not any(s.slot_allocated), s
    assert s.pages_mapped == s.pages_mapped_free_slots, "pages mapped to no free slot (leaked by a live slot)"
    assert s.pages_mapped == tensors * sum(math.ceil(c / tokens_per_page) for c in s.slot_capacity), s
    assert s.pages_created == s.pages_mapped + s.pages_free <= s.pages_budget, s
    assert s.creates - s.destroys == s.pages_created and s.maps - s.unmaps == s.pages_mapped, s
    assert pool_bytes_mapped(tensor_ranges(m)) == s.mapped_bytes, "the address space disagrees with the books"


def lost(reqs, want):
    """(requests, tokens) not reproduced exactly: a request that did not finish at full length with the fault-free
    tokens; its tokens after the first difference."""
    def common(a, b):
        return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))

    bad = [(r, w) for r, w in zip(reqs, want) if r.finish_reason != "length" or r.output != w]
    return len(bad), sum(len(w) - common(r.output, w) for r, w in bad)


# -- 1. fault injection ---------------------------------------------------------------
@pytest.mark.parametrize("overlap,reclaim", [("thread", True), ("thread", False), ("off", True)],
                         ids=["thread", "thread-no-reclaim", "no-overlap"])
def test_transient_faults_lose_nothing(harness, baseline, overlap, reclaim):
    """Single map / create faults every few steps, in the scheduler's pass and in the map-ahead thread's:
    every request completes with exactly the fault-free tokens."""
    h = harness
    h.llm.overlap_allocation = overlap  # "off": every page is mapped by the scheduler (faults hit it, not the thread)
    h.pool.deferred_reclaim = reclaim  # False: a finished request's pages are unmapped, so admissions map again
    h.m.trim(release_physical=True)  # start with no page at all: the run creates (and maps) every page
    for step in range(400):
        if step % 3 == 1:
            h.plan[step, "schedule"] = (0, 1)
        elif step % 3 == 2:
            h.plan[step, "schedule"] = (1, 0)
        if step % 4 == 0:
            h.plan[step, "map_ahead"] = (0, 1)
    faults0, fired0, ahead0 = h.sched.num_faults, h.fired, h.fired_in_map_ahead

    def only_while_running(step, reqs):  # see test_fault_at_admission_with_nothing_running_is_retried
        if not h.sched.running:
            h.plan.pop((step, "schedule"), None)

    reqs = h.drive(PROMPTS, PARAMS, before_step=only_while_running)
    fired, scheduler_faults = h.fired - fired0, h.sched.num_faults - faults0
    n_lost, tokens_lost = lost(reqs, baseline)
    FAULTS["transient_fired"] += fired
    FAULTS["transient_in_map_ahead"] += h.fired_in_map_ahead - ahead0
    FAULTS["transient_preemptions"] += sum(r.num_preemptions for r in reqs)
    FAULTS["transient_requests"] += len(reqs)
    FAULTS["transient_requests_lost"] += n_lost
    FAULTS["transient_tokens_lost"] += tokens_lost
    assert n_lost == 0 and tokens_lost == 0, [(r.request_id, r.finish_reason, r.error) for r in reqs]
    assert scheduler_faults >= 3, (fired, scheduler_faults)
    assert overlap != "thread" or h.fired_in_map_ahead > ahead0, "no fault hit the map-ahead thread"
    assert sum(r.num_preemptions for r in reqs) >= 2, "faults should have preempted (and recomputed) requests"
    assert_consistent(h.m)
    if not reclaim:
        assert h.m.stats().pages_mapped == 0


def test_persistent_faults_fail_only_the_requests_they_hit(harness, baseline):
    """Every mapping for two requests fails (one from its admission, one from its 4th token on): those two end
    with "error" after max_faults faults in a row; every other request's tokens are exactly the fault-free ones."""
    h = harness
    h.m.trim()
    # Request ids of this run: the engine numbers requests in order.
    first = h.llm._next_id
    hit_at_admission, hit_running = first + 1, first + 2  # short requests: a recompute is at most two chunks

    def poison(step, reqs):
        h.poisoned.add(hit_at_admission)
        if len(reqs[2].output) >= 4:
            h.poisoned.add(hit_running)

    assert len(PROMPTS[1]) + PARAMS[1].max_tokens <= 64 and len(PROMPTS[2]) + PARAMS[2].max_tokens <= 64
    reqs = h.drive(PROMPTS, PARAMS, before_step=poison)
    failed = [r for r in reqs if r.finish_reason == "error"]
    assert {r.request_id for r in failed} == {hit_at_admission, hit_running}, [
        (r.request_id, r.finish_reason, r.num_faults) for r in reqs]
    for r in failed:
        assert r.num_faults == h.sched.config.max_faults and "injected map failure" in r.error
        assert r.slot is None and r.status is Status.FINISHED
    assert len(reqs[2].output) >= 4  # it failed mid-generation, keeping the tokens it had
    assert reqs[2].output == baseline[2][:len(reqs[2].output)]
    ok = [(r, w) for r, w in zip(reqs, baseline) if r not in failed]
    assert all(r.finish_reason == "length" and r.output == w for r, w in ok)
    assert all(r.num_faults == r.num_preemptions == 0 for r, _ in ok), "a request the faults did not hit was touched"
    FAULTS["persistent_requests_failed"] += len(failed)
    FAULTS["persistent_others_lost"] += sum(r.output != w for r, w in ok)
    assert_consistent(h.m)


def test_device_wide_persistent_faults_end_the_run_cleanly(harness, baseline):
    """From step 6 on every page creation and mapping fails: generate() still ends; requests that fit in
    pages they already had finish with the fault-free tokens, the rest end with "error"."""
    h = harness
    h.m.trim()

    def break_device(step, reqs):
        if step == 6:
            h.m._inject_failures(creates=10**9, maps=10**9)

    fired0 = h.fired
    reqs = h.drive(PROMPTS, PARAMS, before_step=break_device)
    h.m._inject_failures(0, 0)
    failed = [r for r in reqs if r.finish_reason == "error"]
    assert failed and len(failed) < len(reqs), [r.finish_reason for r in reqs]
    assert all(r.finish_reason == "length" and r.output == w for r, w in zip(reqs, baseline) if r not in failed)
    assert all("injected" in r.error for r in failed)
    FAULTS["device_wide_fired"] += h.fired - fired0
    FAULTS["device_wide_requests_failed"] += len(failed)
    assert_consistent(h.m)


def test_faults_cleared_the_engine_runs_as_before(harness, baseline):
    """After all the faults above, a plain generate() gives the fault-free tokens and balanced books."""
    outs = harness.llm.generate(PROMPTS, PARAMS)
    assert [o.outputs[0].token_ids for o in outs] == baseline and all(o.error is None for o in outs)
    assert_consistent(harness.m)


def test_fault_at_admission_with_nothing_running_is_retried(harness, baseline):
    """One transient map fault while the engine is idle: generate() must retry, not raise."""
    h = harness
    h.m.trim()  # the admission has to map
    h.m._inject_failures(maps=1)
    out = h.llm.generate(PROMPTS[:1], PARAMS[:1])[0]
    assert out.outputs[0].finish_reason == "length" and out.outputs[0].token_ids == baseline[0]


def test_persistent_fault_on_a_long_request_terminates(harness):
    """A persistent fault on a 70-token request (3 prefill chunks of 32 to recompute) must fail it, not loop."""
    h = harness
    rng = np.random.default_rng(5)
    first = h.llm._next_id

    def poison(step, reqs):
        if len(reqs[0].output) >= 5:
            h.poisoned.add(first)

    (r,) = h.drive([rng.integers(0, 512, size=70).tolist()], [SamplingParams(max_tokens=30)], before_step=poison,
                   max_steps=300)
    assert r.finish_reason == "error" and r.num_faults == h.sched.config.max_faults


def test_generate_that_raises_leaves_nothing_behind(harness):
    h = harness
    run = h.llm._run
    calls = []

    def failing_run(out):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt("simulated interrupt mid-run")
        return run(out)

    h.llm._run = failing_run
    try:
        with pytest.raises(KeyboardInterrupt):
            h.llm.generate(PROMPTS, PARAMS)
    finally:
        del h.llm._run
    assert not h.sched.has_unfinished() and h.m.stats().live_slots == 0


def test_close_releases_everything(model, baseline):
    """close() after a run with faults: the map-ahead thread stops, nothing stays mapped or reserved, in the books
    and in the address space; using the engine afterwards is a clear error. Its own engine (the step shapes are
    compiled already), so the test does not depend on running after the shared engine's tests."""
    import threading

    from jax_vattention.errors import CacheClosedError

    with jax.default_device(CPU):
        llm = LLM(model, **ENGINE_KW)
    harness = FaultHarness(llm)
    harness.plan[(2, "map_ahead")] = (0, 1)  # one transient mapping fault mid-run
    reqs = harness.drive(PROMPTS[:6], PARAMS[:6])
    assert [r.output for r in reqs] == baseline[:6]  # nothing lost to the fault
    m = llm.manager
    assert_consistent(m)
    ranges = tensor_ranges(m)
    s = m.stats()
    assert s.pages_mapped > 0 and pool_bytes_mapped(ranges) == s.mapped_bytes > 0  # deferred pages, still mapped

    def map_ahead_threads():  # counted: engines of other test modules may run their own
        return sum(t.name.startswith("vattn-map-ahead") for t in threading.enumerate())

    threads = map_ahead_threads()
    assert threads >= 1
    llm.close()
    s = m.stats()
    assert m.closed and s.reserved_bytes == s.mapped_bytes == s.physical_bytes == s.pages_free == s.live_slots == 0
    assert pool_bytes_mapped(ranges) == 0
    assert map_ahead_threads() == threads - 1
    llm.close()  # idempotent
    with pytest.raises(CacheClosedError):
        llm.generate(PROMPTS[:1], SamplingParams(max_tokens=2))


def test_fault_summary(capsys):
    """Totals of the fault tests above (printed even without -s)."""
    if not FAULTS["transient_requests"]:
        pytest.skip("run with the fault tests")
    summary = ", ".join(f"{k}={v}" for k, v in sorted(FAULTS.items()))
    with capsys.disabled():
        print(f"\n[engine fault injection] {summary}")
    assert FAULTS["transient_fired"] >= 20 and FAULTS["transient_requests_lost"] == 0, summary
    assert FAULTS["transient_tokens_lost"] == 0 and FAULTS["persistent_others_lost"] == 0, summary


# -- 2. concurrency and shutdown (subprocesses: a deadlock or a hang fails, it cannot block the suite) ---------
CHILD_PRELUDE = """
import json, os, sys, threading, time
import jax, jax.numpy as jnp, numpy as np
import models
from jax_vattention.engine import SamplingParams
from jax_vattention.engine.llm import LLM
from jax_vattention.attention import AttentionSpec

model = models.random_model(models.get_preset("tiny"), seed=1, dtype=jnp.float32, init_std=0.2)
rng = np.random.default_rng(0)
N = int(os.environ.get("N_REQ", "16"))
ps = [rng.integers(0, 512, size=int(rng.integers(4, 60))).tolist() for _ in range(N)]
sp = [SamplingParams(max_tokens=int(n)) for n in rng.integers(8, 40, size=N)]
"""

STRESS_CHILD = CHILD_PRELUDE + """
import ctypes, dataclasses
from jax_vattention.engine.scheduler import Scheduler

sys.setswitchinterval(1e-5)  # switch Python threads often: more interleavings per second
llm = LLM(model, max_batch=8, max_seq=256, attn=AttentionSpec(impl="reference"), page_bytes=4096,
          token_budget=64, chunk_size=32, max_prefill_rows=2, min_decode_bucket=4, overlap_allocation="thread")
# The cache has 8 slots; the engine schedules at most 4, so the stress threads own up to 4 (2 each).
llm.scheduler = Scheduler(llm.pool, dataclasses.replace(llm.scheduler.config, max_batch=4))
m = llm.manager
want = [o.outputs[0].token_ids for o in llm.generate(ps, sp)]
assert any(t.name.startswith("vattn-map-ahead") for t in threading.enumerate()), "no map-ahead thread"

stop, errors = threading.Event(), []
ops = {"reads": 0, "allocates": 0, "grows": 0, "frees": 0, "trims": 0, "trimmed_pages": 0, "checked_tokens": 0}
lock = threading.Lock()
TOKEN = m.config.token_bytes  # the token stride, of every layer of a group when interleaved
FLOATS = m._native.entry_bytes // 4  # one layer's K (or V) of a token

def count(k, n=1):
    with lock:
        ops[k] += n

def token_addr(slot, layer, kv, pos):
    return m._native.entry_address(layer, kv) + slot * m._native.slot_bytes + pos * TOKEN

def fill(slot, start, end, mark):
    for layer in range(m.config.num_layers):
        for kv in (0, 1):
            for pos in range(start, end):
                a = np.ctypeslib.as_array((ctypes.c_float * FLOATS).from_address(token_addr(slot, layer, kv, pos)))
                a[:] = mark + pos

def check(slot, end, mark):
    for layer in range(m.config.num_layers):
        for kv in (0, 1):
            for pos in range(end):
                a = np.ctypeslib.as_array((ctypes.c_float * FLOATS).from_address(token_addr(slot, layer, kv, pos)))
                assert (a == mark + pos).all(), f"slot {slot} token {pos} was overwritten"
    count("checked_tokens", end)

def reader(seed):
    r = np.random.default_rng(seed)
    try:
        while not stop.is_set():
            s = m.stats()
            assert s.pages_created == s.pages_mapped + s.pages_free <= s.pages_budget, s
            assert s.live_slots <= 8 and s.pages_mapped_free_slots <= s.pages_mapped, s
            slot = int(r.integers(0, 8))
            m.capacity(slot), m.allocated(slot)
            count("reads")
    except BaseException as e:
        errors.append(repr(e))

def owner(seed):
    r = np.random.default_rng(seed)
    mine = {}  # slot -> (tokens written, mark)
    try:
        while not stop.is_set():
            op = r.integers(0, 4)
            if op == 0 and len(mine) < 2:
                n = int(r.integers(1, 40))
                slot = m.allocate(n)
                assert m.capacity(slot) >= n
                mark = float(r.integers(1, 1 << 20))
                fill(slot, 0, n, mark)
                mine[slot] = (n, mark)
                count("allocates")
            elif op == 1 and mine:
                slot = list(mine)[int(r.integers(0, len(mine)))]
                n, mark = mine[slot]
                new = min(256, n + int(r.integers(1, 30)))
                m.grow(slot, new)
                fill(slot, n, new, mark)
                mine[slot] = (new, mark)
                count("grows")
            elif op == 2 and mine:
                slot = list(mine)[int(r.integers(0, len(mine)))]
                check(slot, *mine.pop(slot))
                m.free(slot)
                count("frees")
            elif op == 3:
                count("trimmed_pages", m.trim())  # unmaps deferred pages, the engine's freed slots' included
                count("trims")
        for slot, (n, mark) in mine.items():
            check(slot, n, mark)
            m.free(slot)
    except BaseException as e:
        errors.append(repr(e))

threads = [threading.Thread(target=reader, args=(i,)) for i in range(2)]
threads += [threading.Thread(target=owner, args=(10 + i,)) for i in range(2)]
for t in threads:
    t.start()
maps0, t0, runs = m.stats().maps, time.perf_counter(), []
for _ in range(2):
    runs.append([o.outputs[0].token_ids for o in llm.generate(ps, sp)])
stressed_s = time.perf_counter() - t0
stop.set()
for t in threads:
    t.join(30)
alive = [t.name for t in threads if t.is_alive()]
s = m.stats()
result = dict(same=[r == want for r in runs], errors=errors, ops=ops, alive=alive, stressed_s=stressed_s,
              engine_maps=s.maps - maps0, live_slots=s.live_slots,
              map_ahead_before_close=sum(t.name.startswith("vattn-map-ahead") for t in threading.enumerate()))
llm.close()
result.update(map_ahead_after_close=[t.name for t in threading.enumerate() if t.name.startswith("vattn-map-ahead")],
              closed=m.closed, after_close=[m.stats().reserved_bytes, m.stats().mapped_bytes,
                                            m.stats().physical_bytes])
print("RESULT " + json.dumps(result), flush=True)
"""

EXIT_CHILD = CHILD_PRELUDE + """
llm = LLM(model, max_batch=4, max_seq=256, attn=AttentionSpec(impl="reference"), page_bytes=4096,
          token_budget=64, chunk_size=32, max_prefill_rows=2, min_decode_bucket=4, overlap_allocation="thread")
outs = llm.generate(ps, sp)
assert all(o.outputs[0].finish_reason == "length" for o in outs)
assert llm.manager.stats().pages_mapped > 0
assert any(t.name.startswith("vattn-map-ahead") for t in threading.enumerate())
print("EXITING", time.time(), flush=True)
# no llm.close(): the interpreter tears the engine (map-ahead thread, manager, views) down
"""


def run_child(code: str, timeout: float, **env):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_PYTHON_CLIENT_PREALLOCATE="false", **env)
    env.pop("OUT", None)
    try:
        return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the child did not finish in {timeout} s (deadlock?)\nstdout:\n{e.stdout}\nstderr:\n{e.stderr}")


def test_map_ahead_thread_under_concurrent_api_calls():
    """generate() with thread overlap while 4 threads hammer the same manager: identical outputs, the other
    threads' slots keep their bytes, no deadlock (timeout), and close() stops the map-ahead thread."""
    proc = run_child(STRESS_CHILD, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    res = json.loads(line[len("RESULT "):])
    assert res["errors"] == [] and res["alive"] == [], res
    assert res["same"] == [True, True], "outputs under stress differ from the unstressed run"
    ops = res["ops"]
    # The threads really ran alongside: thousands of reads, their own slots, trims that took the engine's
    # deferred pages (so the engine had to map again while being stressed).
    assert ops["reads"] >= 500 and ops["allocates"] >= 20 and ops["frees"] >= 20 and ops["trims"] >= 20, ops
    assert ops["trimmed_pages"] > 0 and ops["checked_tokens"] > 0 and res["engine_maps"] > 0, res
    assert res["live_slots"] == 0 and res["map_ahead_before_close"] == 1, res
    assert res["map_ahead_after_close"] == [] and res["closed"] and res["after_close"] == [0, 0, 0], res
    print(f"stress: {res['stressed_s']:.1f} s, {ops}")


def test_exit_without_close_is_clean():
    """Exiting the interpreter with an open engine (map-ahead thread started, pages mapped): status 0, no
    traceback or 'Exception ignored', and a quick exit (not close()'s 60 s wait for a view still held)."""
    proc = run_child(EXIT_CHILD, timeout=120, N_REQ="6")
    end = time.time()
    assert proc.returncode == 0, proc.stderr[-4000:]
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("EXITING ")]
    shutdown_s = end - float(line.split()[1])
    for bad in ("Traceback", "Exception ignored", "Fatal", "Segmentation", "RuntimeWarning"):
        assert bad not in proc.stderr, proc.stderr[-4000:]
    assert shutdown_s < 20, f"interpreter shutdown took {shutdown_s:.1f} s"


# -- 3. the long run, small ------------------------------------------------------------------
def test_long_run_script_smoke(tmp_path, monkeypatch):
    """benchmarks/long_run.py with 240 requests on CPU: all complete at full length, the long-run recheck
    reproduces the first requests' tokens, and close() leaves nothing mapped, reserved or allocated."""
    long_run = LONG_RUN
    monkeypatch.setattr(long_run.common, "RESULTS_DIR", tmp_path)
    monkeypatch.delenv("OUT", raising=False)
    payload = long_run.main(["--requests", "240", "--chunk", "80", "--max-batch", "8", "--min-decode-bucket", "8",
                             "--max-prefill-rows", "1", "--chunk-size", "16", "--max-prompt", "16",
                             "--prompt-median", "8", "--max-output", "16", "--recheck", "8", "--no-progress"])
    assert payload["ok"], payload["problems"]
    assert payload["requests"] == payload["completed"] == 240 and payload["incomplete"] == 0
    assert payload["output_tokens"] == payload["expected_output_tokens"] > 240 * 8 - 1
    assert payload["recheck_same"] == 8
    before, after = payload["stats_before_close"], payload["stats_after_close"]
    assert before["maps"] > 0 and before["live_slots"] == 0
    assert after == {**after, "reserved_bytes": 0, "mapped_bytes": 0, "physical_bytes": 0, "live_slots": 0}
    assert payload["memory"]["kind"] == "host-memfd" and payload["memory"]["mapped_after_close"] == 0
    assert payload["memory"]["resident_after_close"] <= payload["memory"]["resident_before"]
    threads = payload["map_ahead_threads"]
    assert threads["before_close"] == threads["at_start"] + 1 and threads["after_close"] == threads["at_start"]
    assert (tmp_path / f"long_run_{long_run.common.device_slug()}.json").exists()
