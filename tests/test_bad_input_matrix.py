"""One table of bad inputs across the public surfaces, each checked the same way.

Every row: the call raises the named exception class with a message naming
the problem, the process survives, and the token already cached in slot 0
(written before the row runs) is byte-for-byte intact afterwards.

| # | surface | bad input | exception |
|---|---|---|---|
| 1-4 | CacheConfig | zero/negative size, bool size, unsupported dtype, max_seq >= 2**31 | CacheValueError |
| 5-9 | manager | slot out of range (+/-), slot not an int, length > max_seq, negative length | CacheValueError |
| 10-11 | manager | grow of a free slot, double free | SlotStateError |
| 12 | manager | grow past the page budget | PoolExhaustedError |
| 13-18 | ops.grow / ops.write | rank, dtype, row count, head shape, cache dtype, layer out of range | CacheValueError |
| 19-21 | in jit | write past capacity, grow of a free slot, grow past the budget | JaxRuntimeError naming the class |
| 22-24 | attention | q rank, group not dividing, slots dtype | ValueError |
| 25-28 | models | unknown preset, missing model dir, corrupt safetensors, max_tokens <= 0 | ModelError subclasses |
| 29-30 | CLI | unknown option, prompt longer than max_seq | exit code 2 with a message |
| 31-33 | engine | empty prompt, prompt + max_tokens > max_seq, SamplingParams(top_p=0) | ValueError |

33 cases; ``test_the_table_is_complete`` keeps the count honest. The native surfaces
(manager, ops, in jit: rows 5-21) run in both cache layouts, per-layer tensors and
both layers interleaved in one tensor.
"""

from __future__ import annotations

import ctypes
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_vattention as jv
from jax_vattention import attention as attn
from jax_vattention.engine import Request, SamplingParams, Scheduler, SchedulerConfig, VAttentionPool

CFG = dict(num_layers=2, max_batch=3, max_seq=128, kv_heads=2, head_dim=16, dtype="float32", page_bytes=4096)


@pytest.fixture
def m(request):
    # 32 tokens a page and a budget of 4 page indices in either layout: 4 tensors of 4 KiB pages per-layer,
    # 1 tensor of 16 KiB pages (both layers' K and V per token) interleaved.
    g = request.node.callspec.params.get("layers_per_group", 1)
    page = 4096 * (1 if g == 1 else 2 * g)
    tensors = 2 * CFG["num_layers"] // (1 if g == 1 else 2 * g)
    cfg = jv.CacheConfig(**{**CFG, "page_bytes": page}, layers_per_group=g, pool_bytes=4 * tensors * page)
    with jv.KVCacheManager(cfg) as manager:
        slot = manager.allocate(10)
        assert slot == 0
        token = jnp.full((1, 1, 2, 16), 42.0, jnp.float32)
        i32 = lambda x: jnp.array([x], jnp.int32)  # noqa: E731
        jv.write(manager, 1, token, -token, i32(0), i32(3), i32(1)).block_until_ready()
        yield manager
        # The cached token survived whatever the row did: layer 1's K and V entries of token 3 of slot 0.
        for kv, want in ((0, 42.0), (1, -42.0)):
            addr = manager._native.entry_address(1, kv) + 3 * manager.config.token_bytes
            got = np.ctypeslib.as_array((ctypes.c_float * 32).from_address(addr))
            np.testing.assert_array_equal(got, want)


def i32(*xs):
    return jnp.array(xs, jnp.int32)


def kv(b=1, t=1, h=2, d=16, dtype=jnp.float32):
    return jnp.zeros((b, t, h, d), dtype)


def config_cases():
    return [
        (lambda m: jv.CacheConfig(**{**CFG, "num_layers": 0}), jv.CacheValueError, "num_layers"),
        (lambda m: jv.CacheConfig(**{**CFG, "max_batch": True}), jv.CacheValueError, "max_batch"),
        (lambda m: jv.CacheConfig(**{**CFG, "dtype": "int8"}), jv.CacheValueError, "dtype"),
        (lambda m: jv.CacheConfig(**{**CFG, "max_seq": 2**31}), jv.CacheValueError, "max_seq"),
    ]


def manager_cases():
    return [
        (lambda m: m.grow(3, 5), jv.CacheValueError, "out of range"),
        (lambda m: m.grow(-1, 5), jv.CacheValueError, "out of range"),
        (lambda m: m.grow("0", 5), jv.CacheValueError, "slot must be an int"),
        (lambda m: m.grow(0, m.max_seq + 1), jv.CacheValueError, "max_seq"),
        (lambda m: m.grow(0, -1), jv.CacheValueError, "outside"),
        (lambda m: m.grow(1, 5), jv.SlotStateError, "not allocated"),
        (lambda m: (m.free(m.allocate()), m.free(1)), jv.SlotStateError, "double free"),
        (lambda m: m.grow(m.allocate(), m.max_seq), jv.PoolExhaustedError, "needs"),
    ]


def ops_cases():
    return [
        (lambda m: jv.grow(m, i32(0)[None], i32(5)[None]), jv.CacheValueError, "shape"),
        (lambda m: jv.grow(m, jnp.array([0.0]), i32(5)), jv.CacheValueError, "int32"),
        (lambda m: jv.write(m, 0, kv(2), kv(2), i32(0), i32(0), i32(1)), jv.CacheValueError, "rows"),
        (lambda m: jv.write(m, 0, kv(h=3), kv(h=3), i32(0), i32(0), i32(1)), jv.CacheValueError,
         r"k_new must be \[B, T, 2, 16\]"),
        (lambda m: jv.write(m, 0, kv(dtype=jnp.bfloat16), kv(dtype=jnp.bfloat16), i32(0), i32(0), i32(1)),
         jv.CacheValueError, "float32"),
        (lambda m: jv.write(m, 2, kv(), kv(), i32(0), i32(0), i32(1)), jv.CacheValueError, "layer"),
    ]


def in_jit_cases():
    def run(fn):
        return lambda m: jax.block_until_ready(jax.jit(lambda: fn(m))())

    return [
        (run(lambda m: jv.write(m, 0, kv(), kv(), i32(0), i32(m.capacity(0)), i32(1))), jax.errors.JaxRuntimeError,
         "CacheValueError"),
        (run(lambda m: jv.grow(m, i32(2), i32(5))), jax.errors.JaxRuntimeError, "SlotStateError"),
        (run(lambda m: jv.grow(m, i32(0, m.allocate()), i32(m.max_seq, m.max_seq))), jax.errors.JaxRuntimeError,
         "PoolExhaustedError"),
    ]


def attention_cases():
    q = jnp.zeros((1, 4, 64), jnp.bfloat16)
    cache = jnp.zeros((2, 64, 2, 64), jnp.bfloat16)
    return [
        (lambda m: attn.decode_attention(q[0], cache, cache, i32(0), i32(5), interpret=True), ValueError, "q"),
        (lambda m: attn.decode_attention(jnp.zeros((1, 3, 64), jnp.bfloat16), cache, cache, i32(0), i32(5),
                                         interpret=True), ValueError, "divisible|multiple|group"),
        (lambda m: attn.decode_attention(q, cache, cache, jnp.array([0.0]), i32(5), interpret=True), ValueError,
         "int32|slots"),
    ]


def model_cases(tmp_path_factory):
    models = pytest.importorskip("models")
    corrupt = tmp_path_factory.mktemp("corrupt")
    (corrupt / "config.json").write_text(
        '{"architectures": ["LlamaForCausalLM"], "vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,'
        ' "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1}')
    (corrupt / "model.safetensors").write_bytes(b"\x00garbage")
    tiny_cfg = models.get_preset("tiny")
    tiny = models.random_model(tiny_cfg, seed=0)

    def generate_zero_tokens(m):
        cache_cfg = models.cache_config_for(tiny_cfg, max_batch=1, max_seq=64, dtype="float32")
        with jv.KVCacheManager(cache_cfg) as own:
            models.Generator(tiny).generate([[1, 2]], own, jv.SamplingParams(max_tokens=0))
    return [
        (lambda m: models.get_preset("llama-9000"), models.UnknownPresetError, "llama-9000"),
        (lambda m: models.load_model(corrupt.parent / "missing-dir"), models.CheckpointError,
         "missing|not found|exist"),
        (lambda m: models.load_model(corrupt), models.CheckpointError, "safetensors|corrupt|read"),
        (generate_zero_tokens, ValueError, "max_tokens"),
    ]


def cli_cases():
    def cli(*argv):
        def run(m):
            proc = subprocess.run([sys.executable, "-m", "jax_vattention_cli", *argv], capture_output=True, text=True,
                                  env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}, timeout=300)
            raise SystemExit(proc.returncode, proc.stderr)

        return run

    return [
        (cli("generate", "--no-such-option"), SystemExit, "unrecognized arguments"),
        (cli("generate", "--prompt-ids", " ".join(["1"] * 80), "--max-seq", "64"), SystemExit, "max_seq"),
    ]


def engine_cases():
    def sched(m):
        return Scheduler(VAttentionPool(m), SchedulerConfig(max_batch=2))

    return [
        (lambda m: sched(m).add(Request(0, [], SamplingParams())), ValueError, "empty"),
        (lambda m: sched(m).add(Request(1, [1] * 120, SamplingParams(max_tokens=20))), ValueError, "max_seq"),
        (lambda m: SamplingParams(top_p=0.0), ValueError, "top_p"),
    ]


SURFACES = {
    "config": config_cases, "manager": manager_cases, "ops": ops_cases, "in_jit": in_jit_cases,
    "attention": attention_cases, "models": None, "cli": cli_cases, "engine": engine_cases,
}
COUNTS = {"config": 4, "manager": 8, "ops": 6, "in_jit": 3, "attention": 3, "models": 4, "cli": 2, "engine": 3}


def test_the_table_is_complete():
    assert sum(COUNTS.values()) == 33
    for name, make in SURFACES.items():
        if make is not None:
            assert len(make()) == COUNTS[name], name


NATIVE = ("manager", "ops", "in_jit")


@pytest.mark.parametrize("surface,index,layers_per_group",
                         [(s, i, g) for s, n in COUNTS.items() for i in range(n)
                          for g in ((1, 2) if s in NATIVE else (1,))])
def test_bad_input(m, surface, index, layers_per_group, tmp_path_factory):
    make = SURFACES[surface]
    fn, exc, pattern = (model_cases(tmp_path_factory) if make is None else make())[index]
    with pytest.raises(exc) as info:
        fn(m)
    message = " ".join(str(a) for a in info.value.args) if isinstance(info.value, SystemExit) else str(info.value)
    if isinstance(info.value, SystemExit):
        assert info.value.args[0] == 2, info.value.args
    assert re.search(pattern, message, re.IGNORECASE), (pattern, message[-500:])
