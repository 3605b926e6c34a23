"""Overflowing sizes in the native layout arithmetic are CacheValueErrors naming the fields.

A tester found ``kv_heads=2**62`` spinning forever in ``CacheManager::CacheManager``
(holding the GIL) and related configurations wrapping to negative strides or
negative reservations. Every case runs in one child process with a timeout, so a
regression that hangs again fails this file instead of hanging CI.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

# name -> (expression run in the child, regex its CacheValueError message must match)
CASES = {
    # The tester's reproducer: token bytes = 2**62 * 16 * 4 wraps to 0.
    "kv_heads_reproducer": ("manager(kv_heads=2**62)", r"kv_heads \* head_dim \* itemsize"),
    "kv_heads_without_pool_bytes": ("manager(kv_heads=2**62, pool_bytes=None)", r"kv_heads"),
    "max_batch_beyond_int32": ("manager(max_batch=2**62)", r"max_batch"),
    "max_batch_times_slot": (
        "manager(max_batch=2**30, max_seq=2**30, kv_heads=2**14)",
        r"max_batch \* max_seq \* token_bytes",
    ),
    "max_seq_times_token_bytes": ("manager(max_seq=2**31 - 1, kv_heads=2**40)", r"max_seq \* token_bytes"),
    "num_layers_overflow": ("manager(num_layers=2**62)", r"num_layers"),
    "num_layers_address_space": ("manager(num_layers=2**40)", r"num_layers"),
    "pool_bytes_beyond_int64": ("manager(pool_bytes=2**63)", r"pool_bytes"),
    "pool_bytes_huge": ("manager(pool_bytes=2**4000)", r"pool_bytes"),
    # The native module directly, past the Python checks.
    "native_num_layers_beyond_int64": ("native(num_layers=2**64)", r"num_layers"),
    "native_max_seq_rounding": ("native(max_seq=2**63 - 1, kv_heads=3)", r"max_seq"),
    "native_head_dim_overflow": ("native(kv_heads=2**31, head_dim=2**31, itemsize=4)",
                                 r"kv_heads \* head_dim \* itemsize"),
    # The interleaved layout: a token of 2 * 2**40 entries; and a group size the native layout refuses itself.
    "interleaved_token_stride": ("manager(num_layers=2**40, layers_per_group=2**40)",
                                 r"one tensor would reserve .*max_batch \* max_seq \* token_bytes"),
    "interleaved_num_layers_overflow": ("native(num_layers=2**62, layers_per_group=2**62)", r"num_layers"),
    "native_layers_per_group_not_a_divisor": ("native(layers_per_group=3)",
                                              r"layers_per_group=3 must be a positive divisor of num_layers=2"),
    # Huge ints reaching a live manager's methods.
    "free_huge_slot": ("live().free(2**64)", r"slot"),
    "trim_huge_max_pages": ("live().trim(2**70)", r"max_pages"),
}

CHILD = textwrap.dedent(
    """
    import json, sys, time
    import jax_vattention as jv
    from jax_vattention import _core

    BASE = dict(num_layers=2, max_batch=3, max_seq=128, kv_heads=2, head_dim=16, dtype="float32",
                page_bytes=4096, pool_bytes=1 << 20)
    NATIVE = dict(num_layers=2, max_batch=3, max_seq=128, kv_heads=2, head_dim=16, itemsize=4, page_bytes=4096,
                  pool_bytes=1 << 20, deferred_reclaim=True, backend="host", device_ordinal=0, unbacked_reads="zeros")
    managers = []

    def manager(**overrides):
        return jv.KVCacheManager(jv.CacheConfig(**{**BASE, **overrides}))

    def native(**overrides):
        return _core.Manager(**{**NATIVE, **overrides})

    def live():
        managers.append(manager())
        return managers[-1]

    results = {}
    for name, expression in json.loads(sys.argv[1]).items():
        start = time.monotonic()
        try:
            eval(expression)
            outcome = ["no error", ""]
        except BaseException as e:
            outcome = [type(e).__name__, str(e)]
        results[name] = outcome + [time.monotonic() - start]
        print(name, outcome, file=sys.stderr, flush=True)  # shows how far a hung run got
    print(json.dumps(results))
    """
)


@pytest.fixture(scope="module")
def outcomes():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    expressions = {name: expr for name, (expr, _) in CASES.items()}
    try:
        run = subprocess.run(
            [sys.executable, "-c", CHILD, json.dumps(expressions)],
            capture_output=True, text=True, env=env, timeout=60,
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the overflow cases hung (a spin in the native layout arithmetic?); stderr:\n{e.stderr}")
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", list(CASES))
def test_overflow_is_a_prompt_cache_value_error(outcomes, name):
    kind, message, seconds = outcomes[name]
    assert kind == "CacheValueError", (kind, message)
    assert re.search(CASES[name][1], message), message
    assert seconds < 10, f"{name} took {seconds:.1f} s"
