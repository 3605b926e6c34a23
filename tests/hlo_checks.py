"""Find copies in compiled HLO: the check behind the no-full-cache-copy rule."""

from __future__ import annotations

import math
import re

# e.g. "%copy.3 = bf16[4,128,2,16]{3,2,1,0} copy(%p)" or a copy-start tuple.
_INSTR = re.compile(r"=\s*(?P<type>\(?[a-z0-9]+\[[^=]*?)\s(?P<op>copy|copy-start)\(")
_SHAPE = re.compile(r"[a-z0-9]+\[([0-9,]*)\]")


def copied_element_counts(hlo_text: str) -> list[int]:
    """Element counts of the results of every copy / copy-start in the module."""
    counts = []
    for line in hlo_text.splitlines():
        m = _INSTR.search(line)
        if not m:
            continue
        for dims in _SHAPE.findall(m.group("type")):
            counts.append(math.prod(int(d) for d in dims.split(",") if d) if dims else 1)
    return counts


def cache_sized_copies(hlo_text: str, cache_elements: int) -> list[int]:
    """Copies at least as large as one cache tensor."""
    return [n for n in copied_element_counts(hlo_text) if n >= cache_elements]
