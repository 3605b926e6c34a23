"""Check compiled HLO for copies of cache-sized buffers.

XLA copies a jit argument when the program needs it in another layout (a
gather can ask for one), when it is returned without donation, or when an
in-place update is applied to a non-donated buffer. On a sparsely mapped cache
such a copy reads unmapped pages. ``assert_no_cache_copy`` lets tests,
benchmarks and users check a compiled step before running it;
``copies_of_views`` finds copies whose operand is a cache view (for programs
whose activations can legitimately exceed a small cache), and
``check_compiled`` picks one of the two. This is the one HLO copy guard of the
project: ``models``, the engine, the benchmarks and the tests all use it.
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
    """Raise VAttentionError if the compiled module copies a buffer as large as one layer's K (or V).

    One layer's ``[MB, S, Hkv, D]`` is the smallest cache-sized buffer in either layout (an interleaved
    tensor holds ``2 * g`` of them), so a copy of a layer's strided slice is caught too.
    """
    elements = manager.config.max_batch * manager.max_seq * manager.config.kv_heads * manager.config.head_dim
    found = cache_sized_copies(compiled_text, elements)
    if found:
        raise VAttentionError(
            f"the compiled program copies {len(found)} cache-sized buffer(s) ({found} elements; a layer's K has "
            f"{elements}); on a sparsely mapped cache that copy reads unmapped memory. Read the cache with "
            "dynamic_slice or a Pallas kernel, never return or donate the views."
        )


_COMP = re.compile(r"^(?P<entry>ENTRY\s+)?%(?P<name>[\w.\-]+)\s+\(.*\{\s*$")
_INST = re.compile(
    r"^\s*(?:ROOT\s+)?%(?P<name>[\w.\-]+)\s*=\s*(?P<type>.*?)\s(?P<op>[\w\-]+)\((?P<args>[^)]*)\)(?P<rest>.*)$")
_DIMS = re.compile(r"^[a-z0-9]+\[([0-9,]*)\]")
_COPIES = ("copy", "copy-start", "transpose")
_PASS_THROUGH = ("bitcast", "reshape", "copy", "copy-start", "copy-done", "transpose")


def _parse_hlo(text: str):
    """Computations ``{name: {instruction: (type, op, args)}}``, the ENTRY name, and call sites per callee."""
    comps: dict[str, dict[str, tuple[str, str, list[str]]]] = {}
    callers: dict[str, list[tuple[dict[str, tuple[str, str, list[str]]], list[str]]]] = {}
    entry, current = None, None
    for line in text.splitlines():
        m = _COMP.match(line)
        if m:
            current = comps.setdefault(m["name"], {})
            entry = m["name"] if m["entry"] else entry
            continue
        m = _INST.match(line)
        if m is None or current is None:
            continue
        args = [a.strip().lstrip("%") for a in m["args"].split(",") if a.strip()]
        current[m["name"]] = (m["type"], m["op"], args)
        for callee in re.findall(r"calls=%([\w.\-]+)", m["rest"]):
            callers.setdefault(callee, []).append((current, args))
    return comps, entry, callers


def _dims(typ: str):
    m = _DIMS.match(typ)
    return tuple(int(d) for d in m[1].split(",") if d) if m else None


def copies_of_views(text: str, view_dims: tuple) -> list[str]:
    """Copy / transpose instructions whose operand is (a bitcast, reshape or fusion parameter of) an
    ENTRY parameter shaped like a cache view: what a layout change or a returned view looks like."""
    comps, entry, callers = _parse_hlo(text)
    names = {id(c): n for n, c in comps.items()}

    def is_view(comp, name, seen) -> bool:
        if (id(comp), name) in seen or name not in comp:
            return False
        seen.add((id(comp), name))
        typ, op, args = comp[name]
        if op == "parameter":
            if names[id(comp)] == entry:
                return _dims(typ) == view_dims
            i = int(args[0])  # parameter i of a fused / called computation: operand i at each call site
            sites = callers.get(names[id(comp)], [])
            return any(i < len(ops) and is_view(caller, ops[i], seen) for caller, ops in sites)
        return op in _PASS_THROUGH and bool(args) and is_view(comp, args[0], seen)

    return [name for comp in comps.values() for name, (typ, op, args) in comp.items()
            if op in _COPIES and args and is_view(comp, args[0], set())]


def check_compiled(text: str, manager, *, strict: bool) -> None:
    """Refuse a compiled program that copies a cache view.

    ``strict``: ``jax_vattention.hlo.assert_no_cache_copy`` - no copy or transpose
    at least as large as a cache tensor; right for the decode loop, where every
    activation is far smaller than the cache. A prefill's activations (the
    kernels' GQA re-layout of ``q [B, T, Hq, D]``, the reference's scores) can
    legitimately exceed a small cache, so prefill programs are checked for
    copies whose operand is a cache view (``copies_of_views``).
    """
    if strict:
        assert_no_cache_copy(text, manager)
        return
    found = copies_of_views(text, manager.config.tensor_shape(manager.max_seq))
    if found:
        raise VAttentionError(
            f"the compiled program copies a cache view ({found[:4]}); on a sparsely mapped cache that copy reads "
            "unmapped memory. Read the cache with dynamic_slice, a gather or a Pallas kernel; never return or donate "
            "the views.")
