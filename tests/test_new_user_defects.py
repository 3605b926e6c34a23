"""Regressions for what trying the project as a new user found: silent coercion, unclear messages, exit codes.

Each case names the defect it guards against. CPU, tiny shapes; the CLI runs in-process.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_vattention as jv
from jax_vattention import attention as attn

pytest.importorskip("flax")
import models  # noqa: E402
from jax_vattention.engine import LLM, SamplingParams  # noqa: E402
from jax_vattention_cli.main import main  # noqa: E402

CFG = dict(num_layers=2, max_batch=3, max_seq=128, kv_heads=2, head_dim=16, dtype="float32", page_bytes=4096)


# -- CacheConfig / SamplingParams: the same integer rule ---------------------------------
@pytest.mark.parametrize("field,value,match", [
    ("deferred_reclaim", "no", "deferred_reclaim must be a bool"),
    ("pool_bytes", 2**63, "pool_bytes"),
    ("max_seq", 100.0, "max_seq"),
    ("max_batch", True, "max_batch"),
    ("kv_heads", np.float32(2), "kv_heads"),
])
def test_cache_config_refuses_what_it_used_to_coerce(field, value, match):
    with pytest.raises(jv.CacheValueError, match=match):
        jv.CacheConfig(**{**CFG, field: value})


def test_numpy_integers_are_integers_everywhere():
    cfg = jv.CacheConfig(**{**CFG, "max_seq": np.uint16(100), "max_batch": np.int64(3)})
    assert type(cfg.max_seq) is int and type(cfg.max_batch) is int
    with jv.KVCacheManager(cfg) as m:  # np.uint16 arithmetic used to overflow into an AssertionError
        assert m.max_seq >= 100
    p = SamplingParams(max_tokens=np.int64(5), top_k=np.int32(3), seed=np.uint16(7))
    assert (p.max_tokens, p.top_k, p.seed) == (5, 3, 7) and type(p.max_tokens) is int
    for bad in (True, 5.0, "5"):
        with pytest.raises(ValueError, match="max_tokens"):
            SamplingParams(max_tokens=bad)


def test_manager_arguments():
    with jv.KVCacheManager(jv.CacheConfig(**CFG), device="cpu") as m:  # a platform name was an AttributeError
        assert m.device.platform == "cpu"
        m.free(m.allocate(40))
        with pytest.raises(jv.CacheValueError, match="max_pages"):
            m.trim(max_pages=-3)  # used to trim everything
        assert m.stats().pages_mapped > 0
        with pytest.raises(jv.CacheValueError, match="slot 7 is outside"):
            m.cache([7], [5])
        with pytest.raises(jv.SlotStateError, match="not allocated"):
            m.cache([1], [5])
        with pytest.raises(jv.CacheValueError, match="length -1"):
            m.cache([m.allocate(8)], [-1])
    with pytest.raises(jv.CacheValueError, match="device must be"):
        jv.KVCacheManager(jv.CacheConfig(**CFG), device=3)


# -- attention entry points check their rows ------------------------------------------------------
@pytest.mark.parametrize("slots,lengths,match", [([7], [5], "slots must be < max_batch=3"),
                                                  ([0], [-2], "lengths must be in"),
                                                  ([0], [129], "lengths must be in")])
def test_attention_rows_are_bounds_checked(slots, lengths, match):
    k = jnp.zeros((3, 128, 2, 64), jnp.bfloat16)
    q = jnp.zeros((1, 4, 64), jnp.bfloat16)
    rows = jnp.asarray(slots, jnp.int32), jnp.asarray(lengths, jnp.int32)
    with pytest.raises(ValueError, match=match):
        attn.decode_attention_reference(q, k, k, *rows)
    with pytest.raises(ValueError, match=match):
        attn.decode_attention(q, k, k, *rows, interpret=True)


def test_references_take_float32_caches():
    k = jnp.ones((2, 32, 2, 16), jnp.float32)
    out = attn.decode_attention_reference(jnp.ones((1, 4, 16)), k, k, jnp.array([1], jnp.int32),
                                          jnp.array([5], jnp.int32))
    np.testing.assert_allclose(np.asarray(out), 1.0, rtol=1e-6)


# -- HF configs: no truncation, no nonsense ----------------------------------------------------
def test_hf_config_values_are_checked():
    base = {"architectures": ["LlamaForCausalLM"], "vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
            "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1}
    assert models.ModelConfig.from_hf_dict(base).num_layers == 2
    with pytest.raises(models.CheckpointError, match="num_hidden_layers must be an integer, got 2.7"):
        models.ModelConfig.from_hf_dict({**base, "num_hidden_layers": 2.7})
    with pytest.raises(models.ModelError, match="rms_norm_eps"):
        models.ModelConfig.from_hf_dict({**base, "rms_norm_eps": -1})


# -- the engine's limits are the configured ones ---------------------------------------------
def test_engine_keeps_the_configured_max_seq_and_the_model_positions():
    model = models.random_model(models.get_preset("tiny").replace(max_position_embeddings=64), seed=0)
    with LLM(model, max_batch=2, max_seq=48, page_bytes=4096) as llm:
        assert llm.pool.max_seq >= 48  # the pool rounds to whole pages ...
        with pytest.raises(ValueError, match="exceeds max_seq=48"):  # ... requests still obey max_seq
            llm.generate([[1] * 40], SamplingParams(max_tokens=10))
    with LLM(model, max_batch=2, max_seq=256, page_bytes=4096) as llm:
        with pytest.raises(ValueError, match="max_position_embeddings=64"):
            llm.generate([[1] * 60], SamplingParams(max_tokens=10))
        assert not llm.scheduler.has_unfinished()


# -- the CLI: a message and exit status 2, never a traceback ---------------------------------
@pytest.mark.parametrize("argv,message", [
    (["demo", "--layers", "0"], "num_layers"),
    (["demo", "--prompts", "-5", "--new-tokens", "3"], "--prompts value must be positive"),
    (["demo", "--max-batch", "2"], "more than --max-batch=2"),
    (["bench", "--layers", "-1"], "--layers must be positive"),
    (["bench", "--layers", "0"], "--layers must be positive"),
    (["bench", "--requests", "4", "--max-seq", "16"], "shorter than the workload's longest request"),
    (["generate", "--prompt-ids", "1 2 x"], "--prompt-ids expects integers"),
    (["generate", "--page-bytes", "0"], "--page-bytes must be positive"),
    (["generate", "--max-seq", "0"], "--max-seq must be positive"),
    (["generate", "--decode-chunk", "-1", "--max-tokens", "4"], "decode_chunk"),
    (["generate", "--decode-chunk", "0", "--max-tokens", "4"], "decode_chunk"),
])
def test_cli_bad_input_exits_2_with_a_message(capsys, argv, message):
    t0 = time.monotonic()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error: " in err and message in err, err
    assert time.monotonic() - t0 < 60  # refused before any long compilation


def test_in_jit_errors_name_the_class():
    with jv.KVCacheManager(jv.CacheConfig(**{**CFG, "pool_bytes": 4 * 4096})) as m:
        slot = m.allocate()
        grow = jax.jit(lambda s, n: jv.grow(m, s, n))
        with pytest.raises(jax.errors.JaxRuntimeError, match="PoolExhaustedError"):
            jax.block_until_ready(grow(jnp.array([slot], jnp.int32), jnp.array([128], jnp.int32)))
