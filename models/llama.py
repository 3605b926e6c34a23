"""The Llama-family decoder (Llama 2/3/3.1/3.2, Mistral, Qwen2) in Flax NNX, on an explicit KV cache.

The cache is an argument, never module state::

    cache = cache.grow(cache.lengths + counts)       # back the new tokens (maps pages in-graph)
    logits, cache = model(tokens, positions, cache)  # writes K/V of the pending tokens, attends

``tokens``/``positions`` are ``[B, T]``; row b's first ``cache.num_new[b]``
tokens are real (the ones ``grow`` made pending), the rest padding. ``cache`` is
any ``jax_vattention.cache.KVCacheLike`` (the vAttention cache writes through
the FFI call and returns the same views; the static and paged baselines write
functionally and return new buffers), called the same way for each, or
``None`` for a plain causal forward over ``tokens``. The model implements
``jax_vattention.engine.CausalLM`` (``forward_segments``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jax_vattention.attention import AttentionSpec, dense_causal_attention

from .config import ModelConfig
from .layers import MLP, Embed, Linear, RMSNorm, apply_rope, model_inverse_frequencies


@functools.lru_cache(maxsize=64)
def _inv_freq(cfg: ModelConfig):
    return model_inverse_frequencies(cfg)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, *, dtype, init_std: float, rngs: nnx.Rngs):
        h, d = cfg.hidden_size, cfg.head_dim
        kw = dict(dtype=dtype, init_std=init_std, rngs=rngs)
        self.q_proj = Linear(h, cfg.num_heads * d, use_bias=cfg.qkv_bias, **kw)
        self.k_proj = Linear(h, cfg.num_kv_heads * d, use_bias=cfg.qkv_bias, **kw)
        self.v_proj = Linear(h, cfg.num_kv_heads * d, use_bias=cfg.qkv_bias, **kw)
        self.o_proj = Linear(cfg.num_heads * d, h, use_bias=cfg.o_bias, **kw)
        self.cfg = cfg
        self.layer = layer

    def _qkv(self, x, positions):
        """``x [B, T, H]``, ``positions [B, T]`` -> q ``[B, T, Hq, D]`` and k ``[B, T, Hkv, D]`` with RoPE, v."""
        cfg = self.cfg
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, cfg.num_heads, cfg.head_dim)
        k = self.k_proj(x).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        v = self.v_proj(x).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        inv_freq = _inv_freq(cfg)
        return apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq), v

    def __call__(self, x, positions, cache, attn: AttentionSpec, segments=None):
        if segments is not None:
            return self._segmented(x, positions, cache, attn, segments)
        cfg = self.cfg
        b, t, _ = x.shape
        q, k, v = self._qkv(x, positions)  # [B, T, Hq, D], [B, T, Hkv, D] x2
        if cache is None:
            o = dense_causal_attention(q, k, v)  # [B, T, Hq, D]
        else:
            dtype = cache.dtype
            lengths, cache = cache.write(self.layer, k.astype(dtype), v.astype(dtype))
            o = cache.attention(self.layer, q, lengths, attn)  # [B, T, Hq, D], reads below lengths only
        return self.o_proj(o.reshape(b, t, cfg.num_heads * cfg.head_dim).astype(x.dtype)), cache

    def _segmented(self, x, positions, cache, attn: AttentionSpec, segments):
        """Flat tokens ``x [N, H]`` of several row groups, e.g. a hybrid batch's decodes and prefill chunks.

        ``segments`` (static) is ``((r0, r1, T), ...)``: rows ``[r0, r1)`` of the
        cache each bring ``T`` consecutive tokens of ``x``. The projections and
        the MLP run once over all N tokens (one pass over the weights); each
        group gets its own write and attention shape, so decode rows use the
        decode kernel instead of being padded to the prefill chunk length.
        """
        cfg = self.cfg
        q, k, v = (a[:, 0] for a in self._qkv(x[:, None], positions[:, None]))  # [N, Hq, D], [N, Hkv, D] x2
        dtype = cache.dtype
        state, outs, off = cache.state, [], 0
        for r0, r1, t in segments:
            rows, m = r1 - r0, (r1 - r0) * t
            part = cache.select_rows(r0, r1)
            ks = k[off:off + m].reshape(rows, t, cfg.num_kv_heads, cfg.head_dim).astype(dtype)
            vs = v[off:off + m].reshape(rows, t, cfg.num_kv_heads, cfg.head_dim).astype(dtype)
            lengths, part = part.write(self.layer, ks, vs)
            qs = q[off:off + m].reshape(rows, t, cfg.num_heads, cfg.head_dim)
            outs.append(part.attention(self.layer, qs, lengths, attn).reshape(m, cfg.num_heads * cfg.head_dim))
            cache = part.with_state(state)  # the (possibly new) buffers serve every row again
            off += m
        o = jnp.concatenate(outs) if len(outs) > 1 else outs[0]  # [N, Hq * D]
        return self.o_proj(o.astype(x.dtype)), cache


    def packed(self, x, positions, cache, attn: AttentionSpec, rows):
        """Flat tokens ``x [N, H]`` of a packed step: rows of any lengths one after the other, as ``rows``
        (``jax_vattention.packing.PackedRows``) lays them out; one write and one attention call for all rows."""
        cfg = self.cfg
        q, k, v = (a[:, 0] for a in self._qkv(x[:, None], positions[:, None]))  # [N, Hq, D], [N, Hkv, D] x2
        dtype = cache.dtype
        lengths, cache = cache.write_packed(self.layer, k.astype(dtype), v.astype(dtype), rows)
        o = cache.attention_packed(self.layer, q, lengths, rows, attn)  # [N, Hq, D]
        return self.o_proj(o.reshape(-1, cfg.num_heads * cfg.head_dim).astype(x.dtype)), cache


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, *, dtype, init_std: float, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        self.self_attn = Attention(cfg, layer, dtype=dtype, init_std=init_std, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, use_bias=cfg.mlp_bias, dtype=dtype,
                       init_std=init_std, rngs=rngs)

    def __call__(self, x, positions, cache, attn: AttentionSpec, segments=None, rows=None):
        h = self.input_layernorm(x)
        if rows is not None:
            a, cache = self.self_attn.packed(h, positions, cache, attn, rows)
        else:
            a, cache = self.self_attn(h, positions, cache, attn, segments)
        x = x + a  # [B, T, H]
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, cache


class LlamaModel(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, init_std: float, rngs: nnx.Rngs):
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, init_std=init_std, rngs=rngs)
        self.layers = nnx.List(
            [DecoderLayer(cfg, i, dtype=dtype, init_std=init_std, rngs=rngs) for i in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)


class LlamaForCausalLM(nnx.Module):
    """Decoder + LM head. ``dtype`` is the parameter and activation dtype (fp32 or bf16)."""

    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, init_std: float = 0.02, rngs: nnx.Rngs):
        self.config = cfg
        self.dtype = jnp.dtype(dtype).name
        self.model = LlamaModel(cfg, dtype=dtype, init_std=init_std, rngs=rngs)
        if cfg.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, dtype=dtype, init_std=init_std, rngs=rngs)

    def shard(self, mesh, axis: str = "tp") -> LlamaForCausalLM:
        """Place the parameters Megatron-style over ``mesh``'s ``axis`` (``models.sharding``); in place."""
        from .sharding import shard_model

        return shard_model(self, mesh, axis)

    def __call__(self, tokens, positions, cache=None, *, attn: AttentionSpec = AttentionSpec(), logit_index=None):
        """Forward ``tokens [B, T]`` at ``positions [B, T]``.

        Args:
          cache: a grown ``KVCache`` / ``StaticKVCache`` (see the module docstring) or None.
          attn: static attention choice (kernels or jnp reference, context bound).
          logit_index: optional ``[B] int32``; if given, logits only for token
            ``logit_index[b]`` of each row (``[B, V]``), instead of all ``[B, T, V]``.
        Returns:
          ``(logits, cache)``; logits in the model dtype. A vAttention cache comes
          back unchanged (its K/V were written in place), a static one with new buffers.
        """
        x = self.model.embed_tokens(tokens)  # [B, T, H]
        for layer in self.model.layers:
            x, cache = layer(x, positions, cache, attn)
        x = self.model.norm(x)  # [B, T, H]
        if logit_index is not None:
            x = jnp.take_along_axis(x, logit_index[:, None, None].astype(jnp.int32), axis=1)[:, 0]  # [B, H]
        if self.lm_head is None:
            return self.model.embed_tokens.attend(x), cache
        return self.lm_head(x), cache


    def forward_segments(self, tokens, positions, cache, segments, *, attn: AttentionSpec = AttentionSpec(),
                         logit_index=None):
        """Forward flat ``tokens [N]`` at ``positions [N]`` laid out in row groups (see ``Attention._segmented``).

        ``logit_index [R]``: flat indices of the tokens whose logits are wanted.
        Returns ``(logits [R, V], cache)``.
        """
        x = self.model.embed_tokens(tokens)  # [N, H]
        for layer in self.model.layers:
            x, cache = layer(x, positions, cache, attn, segments)
        x = self.model.norm(x[logit_index])  # [R, H]
        if self.lm_head is None:
            return self.model.embed_tokens.attend(x), cache
        return self.lm_head(x), cache


    def forward_packed(self, tokens, positions, cache, rows, *, attn: AttentionSpec = AttentionSpec(),
                       logit_index=None):
        """Forward a packed step: flat ``tokens [N]`` at ``positions [N]`` laid out as ``rows``
        (``jax_vattention.packing.PackedRows``). ``logit_index [R]``: flat indices of the tokens whose logits
        are wanted. Returns ``(logits [R, V], cache)``."""
        x = self.model.embed_tokens(tokens)  # [N, H]
        for layer in self.model.layers:
            x, cache = layer(x, positions, cache, attn, rows=rows)
        x = self.model.norm(x[logit_index])  # [R, H]
        if self.lm_head is None:
            return self.model.embed_tokens.attend(x), cache
        return self.lm_head(x), cache


def random_model(cfg: ModelConfig, *, seed: int = 0, dtype=jnp.float32, init_std: float = 0.02, mesh=None,
                 axis: str = "tp") -> LlamaForCausalLM:
    """A model with seeded random weights (presets, tests, benchmarks). With ``mesh``, tensor-parallel over its
    ``axis`` (``models.sharding``), each weight initialized where its shards live: a model larger than one device
    (Llama-3-70B on two H200s) never exists whole on one."""
    def build():
        return LlamaForCausalLM(cfg, dtype=dtype, init_std=init_std, rngs=nnx.Rngs(params=seed))

    if mesh is None:
        return build()
    from .sharding import check_divisible, shardings_of

    check_divisible(cfg, mesh.shape[axis])
    graphdef, abstract = nnx.split(nnx.eval_shape(build))
    state = jax.jit(lambda: nnx.split(build())[1], out_shardings=shardings_of(abstract, mesh, axis))()
    return nnx.merge(graphdef, state)


def abstract_model(cfg: ModelConfig, *, dtype=jnp.float32) -> LlamaForCausalLM:
    """The model's structure with ``ShapeDtypeStruct`` leaves (no memory), for loading checkpoints."""
    return nnx.eval_shape(lambda: LlamaForCausalLM(cfg, dtype=dtype, rngs=nnx.Rngs(params=0)))


@functools.partial(jax.jit, static_argnums=0)
def _full_logits(graphdef, params, tokens, positions):
    return nnx.merge(graphdef, params)(tokens, positions)[0]


def full_logits(model: LlamaForCausalLM, tokens, positions=None) -> jax.Array:
    """Jitted cache-free causal forward: logits ``[B, T, V]`` of ``tokens [B, T]`` (positions default 0..T-1)."""
    tokens = jnp.asarray(tokens, jnp.int32)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    graphdef, params = nnx.split(model)
    return _full_logits(graphdef, params, tokens, positions)
