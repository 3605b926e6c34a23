"""Check compiled HLO for copies of cache-sized buffers.

XLA copies a jit argument when the program needs it in another layout (a
gather can ask for one), when it is returned without donation, or when an
in-place update is applied to a non-donated buffer. On a sparsely mapped cache
such a copy reads unmapped pages. ``assert_no_cache_copy`` lets tests,
benchmarks and users check a compiled step before running it.
"""

from __future__ import annotations

import math
import re

from .errors import VAttentionError

# e.g. "%copy.3 = bf16[4,128,2,16]{3,2,1,0} copy(%p)" or "(f32[8,4]{1,0}, ...) copy-start(%x)"
_INSTR = re.compile(r"=\s*(?P<type>\(?[a-z0-9]+\[[^=]*?)\s(?P<op>copy|copy-start|transpose)\(")
_SHAPE = re.compile(r"[a-z0-9]+\[([0-9,]*)\]")


def copied_element_counts(hlo_text: str) -> list[int]:
    """Element counts of the results of every copy, copy-start and transpose in the module."""
    counts = []
    for line in hlo_text.splitlines():
        m = _INSTR.search(line)
        if not m:
            continue
        for dims in _SHAPE.findall(m.group("type")):
            counts.append(math.prod(int(d) for d in dims.split(",") if d) if dims else 1)
    return counts


def cache_sized_copies(hlo_text: str, cache_elements: int) -> list[int]:
    """Copies (or transposes) at least as large as one cache tensor."""
    return [n for n in copied_element_counts(hlo_text) if n >= cache_elements]


def assert_no_cache_copy(compiled_text: str, manager) -> None:
    """Raise VAttentionError if the compiled module copies a buffer as large as a cache tensor."""
    elements = manager.config.max_batch * manager.max_seq * manager.config.kv_heads * manager.config.head_dim
    found = cache_sized_copies(compiled_text, elements)
    if found:
        raise VAttentionError(
            f"the compiled program copies {len(found)} cache-sized buffer(s) ({found} elements; a cache tensor has "
            f"{elements}); on a sparsely mapped cache that copy reads unmapped memory. Read the cache with "
            "dynamic_slice or a Pallas kernel, never return or donate the views."
        )
