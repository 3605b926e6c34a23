"""Building blocks of the decoder: Linear, Embed, RMSNorm, the SwiGLU MLP (Flax NNX) and RoPE.

Parameter names follow the HF checkpoint layout (``q_proj``, ``gate_proj``,
``input_layernorm``...) so loading is a mechanical rename; a Linear's ``kernel``
is ``[in, out]``, the transpose of HF's ``weight``.

Rotary embeddings use HF's ``rotate_half`` convention, with Llama-3.1
(``llama3``) and ``linear`` frequency scaling. The inverse frequencies are
computed in float32 with the same operations as transformers
(``1 / theta ** (arange(0, D, 2) / D)``), then scaled; the angles and their
cos/sin are fp32 and cast to the activation dtype before the rotation, exactly
as HF does, so fp32 models match HF to rounding.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .config import ModelConfig, RopeScaling


def _normal(rngs: nnx.Rngs, shape, std: float, dtype) -> jax.Array:
    return (jax.random.normal(rngs.params(), shape, jnp.float32) * std).astype(dtype)


class Linear(nnx.Module):
    """``y = x @ kernel (+ bias)`` in the parameter dtype."""

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool = False, dtype=jnp.float32,
                 init_std: float = 0.02, rngs: nnx.Rngs):
        self.kernel = nnx.Param(_normal(rngs, (in_features, out_features), init_std, dtype))  # [in, out]
        self.bias = nnx.Param(_normal(rngs, (out_features,), init_std, dtype)) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...]
        y = jnp.dot(x.astype(kernel.dtype), kernel)
        if self.bias is not None:
            y = y + self.bias[...]
        return y


class Embed(nnx.Module):
    def __init__(self, vocab_size: int, features: int, *, dtype=jnp.float32, init_std: float = 0.02,
                 rngs: nnx.Rngs):
        self.embedding = nnx.Param(_normal(rngs, (vocab_size, features), init_std, dtype))  # [V, H]

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], tokens, axis=0)  # [B, T, H]

    def attend(self, x: jax.Array) -> jax.Array:
        """Tied output head: ``x [.., H] @ embedding.T -> [.., V]``."""
        emb = self.embedding[...]  # contract H directly: a transposed copy of [V, H] is avoidable work
        return jax.lax.dot_general(x.astype(emb.dtype), emb, (((x.ndim - 1,), (1,)), ((), ())))


class RMSNorm(nnx.Module):
    """HF ``LlamaRMSNorm``: normalise in fp32, cast back, then scale by ``weight``."""

    def __init__(self, features: int, *, eps: float, dtype=jnp.float32):
        self.weight = nnx.Param(jnp.ones((features,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(xf), axis=-1, keepdims=True)
        normed = (xf * jax.lax.rsqrt(var + self.eps)).astype(x.dtype)
        return self.weight[...] * normed


class MLP(nnx.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, hidden: int, intermediate: int, *, use_bias: bool, dtype, init_std: float, rngs: nnx.Rngs):
        kw = dict(use_bias=use_bias, dtype=dtype, init_std=init_std, rngs=rngs)
        self.gate_proj = Linear(hidden, intermediate, **kw)
        self.up_proj = Linear(hidden, intermediate, **kw)
        self.down_proj = Linear(intermediate, hidden, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


# -- rotary position embeddings ------------------------------------------------------
def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
    """``[D/2]`` float32 inverse frequencies, scaled as ``scaling`` says."""
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv_freq = (np.float32(1.0) / (np.float32(theta) ** exponents)).astype(np.float32)
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return (inv_freq / np.float32(scaling.factor)).astype(np.float32)
    if scaling.rope_type != "llama3":
        raise ValueError(f"unsupported rope scaling {scaling.rope_type!r}")
    # Llama 3.1: long wavelengths are divided by `factor`, short ones kept, the band between smoothed.
    factor = scaling.factor
    low, high = scaling.low_freq_factor, scaling.high_freq_factor
    old_len = scaling.original_max_position_embeddings
    low_freq_wavelen = old_len / low
    high_freq_wavelen = old_len / high
    wavelen = (2 * math.pi / inv_freq).astype(np.float32)
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / np.float32(factor), inv_freq).astype(np.float32)
    smooth = ((old_len / wavelen - low) / (high - low)).astype(np.float32)
    smoothed = ((1 - smooth) * scaled / np.float32(factor) + smooth * scaled).astype(np.float32)
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def model_inverse_frequencies(cfg: ModelConfig) -> np.ndarray:
    return inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)


def rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotate ``x [B, T, H, D]`` by the angles of ``positions [B, T]``; returns x's dtype."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, D/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [B, T, 1, D]
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    if x.dtype != jnp.float32:  # HF casts cos/sin to the activation dtype and rotates in it
        cos, sin = cos.astype(x.dtype), sin.astype(x.dtype)
    return (x * cos + rotate_half(x) * sin).astype(x.dtype)
