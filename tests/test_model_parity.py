"""HF parity and checkpoint loading.

The checkpoints in tests/data were written by transformers from a seed, with the
transformers fp32 logits for fixed token ids (tests/data/make_hf_parity.py; it
needs torch and transformers, this file does not). Llama uses Llama-3.1 rope
scaling, Qwen2 q/k/v biases, tied embeddings and a sharded checkpoint, Mistral
an explicit head_dim != hidden/heads.
"""

import json
import shutil
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
from models.config import ModelConfig, RopeScaling
from models.errors import CheckpointError, UnknownPresetError, UnsupportedModelError
from models.layers import inverse_frequencies
from models.testing import rel_error

DATA = Path(__file__).parent / "data"
NAMES = ["llama", "qwen2", "mistral"]
PARITY = np.load(DATA / "hf_parity.npz")


@pytest.fixture(scope="module")
def hf_models():
    return {name: models.load_model(DATA / f"hf_{name}", dtype="float32") for name in NAMES}


def positions_like(ids):
    return jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape)


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers(hf_models, name):
    model = hf_models[name]
    ids = jnp.asarray(PARITY[f"{name}_input_ids"])
    ref = PARITY[f"{name}_logits"]
    logits = models.llama.full_logits(model, ids)
    assert logits.dtype == jnp.float32
    err = rel_error(logits, ref)
    assert err <= 1e-5, f"{name}: logits rel. error {err:.2e} > 1e-5"
    assert np.abs(ref).max() > 1.0  # the data is not degenerate


@pytest.mark.parametrize("interleaved", [False, True], ids=["per-layer", "interleaved"])
@pytest.mark.parametrize("name", NAMES)
def test_logits_through_vattention_cache_match_transformers(hf_models, name, interleaved):
    """The same logits when every token's K/V goes through the vAttention cache (fp32, host backend), in both
    layouts (CacheConfig.layers_per_group: 1, or every layer interleaved per token)."""
    model = hf_models[name]
    cfg = model.config
    ids = jnp.asarray(PARITY[f"{name}_input_ids"])
    ref = PARITY[f"{name}_logits"]
    cache_cfg = models.cache_config_for(cfg, max_batch=4, max_seq=64, dtype="float32", page_bytes=4096,
                                        layers_per_group=cfg.num_layers if interleaved else 1)
    with jv.KVCacheManager(cache_cfg) as m:
        slots = [m.allocate(), m.allocate()]
        cache = m.cache(slots[::-1], [0, 0])  # rows in reverse slot order

        graphdef, params = nnx.split(model)

        @jax.jit
        def run(params, cache, ids):  # the views are plain arguments; only the state is returned
            c = cache.grow(cache.lengths + ids.shape[1])
            logits, c = nnx.merge(graphdef, params)(ids, positions_like(ids), c)
            return logits, c.state

        logits, state = run(params, cache, ids)
        np.testing.assert_array_equal(np.asarray(state.lengths), [ids.shape[1]] * 2)
    err = rel_error(logits, ref)
    assert err <= 1e-5, f"{name}: logits through the cache rel. error {err:.2e}"


@pytest.mark.parametrize("interleaved", [False, True], ids=["per-layer", "interleaved"])
@pytest.mark.parametrize("name", NAMES)
def test_greedy_generation_matches_transformers(hf_models, name, interleaved):
    model = hf_models[name]
    prompt = PARITY[f"{name}_gen_prompt"][0]
    want = PARITY[f"{name}_gen_tokens"].tolist()
    cache_cfg = models.cache_config_for(model.config, max_batch=2, max_seq=32, dtype="float32", page_bytes=4096,
                                        layers_per_group=model.config.num_layers if interleaved else 1)
    with jv.KVCacheManager(cache_cfg) as m:
        result = models.Generator(model).generate([prompt], m, jv.SamplingParams(max_tokens=len(want), ignore_eos=True))
    assert result.tokens[0] == want


def test_sharded_checkpoint_and_tied_embeddings(hf_models):
    assert (DATA / "hf_qwen2" / "model.safetensors.index.json").is_file()
    assert len(list((DATA / "hf_qwen2").glob("*.safetensors"))) > 1
    qwen = hf_models["qwen2"]
    assert qwen.config.tie_word_embeddings and qwen.lm_head is None and qwen.config.qkv_bias
    assert float(jnp.abs(qwen.model.layers[0].self_attn.q_proj.bias[...]).max()) > 0
    assert hf_models["llama"].lm_head is not None
    assert hf_models["llama"].config.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 16)
    assert hf_models["mistral"].config.head_dim == 32 and hf_models["mistral"].config.sliding_window == 4096


def test_bfloat16_conversion(hf_models):
    model = models.load_model(DATA / "hf_llama", dtype="bfloat16")
    state = nnx.state(model)
    assert {x.dtype for x in jax.tree.leaves(state)} == {jnp.dtype(jnp.bfloat16)}
    ids = jnp.asarray(PARITY["llama_input_ids"])
    logits = models.llama.full_logits(model, ids)
    assert logits.dtype == jnp.bfloat16
    err = rel_error(np.asarray(logits, np.float32), PARITY["llama_logits"])
    assert 1e-5 < err < 0.05, err  # rounded, but the same model


def test_legacy_config_layout(tmp_path, hf_models):
    """transformers 4.x writes rope_theta + rope_scaling (with "type"), not rope_parameters."""
    d = tmp_path / "legacy"
    shutil.copytree(DATA / "hf_llama", d)
    cfg = json.loads((d / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    rope["type"] = rope.pop("rope_type")
    cfg["rope_scaling"] = rope
    (d / "config.json").write_text(json.dumps(cfg))
    model = models.load_model(d)
    assert model.config == hf_models["llama"].config
    ids = jnp.asarray(PARITY["llama_input_ids"])
    assert rel_error(models.llama.full_logits(model, ids), PARITY["llama_logits"]) <= 1e-5


def test_llama3_rope_scaling_bands():
    base = inverse_frequencies(128, 500000.0, None)
    scaled = inverse_frequencies(128, 500000.0, RopeScaling("llama3", 8.0, 1.0, 4.0, 8192))
    wavelen = 2 * np.pi / base
    high, low = wavelen < 8192 / 4, wavelen > 8192 / 1
    np.testing.assert_array_equal(scaled[high], base[high])  # short wavelengths untouched
    np.testing.assert_allclose(scaled[low], base[low] / 8, rtol=1e-6)  # long ones divided by the factor
    mid = ~high & ~low
    assert mid.any() and np.all(scaled[mid] < base[mid]) and np.all(scaled[mid] > base[mid] / 8)
    np.testing.assert_allclose(inverse_frequencies(64, 1e4, RopeScaling("linear", 4.0)),
                               inverse_frequencies(64, 1e4, None) / 4, rtol=1e-6)


@pytest.mark.parametrize("name,params_b", [("llama-3.2-1b", 1.236), ("llama-3-8b", 8.030), ("qwen2-7b", 7.616),
                                           ("mistral-7b", 7.248)])
def test_preset_shapes(name, params_b):
    cfg = models.get_preset(name)
    assert abs(cfg.num_params() / 1e9 - params_b) < 0.01, cfg.num_params()
    abstract = models.abstract_model(cfg, dtype=jnp.bfloat16)  # shapes only, no memory
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract)))
    assert n == cfg.num_params()


def test_unknown_preset():
    with pytest.raises(UnknownPresetError, match="unknown preset 'llama-9'.*tiny"):
        models.get_preset("llama-9")


# -- bad checkpoints ---------------------------------------------------------------
def copy_ckpt(tmp_path, name="llama"):
    d = tmp_path / name
    shutil.copytree(DATA / f"hf_{name}", d)
    return d


def edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def rewrite_tensors(d, fn):
    from safetensors import safe_open
    from safetensors.numpy import save_file

    path = d / "model.safetensors"
    with safe_open(str(path), framework="numpy") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(fn(tensors), str(path))


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        models.load_model(tmp_path / "nope")


def test_directory_without_config(tmp_path):
    d = copy_ckpt(tmp_path)
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        models.load_model(d)


def test_corrupt_config(tmp_path):
    d = copy_ckpt(tmp_path)
    (d / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        models.load_model(d)
    (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 64}))
    with pytest.raises(CheckpointError, match="missing required field"):
        models.load_model(d)


def test_corrupt_safetensors(tmp_path):
    d = copy_ckpt(tmp_path)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[:8] + b"\xff" * 64 + data[72:])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        models.load_model(d)
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(CheckpointError, match="model.safetensors"):
        models.load_model(d)


def test_no_weights(tmp_path):
    d = copy_ckpt(tmp_path)
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors"):
        models.load_model(d)


def test_missing_tensor(tmp_path):
    d = copy_ckpt(tmp_path)
    name = "model.layers.1.self_attn.k_proj.weight"
    rewrite_tensors(d, lambda t: {k: v for k, v in t.items() if k != name})
    with pytest.raises(CheckpointError, match=f"tensor '{name}' is missing"):
        models.load_model(d)


def test_shape_mismatch(tmp_path):
    d = copy_ckpt(tmp_path)
    edit_config(d, intermediate_size=96)
    with pytest.raises(CheckpointError, match=r"mlp.down_proj.weight' has shape \[64, 64\].*\[64, 96\]"):
        models.load_model(d)


def test_missing_shard(tmp_path):
    d = copy_ckpt(tmp_path, "qwen2")
    shard = sorted(d.glob("model-*.safetensors"))[2]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"shard '{shard.name}'.*missing"):
        models.load_model(d)


@pytest.mark.parametrize("change,match", [
    (dict(architectures=["GPT2LMHeadModel"]), "unsupported architecture"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}), "rope_type='yarn'"),
    (dict(num_key_value_heads=3), "not a multiple"),
])
def test_unsupported_configs(tmp_path, change, match):
    d = copy_ckpt(tmp_path)
    edit_config(d, **change)
    with pytest.raises(UnsupportedModelError, match=match):
        models.load_model(d)


def test_extra_tensors_warn(tmp_path):
    d = copy_ckpt(tmp_path)
    rewrite_tensors(d, lambda t: {**t, "model.extra.weight": np.zeros(3, np.float32),
                                  "model.layers.0.self_attn.rotary_emb.inv_freq": np.zeros(8, np.float32)})
    with pytest.warns(UserWarning, match=r"ignoring 1 tensor.*model.extra.weight"):
        models.load_model(d)


def test_bad_checkpoint_leaves_nothing_mapped(tmp_path):
    """A failed load inside a serving session maps nothing (the cache is untouched)."""
    d = copy_ckpt(tmp_path)
    edit_config(d, num_hidden_layers=3)
    cfg = ModelConfig.from_hf_json(d)
    with jv.KVCacheManager(models.cache_config_for(cfg, max_batch=2, max_seq=64, dtype="float32",
                                                   page_bytes=4096)) as m:
        with pytest.raises(CheckpointError, match="model.layers.2.*missing"):
            models.load_model(d)
        assert m.stats().pages_mapped == 0 and m.stats().live_slots == 0
