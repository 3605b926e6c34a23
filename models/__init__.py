"""Llama-family models (Llama, Mistral, Qwen2) in Flax NNX on the vAttention KV cache.

    from models import Generator, load_model, random_model, get_preset
    from jax_vattention import SamplingParams
    model = load_model("/path/to/hf-dir", dtype="bfloat16")      # or random_model(get_preset("tiny"))
    with jax_vattention.KVCacheManager(cache_config_for(model.config, ...)) as manager:
        result = Generator(model).generate(prompts, manager, SamplingParams(max_tokens=64))

The layer above ``jax_vattention``: models implement its protocols (the model is
a ``jax_vattention.engine.CausalLM`` and calls any ``jax_vattention.cache``
cache the same way); nothing in ``jax_vattention`` imports this package.

Modules: ``config`` (ModelConfig, presets), ``layers`` (norms, projections,
RoPE) and ``llama`` (the decoder), ``loading`` (HF safetensors), ``decode``
(jit programs), ``generate`` (the host loop), ``tokenizer`` (a byte-level tokenizer for random-weight
presets), ``source`` (the model source behind ``jax_vattention.engine.LLM("tiny")`` and
``LLM("/path/to/hf-dir")``, declared as an entry point), ``testing`` (comparison helpers).
"""

from __future__ import annotations

from jax_vattention.cache import StaticKVCache

from .config import PRESETS, ModelConfig, RopeScaling, get_preset
from .decode import decode_step, prefill
from .errors import CheckpointError, GenerationInputError, ModelError, UnknownPresetError, UnsupportedModelError
from .generate import GenerationResult, Generator, check_requests, generate
from .llama import LlamaForCausalLM, abstract_model, random_model
from .loading import load_chat_template, load_model, load_tokenizer
from .source import SOURCE, ModelsSource
from .tokenizer import byte_level_tokenizer, chat_template_for, tokenizer_for


def cache_config_for(cfg: ModelConfig, *, max_batch: int, max_seq: int, dtype="bfloat16", **kwargs):
    """A ``jax_vattention.CacheConfig`` shaped for ``cfg`` (layers, kv heads, head_dim)."""
    import jax_vattention as jv

    return jv.CacheConfig(num_layers=cfg.num_layers, max_batch=max_batch, max_seq=max_seq,
                          kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, dtype=dtype, **kwargs)


def static_cache_for(cfg: ModelConfig, *, max_batch: int, max_seq: int, dtype="bfloat16") -> StaticKVCache:
    """A zeroed ``StaticKVCache`` shaped for ``cfg``."""
    return StaticKVCache.create(cfg.num_layers, max_batch, max_seq, cfg.num_kv_heads, cfg.head_dim, dtype)


__all__ = [
    "PRESETS",
    "SOURCE",
    "CheckpointError",
    "GenerationInputError",
    "GenerationResult",
    "Generator",
    "LlamaForCausalLM",
    "ModelConfig",
    "ModelError",
    "ModelsSource",
    "RopeScaling",
    "UnknownPresetError",
    "UnsupportedModelError",
    "abstract_model",
    "byte_level_tokenizer",
    "chat_template_for",
    "cache_config_for",
    "check_requests",
    "decode_step",
    "generate",
    "get_preset",
    "load_model",
    "load_chat_template",
    "load_tokenizer",
    "tokenizer_for",
    "prefill",
    "random_model",
    "static_cache_for",
]
