"""Frozen model configuration, read from an HF ``config.json`` or a named preset.

One dataclass covers the Llama family this package implements: Llama 2/3/3.1/3.2
(RoPE with optional ``llama3`` or ``linear`` scaling, GQA, SwiGLU, tied or untied
embeddings), Mistral (Llama layers, no sliding window in use) and Qwen2 (biases
on the q/k/v projections).

Both the HF config layouts in the wild are accepted: ``rope_theta`` +
``rope_scaling`` (transformers 4.x checkpoints) and ``rope_parameters``
(transformers 5.x).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from .errors import CheckpointError, UnknownPresetError, UnsupportedModelError

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling (``rope_type`` "llama3" or "linear"); hashable, so usable as a jit static."""

    rope_type: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


def _hf_int(hf: dict[str, Any], key: str, source: str, default: int | None = None) -> int:
    """An integer field of an HF config; a float (2.7), bool or string is refused, never truncated."""
    value = hf.get(key)
    if value is None:
        if default is None:
            raise KeyError(key)
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise CheckpointError(f"{source}: {key} must be an integer, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shapes and numerics of a Llama-family decoder."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2: biases on q/k/v projections
    o_bias: bool = False  # Llama ``attention_bias`` also puts one on o_proj
    mlp_bias: bool = False
    sliding_window: int | None = None  # Mistral v0.1; generation refuses contexts beyond it
    architecture: str = "LlamaForCausalLM"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise UnsupportedModelError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if not (isinstance(self.rms_norm_eps, (int, float)) and math.isfinite(self.rms_norm_eps)
                and self.rms_norm_eps > 0):
            raise UnsupportedModelError(
                f"ModelConfig.rms_norm_eps must be a finite number > 0, got {self.rms_norm_eps!r}")
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(
                f"num_attention_heads={self.num_heads} is not a multiple of num_key_value_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise UnsupportedModelError(f"head_dim must be even for RoPE, got {self.head_dim}")

    @property
    def group(self) -> int:
        """Query heads per KV head (GQA)."""
        return self.num_heads // self.num_kv_heads

    def num_params(self) -> int:
        h, d = self.hidden_size, self.head_dim
        attn = h * d * (2 * self.num_heads + 2 * self.num_kv_heads)
        if self.qkv_bias:
            attn += d * (self.num_heads + 2 * self.num_kv_heads)
        per_layer = attn + 3 * h * self.intermediate_size + 2 * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.vocab_size * h + self.num_layers * per_layer + h + head

    def kv_bytes_per_token(self, itemsize: int) -> int:
        """K and V bytes one token takes over all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # -- HF config.json ----------------------------------------------------
    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], *, source: str = "config.json") -> ModelConfig:
        archs = hf.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            by_type: dict[object, str] = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}  # model_type: any JSON
            arch = by_type.get(hf.get("model_type")) if not archs else None
        if arch is None:
            raise UnsupportedModelError(
                f"{source}: unsupported architecture {archs or hf.get('model_type')!r}; supported: "
                f"{sorted(SUPPORTED_ARCHITECTURES)}")
        act = hf.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise UnsupportedModelError(f"{source}: hidden_act={act!r} is not supported (SwiGLU needs silu)")
        try:
            heads = _hf_int(hf, "num_attention_heads", source)
            hidden = _hf_int(hf, "hidden_size", source)
            theta, scaling = _rope_from_hf(hf, source)
            sliding = None
            if arch == "MistralForCausalLM" or hf.get("use_sliding_window"):
                sliding = hf.get("sliding_window")
            eos = hf.get("eos_token_id")
            eos = () if eos is None else tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]))
            bias = bool(hf.get("attention_bias", False))
            return cls(
                vocab_size=_hf_int(hf, "vocab_size", source),
                hidden_size=hidden,
                intermediate_size=_hf_int(hf, "intermediate_size", source),
                num_layers=_hf_int(hf, "num_hidden_layers", source),
                num_heads=heads,
                num_kv_heads=_hf_int(hf, "num_key_value_heads", source, heads),
                head_dim=_hf_int(hf, "head_dim", source, hidden // heads),
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                rope_theta=theta,
                rope_scaling=scaling,
                max_position_embeddings=_hf_int(hf, "max_position_embeddings", source, 8192),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                qkv_bias=arch == "Qwen2ForCausalLM" or bias,
                o_bias=bias,
                mlp_bias=bool(hf.get("mlp_bias", False)),
                sliding_window=int(sliding) if sliding else None,
                architecture=arch,
                bos_token_id=hf.get("bos_token_id"),
                eos_token_ids=eos,
            )
        except KeyError as e:
            raise CheckpointError(f"{source}: missing required field {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            if isinstance(e, (UnsupportedModelError, CheckpointError)):
                raise
            raise CheckpointError(f"{source}: bad value ({e})") from None

    @classmethod
    def from_hf_json(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise CheckpointError(f"{path}: no config.json (is this a Hugging Face model directory?)")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise CheckpointError(f"{path}: expected a JSON object")
        return cls.from_hf_dict(data, source=str(path))


def _rope_from_hf(hf: dict, source: str) -> tuple[float, RopeScaling | None]:
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" not in params and params:
        raise UnsupportedModelError(f"{source}: per-layer rope_parameters are not supported")
    if isinstance(params, dict):
        theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
        scaling = params
    else:
        theta = float(hf.get("rope_theta", 10000.0))
        scaling = hf.get("rope_scaling") or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(f"{source}: rope_type={rope_type!r} is not supported ({SUPPORTED_ROPE_TYPES})")
    if hf.get("partial_rotary_factor", scaling.get("partial_rotary_factor", 1.0)) != 1.0:
        raise UnsupportedModelError(f"{source}: partial_rotary_factor != 1 is not supported")
    if rope_type == "default":
        return theta, None
    if rope_type == "linear":
        return theta, RopeScaling("linear", float(scaling["factor"]))
    return theta, RopeScaling(
        "llama3",
        float(scaling["factor"]),
        float(scaling.get("low_freq_factor", 1.0)),
        float(scaling.get("high_freq_factor", 4.0)),
        int(scaling.get("original_max_position_embeddings", hf.get("max_position_embeddings", 8192))),
    )


def _llama3_8b() -> ModelConfig:
    return ModelConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
        num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=8192,
        bos_token_id=128000, eos_token_ids=(128001,),
    )


# Shapes of public checkpoints (random weights when used without --model).
PRESETS: dict[str, ModelConfig] = {
    # Runs anywhere in seconds; head_dim 64 so the Pallas kernels accept it in bf16.
    "tiny": ModelConfig(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
        head_dim=64, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=131072,
        tie_word_embeddings=True, eos_token_ids=(),
    ),
    "llama-3.2-1b": ModelConfig(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
        num_kv_heads=8, head_dim=64, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=RopeScaling("llama3", 32.0, 1.0, 4.0, 8192), max_position_embeddings=131072,
        tie_word_embeddings=True, bos_token_id=128000, eos_token_ids=(128001, 128008, 128009),
    ),
    "llama-3-8b": _llama3_8b(),
    # Llama-3-70B's shapes: about 141 GB of bf16 weights, more than one H200 holds with any KV cache (issue 19).
    "llama-3-70b": ModelConfig(
        vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64,
        num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=8192,
        bos_token_id=128000, eos_token_ids=(128001,),
    ),
    "qwen2-7b": ModelConfig(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28,
        num_kv_heads=4, head_dim=128, rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=131072,
        qkv_bias=True, architecture="Qwen2ForCausalLM", eos_token_ids=(151643,),
    ),
    # Mistral-7B v0.3 shapes (v0.1's 4096-token sliding window is dropped in v0.2+).
    "mistral-7b": ModelConfig(
        vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
        num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=1000000.0, max_position_embeddings=32768,
        architecture="MistralForCausalLM", bos_token_id=1, eos_token_ids=(2,),
    ),
}


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise UnknownPresetError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None


def param_count_str(cfg: ModelConfig) -> str:
    n = cfg.num_params()
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"
