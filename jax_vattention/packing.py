"""Packed ragged steps: every row's tokens flat in one token axis, with one padding bucket for the total.

A step of R rows (decodes and prefill chunks alike) lays row r's ``counts[r]``
tokens at ``[offsets[r], offsets[r] + counts[r])`` of a ``[N]`` token axis, one
row after the other; the tokens past the last row are padding. Only ``N``
(``token_bucket``), ``R`` and ``P`` (the prefill rows' capacity) are static, so a
run compiles one shape per token bucket, and no row is padded to the longest
chunk: the attention kernels take the rows as they lie (``varlen``).

Within a step the rows split by their token count: rows of one token (decodes,
and one-token chunks) go through the decode kernel, one query each; rows of two
or more through the varlen prefill kernel (``prefill_rows``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def token_bucket(n: int, cap: int, floor: int = 16) -> int:
    """``n`` tokens rounded up to the next of ``2^k`` and ``3 * 2^(k-1)`` (at most a third of a step is
    padding), at least ``floor`` (a power of two) and at most ``cap``."""
    b = max(int(floor), 1)
    while b < n:
        b = b * 2 if b < 4 else b * 3 // 2 if b & (b - 1) == 0 else b * 4 // 3  # 16 -> 24 -> 32 -> 48 ...
    return min(b, cap)


def token_buckets(cap: int, floor: int = 16) -> list[int]:
    """Every bucket ``token_bucket`` gives for ``1..cap`` (ascending)."""
    out, n = [], 1
    while True:
        b = token_bucket(n, cap, floor)
        out.append(b)
        if b >= cap:
            return out
        n = b + 1


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedRows:
    """Where a packed step's rows lie in its flat token axis (a pytree; ``max_row_tokens`` is static)."""

    offsets: Any  # [R] int32, flat index of row r's first token
    token_rows: Any  # [N] int32, the row of each token; -1 for padding tokens
    prefill_rows: Any  # [P] int32, the rows of two or more tokens, then -1
    # static bound on one row's tokens (the chunk size): what the references and the paged gather unpack to
    max_row_tokens: int = dataclasses.field(metadata=dict(static=True))

    @classmethod
    def build(cls, counts, num_tokens: int, num_rows: int, num_prefill: int, max_row_tokens: int) -> PackedRows:
        """The rows of ``counts`` (tokens per real row, in row order), packed from token 0, on the host."""
        counts = np.asarray(counts, np.int64)
        if counts.size > num_rows or counts.sum() > num_tokens:
            raise ValueError(f"{counts.size} rows of {int(counts.sum())} tokens do not fit a packed step of "
                             f"{num_rows} rows and {num_tokens} tokens")
        if counts.size and counts.max() > max_row_tokens:
            raise ValueError(f"a row of {int(counts.max())} tokens exceeds max_row_tokens={max_row_tokens}")
        offsets = np.zeros(num_rows, np.int32)
        offsets[:counts.size] = np.concatenate([[0], np.cumsum(counts)[:-1]]) if counts.size else []
        offsets[counts.size:] = counts.sum()  # padding rows: empty, at the end
        token_rows = np.full(num_tokens, -1, np.int32)
        token_rows[:counts.sum()] = np.repeat(np.arange(counts.size, dtype=np.int32), counts)
        multi = np.flatnonzero(counts >= 2).astype(np.int32)
        if multi.size > num_prefill:
            raise ValueError(f"{multi.size} rows of two or more tokens exceed the step's {num_prefill} prefill rows")
        prefill = np.full(num_prefill, -1, np.int32)
        prefill[:multi.size] = multi
        return cls(offsets, token_rows, prefill, int(max_row_tokens))

    def token_coords(self, slots, starts):
        """``(slot [N], position [N])`` of every token (slot -1 for padding tokens), from the rows'
        ``slots [R]`` and ``starts [R]`` (tokens cached before the step)."""
        rows = self.token_rows
        live = rows >= 0
        r = jnp.maximum(rows, 0)
        pos = starts[r] + jnp.arange(rows.shape[0], dtype=jnp.int32) - self.offsets[r]
        return jnp.where(live, slots[r], -1), jnp.where(live, pos, 0)

    def decode_queries(self, q, counts):
        """``(q [R, Hq, D], is_decode [R])``: each row's last query, and whether the row has exactly one token."""
        last = jnp.clip(self.offsets + counts - 1, 0, q.shape[0] - 1)
        return q[last], counts == 1

    def prefill_coords(self, slots, starts, counts):
        """``(slots, starts, q_lens, q_offsets)``, each ``[P]``, of the rows of two or more tokens (then rows of
        length 0 on the first row's slot)."""
        live = self.prefill_rows >= 0
        r = jnp.maximum(self.prefill_rows, 0)
        return slots[r], starts[r], jnp.where(live, counts[r], 0), self.offsets[r]

    def merge(self, prefill_out, decode_out, is_decode):
        """``[N, ...]``: the prefill kernel's packed output with each decode row's output at its token."""
        n = prefill_out.shape[0]
        dst = jnp.where(is_decode, self.offsets, n)  # not a decode row: dropped
        return prefill_out.at[dst].set(decode_out.astype(prefill_out.dtype), mode="drop")
