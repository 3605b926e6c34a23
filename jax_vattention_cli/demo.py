"""``jax-vattention demo``: the cache alone, grown inside a jitted decode loop.

It opens a vAttention cache, admits a few requests of ragged prompt lengths,
runs a jit-compiled ``lax.while_loop`` of decode steps that grows each slot
inside the graph through the FFI grow call (rows stop growing when their
request finishes), and prints physical (mapped) vs reserved memory and what a
static ``max_batch x max_seq`` cache would hold.
"""

from __future__ import annotations

import os

MIB = 1 << 20


def _fmt(nbytes: int) -> str:
    return f"{nbytes / MIB:,.1f} MiB"


def add_demo_parser(sub) -> None:
    demo = sub.add_parser("demo", help="grow a vAttention cache inside a jitted decode loop and print memory")
    demo.add_argument("--layers", type=int, default=4)
    demo.add_argument("--max-batch", type=int, default=8)
    demo.add_argument("--max-seq", type=int, default=16384)
    demo.add_argument("--kv-heads", type=int, default=4)
    demo.add_argument("--head-dim", type=int, default=64)
    demo.add_argument("--layers-per-group", type=int, default=1,
                      help="1: a K and a V tensor per layer; --layers: every layer interleaved per token")
    demo.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    demo.add_argument("--prompts", type=int, nargs="+", default=[100, 3000, 5000, 700])
    demo.add_argument("--new-tokens", type=int, nargs="+", default=[300, 1200, 50, 900])


def run_demo(args) -> int:
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave GPU memory to the page pool
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax import lax

    import jax_vattention as jv

    prompts = np.array(args.prompts, np.int32)
    budgets = np.array(args.new_tokens, np.int32)
    if len(prompts) != len(budgets):
        raise ValueError("--prompts and --new-tokens need the same number of values")
    if (budgets <= 0).any():
        raise ValueError("every --new-tokens value must be positive")
    if (prompts <= 0).any():
        raise ValueError("every --prompts value must be positive")
    if len(prompts) > args.max_batch:
        raise ValueError(f"{len(prompts)} prompts need {len(prompts)} slots, more than --max-batch={args.max_batch}")
    cfg = jv.CacheConfig(
        num_layers=args.layers, max_batch=args.max_batch, max_seq=args.max_seq,
        kv_heads=args.kv_heads, head_dim=args.head_dim, dtype=args.dtype, layers_per_group=args.layers_per_group,
    )
    device = jv.default_device()
    print(f"device: {device.device_kind if hasattr(device, 'device_kind') else device.platform}")
    with jv.KVCacheManager(cfg) as m:
        print(m)
        if (prompts + budgets > m.max_seq).any():
            raise ValueError(f"a prompt plus its new tokens exceeds max_seq={m.max_seq}")
        slots = np.array([m.allocate(int(p)) for p in prompts], np.int32)  # prefill-sized slots
        print(f"admitted {len(slots)} requests into slots {slots.tolist()}, prompts {prompts.tolist()}")
        print(f"  after admission: mapped {_fmt(m.stats().mapped_bytes)}")
        cache = m.cache(slots, prompts)
        maps_before = m.stats().maps
        head = (cfg.kv_heads, cfg.head_dim)

        @jax.jit
        def generate(cache, budgets):
            def cond(carry):
                step, _ = carry
                return step < budgets.max()

            def body(carry):
                step, state = carry
                c = cache.with_state(state)
                alive = (step < budgets).astype(jnp.int32)  # finished rows stop growing
                c = c.grow(c.lengths + alive)
                pos = c.lengths - 1
                kv = (pos[:, None, None, None] + jnp.zeros((len(budgets), 1, *head))).astype(cfg.jnp_dtype)
                for layer in range(cfg.num_layers):
                    c.write(layer, kv, -kv)
                return step + 1, c.state

            return lax.while_loop(cond, body, (jnp.int32(0), cache.state))[1]

        state = generate(cache, jnp.asarray(budgets))
        lengths = np.asarray(state.lengths)
        assert (lengths == prompts + budgets).all(), lengths
        # Spot check: the token at the last position of each slot holds its position.
        (tensor, entry), _ = cfg.locate(cfg.num_layers - 1)  # where the last layer's K lives
        last_k = m.tensors[tensor]
        at = (entry // 2, entry % 2) if cfg.interleaved else ()  # [MB, S, g, 2, Hkv, D] or [MB, S, Hkv, D]
        last = [float(last_k[(int(s), int(n) - 1, *at, 0, 0)]) for s, n in zip(slots, lengths)]
        assert last == [float(jnp.asarray(n - 1, cfg.jnp_dtype)) for n in lengths], last
        st = m.stats()
        static_bytes = 2 * cfg.num_layers * cfg.max_batch * m.max_seq * cfg.entry_bytes
        live_bytes = 2 * cfg.num_layers * int(lengths.sum()) * cfg.entry_bytes
        print(f"decoded {int(budgets.sum())} tokens in one jitted while_loop; final lengths {lengths.tolist()}")
        print(f"  the loop's grow calls mapped {st.maps - maps_before} more pages as rows crossed page boundaries")
        print(f"  reserved (virtual)        {_fmt(st.reserved_bytes)}")
        print(f"  mapped (physical)         {_fmt(st.mapped_bytes)}  in {st.pages_mapped} pages of "
              f"{_fmt(st.page_bytes)}")
        print(f"  tokens actually cached    {_fmt(live_bytes)}")
        print(f"  static max_batch x max_seq cache would hold {_fmt(static_bytes)} "
              f"({static_bytes / max(st.mapped_bytes, 1):.1f}x the mapped memory)")
        m.free(int(slots[0]))
        print(f"freed slot {slots[0]}: {st.pages_mapped - m.stats().pages_mapped} pages unmapped "
              f"(deferred reclamation keeps {m.stats().pages_mapped_free_slots} for reuse)")
        print(f"trim(): unmapped {m.trim()} pages; mapped now {_fmt(m.stats().mapped_bytes)}")
    print("closed: " + ("nothing reserved or mapped" if m.stats().reserved_bytes == 0 else "LEAK"))
    return 0
