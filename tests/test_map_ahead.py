"""MapAhead's eager allocation backs off under pool pressure (the lookahead would hold pages admission needs)."""

from __future__ import annotations

import math

import pytest

import jax_vattention as jv
from jax_vattention.cache import VAttentionPool
from jax_vattention.engine.map_ahead import MapAhead
from jax_vattention.engine.request import Request
from jax_vattention.engine.scheduler import Chunk
from jax_vattention.sampling import SamplingParams


def make_pool(pages: int) -> VAttentionPool:
    # 1 layer, K and V [4, 256, 1, 32] float32: 128 B per token, 32 tokens per 4 KiB page; `pages` page indices
    cfg = jv.CacheConfig(num_layers=1, max_batch=4, max_seq=256, kv_heads=1, head_dim=32, dtype="float32",
                         page_bytes=4096, layers_per_group=1, pool_bytes=pages * 2 * 4096)
    return VAttentionPool(jv.KVCacheManager(cfg))


def decode_chunk(pool, prompt_len: int) -> Chunk:
    r = Request(0, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=200))
    alloc = pool.allocate(prompt_len)
    assert alloc.slot is not None
    r.slot, r.num_cached = alloc.slot, prompt_len - 1
    return Chunk(r, prompt_len - 1, 1)


@pytest.mark.parametrize("pages,expect_ahead", [(16, True), (2, False)])
def test_lookahead_maps_ahead_only_while_the_pool_has_room(pages, expect_ahead):
    pool = make_pool(pages)
    try:
        chunk = decode_chunk(pool, 32)  # 1 page (x2 tensors) mapped, the next token starts page 2
        ahead = MapAhead(pool, "inline", lookahead=64, chunk_size=64)
        spare = pool.pages_total() - pool.pages_live()
        assert ahead.lookahead_now(1) == (64 if spare >= pool.pages_needed(64) else 0)
        ahead.start([(0, chunk)])
        cap = pool.capacity(chunk.request.slot)
        if expect_ahead:
            assert cap == 32 * math.ceil((33 + 64) / 32)  # the next token and 64 more
        else:
            assert cap == 64  # only the page the next token needs
        assert (ahead.lookahead_now(1) > 0) == expect_ahead
    finally:
        pool.close()
