"""GPU suite for the models package (marker ``gpu``; skipped without a CUDA GPU).

CUDA VMM cache, bf16 Pallas kernels (Triton), realistic shapes: a Llama-3.2-1B-shaped
model generates with no more memory mapped than its tokens need plus one page
per layer tensor per request, and gives the same tokens as the static cache.
"""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

# Without the models package's dependencies (e.g. a device image with only jax), skip rather than
# break collection of the whole suite.
pytest.importorskip("flax", reason="models needs flax (pip install -e .)")
pytest.importorskip("safetensors", reason="models needs safetensors (pip install -e .)")

from flax import nnx

import jax_vattention as jv
import models
from jax_vattention.attention import AttentionSpec
from jax_vattention.hlo import assert_no_cache_copy
from jax_vattention.sampling import SamplingParams, SamplingRows
from models import decode as dec
from models.testing import assert_same_greedy, rel_error

pytestmark = pytest.mark.gpu
DATA = Path(__file__).parent / "data"



def no_eos(budgets):
    """One ``SamplingParams`` per budget that runs to it (no stop token)."""
    return [SamplingParams(max_tokens=int(n), ignore_eos=True) for n in budgets]

def ragged(rng, n, longest, vocab):
    lens = rng.integers(1, longest + 1, size=n)
    lens[0] = longest
    return [rng.integers(0, vocab, size=int(k)).tolist() for k in lens]


@pytest.mark.parametrize("interleaved", [False, True], ids=["per-layer", "interleaved"])
def test_hf_parity_and_cache_path_fp32_on_gpu(interleaved):
    parity = np.load(DATA / "hf_parity.npz")
    with jax.default_matmul_precision("highest"):
        for name in ("llama", "qwen2", "mistral"):
            model = models.load_model(DATA / f"hf_{name}", dtype="float32")
            ids = parity[f"{name}_input_ids"]
            assert rel_error(models.llama.full_logits(model, ids), parity[f"{name}_logits"]) <= 1e-5
            want = parity[f"{name}_gen_tokens"].tolist()
            group = model.config.num_layers if interleaved else 1
            cache_cfg = models.cache_config_for(model.config, max_batch=2, max_seq=64, dtype="float32",
                                                layers_per_group=group)
            with jv.KVCacheManager(cache_cfg) as m:
                r = models.Generator(model).generate([parity[f"{name}_gen_prompt"][0]], m,
                                                     SamplingParams(max_tokens=len(want), ignore_eos=True))
            assert r.tokens[0] == want, name


@pytest.mark.parametrize("interleaved", [False, True], ids=["per-layer", "interleaved"])
def test_forward_equals_prefill_plus_decode_fp32_on_cuda_cache(rng, interleaved):
    cfg = models.get_preset("tiny").replace(vocab_size=256)
    model = models.random_model(cfg, seed=1, init_std=0.2)
    B, T, N = 4, 300, 20
    tokens = rng.integers(0, cfg.vocab_size, size=(B, T)).astype(np.int32)
    prefix = rng.integers(1, T - N, size=B).astype(np.int32)
    graphdef, params = nnx.split(model)
    spec = AttentionSpec(impl="reference", max_len=512)

    @jax.jit
    def pre(params, cache, toks, counts):
        logits, cache = models.prefill(nnx.merge(graphdef, params), toks, counts, cache, spec)
        return logits, cache.state

    @jax.jit
    def step(params, cache, toks):
        _, logits, cache = models.decode_step(nnx.merge(graphdef, params), toks, cache, spec,
                                              SamplingRows.padding(B))
        return logits, cache.state

    with jax.default_matmul_precision("highest"):
        full = np.asarray(models.llama.full_logits(model, tokens))
        cache_cfg = models.cache_config_for(cfg, max_batch=B, max_seq=512, dtype="float32",
                                            layers_per_group=cfg.num_layers if interleaved else 1)
        with jv.KVCacheManager(cache_cfg) as m:
            cache = m.cache([m.allocate() for _ in range(B)], np.zeros(B, np.int32))
            padded = np.zeros((B, 512), np.int32)
            for b in range(B):
                padded[b, : prefix[b]] = tokens[b, : prefix[b]]
            logits, state = pre(params, cache, jnp.asarray(padded[:, : int(prefix.max())]), jnp.asarray(prefix))
            cache = cache.with_state(state)
            got, want = [np.asarray(logits)], [full[np.arange(B), prefix - 1]]
            for i in range(N):
                logits, state = step(params, cache, jnp.asarray(tokens[np.arange(B), prefix + i]))
                cache = cache.with_state(state)
                got.append(np.asarray(logits))
                want.append(full[np.arange(B), prefix + i])
            m.check_device_errors()
    assert rel_error(np.stack(got), np.stack(want)) <= 1e-5


@pytest.mark.parametrize("interleaved", [False, True], ids=["per-layer", "interleaved"])
def test_1b_shape_memory_bound_and_static_parity(rng, interleaved):
    """Llama-3.2-1B shape, bf16, kernels: mapped <= tokens needed + one page per reserved tensor per request
    (per-layer: 2048 tokens a page, 32 tensors; interleaved: 64 tokens a page of all 16 layers, one tensor)."""
    cfg = models.get_preset("llama-3.2-1b")
    model = models.random_model(cfg, seed=0, dtype=jnp.bfloat16)
    B, max_seq = 8, 8192  # 2048 tokens a page at this shape: a 2048-token slot would be one page
    prompts = ragged(rng, B, 900, cfg.vocab_size)
    budgets = rng.integers(1, 129, size=B).tolist()
    gen = models.Generator(model)  # auto: the Pallas kernels on the GPU
    cache_cfg = models.cache_config_for(cfg, max_batch=B, max_seq=max_seq, dtype="bfloat16",
                                        layers_per_group=cfg.num_layers if interleaved else 1)
    with jv.KVCacheManager(cache_cfg) as m:
        r = gen.generate(prompts, m, no_eos(budgets))
        st = m.stats()
    lengths = np.array([len(p) for p in prompts]) + np.array(budgets) - 1
    assert r.cache_lengths == lengths.tolist()
    need = 2 * cfg.num_layers * int(lengths.sum()) * cache_cfg.entry_bytes
    assert r.needed_bytes == need
    assert r.mapped_bytes <= need + cache_cfg.num_tensors * B * st.page_bytes, (r.mapped_bytes, need)
    assert r.mapped_bytes < r.static_bytes
    static = models.static_cache_for(cfg, max_batch=B, max_seq=max_seq, dtype="bfloat16")
    s = gen.generate(prompts, static, no_eos(budgets))
    assert_same_greedy(r.tokens, s.tokens, prompts, model, tie_tol=0.05, what="1B vattention vs static")


@pytest.mark.parametrize("interleaved", [False, True], ids=["per-layer", "interleaved"])
def test_kernels_match_reference_and_batching_at_8b_layer_shapes(rng, interleaved):
    """Llama-3-8B layer shapes (2 layers): kernels vs jnp reference, batched vs single, long prompts."""
    cfg = models.get_preset("llama-3-8b").replace(num_layers=2, vocab_size=4096)
    model = models.random_model(cfg, seed=int(rng.integers(100)), dtype=jnp.bfloat16, init_std=0.05)
    prompts = ragged(rng, 6, 1500, cfg.vocab_size)
    budgets = rng.integers(1, 65, size=6).tolist()
    cache_cfg = models.cache_config_for(cfg, max_batch=6, max_seq=2048, dtype="bfloat16",
                                        layers_per_group=cfg.num_layers if interleaved else 1)
    kernel = models.Generator(model, attn=AttentionSpec(impl="kernel"))
    reference = models.Generator(model, attn=AttentionSpec(impl="reference"))
    with jv.KVCacheManager(cache_cfg) as m:
        a = kernel.generate(prompts, m, no_eos(budgets), prefill_chunk=512)
        b = reference.generate(prompts, m, no_eos(budgets))
        single = [kernel.generate([p], m, no_eos([n])).tokens[0]
                  for p, n in zip(prompts, budgets)]
        assert m.stats().live_slots == 0
    assert_same_greedy(a.tokens, b.tokens, prompts, model, tie_tol=0.1, what="kernel vs reference")
    assert_same_greedy(a.tokens, single, prompts, model, tie_tol=0.1, what="batched vs single")


@pytest.mark.parametrize("interleaved", [False, True], ids=["per-layer", "interleaved"])
def test_decode_loop_has_no_cache_copy_at_scale(interleaved):
    cfg = models.get_preset("llama-3-8b").replace(num_layers=2)
    model = models.abstract_model(cfg, dtype=jnp.bfloat16)
    graphdef, params = nnx.split(model)
    B = 32
    cache_cfg = models.cache_config_for(cfg, max_batch=B, max_seq=1024, dtype="bfloat16",
                                        layers_per_group=cfg.num_layers if interleaved else 1)
    with jv.KVCacheManager(cache_cfg) as m:
        cache = m.cache([m.allocate() for _ in range(B)], np.zeros(B, np.int32))  # live slots, nothing mapped
        spec = AttentionSpec(impl="kernel", max_len=1024)
        rows = SamplingRows.padding(B)
        stop = jnp.full((B, 1), -1, jnp.int32)
        logits = jnp.zeros((B, cfg.vocab_size), jnp.float32)
        carry = jax.eval_shape(lambda: dec.start_carry(logits, rows, jnp.full((B,), 8), stop, 256, "greedy"))
        decode_program = dec.programs(cache.donates)[1]
        text = decode_program.lower(graphdef, params, cache, carry, jnp.int32(255), jnp.full((B,), 256), stop,
                                    rows, attn=spec, mode="greedy").compile().as_text()
        assert_no_cache_copy(text, m)


def test_cli_generate_on_gpu(capsys):
    from jax_vattention_cli.main import main

    rc = main(["generate", "--max-tokens", "150", "--num-prompts", "4", "--prompt-len", "300"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "bfloat16 on gpu" in out and "closed: nothing reserved or mapped" in out
