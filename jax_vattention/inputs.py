"""Request validation and shape bucketing, shared by ``models.Generator`` and the serving engine."""

from __future__ import annotations

from typing import Any

import numpy as np


class PromptError(ValueError):
    """A prompt is not a non-empty sequence of token ids in the vocabulary."""


def bucket(n: int, cap: int, floor: int = 1) -> int:
    """``n`` rounded up to a power of two, at least ``floor`` and at most ``cap``: bounds recompilation."""
    return min(cap, max(floor, 1 << max(0, int(n) - 1).bit_length()))


def check_prompt(prompt: Any, vocab_size: int, index: int | None = None) -> np.ndarray:
    """``prompt`` as ``[T] int32``, or ``PromptError`` naming prompt ``index`` (if given).

    Integer sequences only: floats, bools and strings are refused, never coerced.
    """
    what = "the prompt" if index is None else f"prompt {index}"
    if isinstance(prompt, (str, bytes)):
        raise PromptError(f"{what} is a string ({prompt!r:.40}); pass token ids (tokenize it first)")
    try:
        arr = np.asarray(prompt)
    except (TypeError, ValueError) as e:
        raise PromptError(f"{what} is not a sequence of token ids: {e}") from None
    if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
        raise PromptError(f"{what} must be a non-empty 1-D sequence of integer token ids, "
                          f"got {prompt!r:.80}")
    if arr.min() < 0 or arr.max() >= vocab_size:
        raise PromptError(f"{what} has token ids outside [0, vocab_size={vocab_size})")
    return arr.astype(np.int32)


def check_prompts(prompts: Any, vocab_size: int) -> list[np.ndarray]:
    """A non-empty list of prompts (each as ``check_prompt``); a flat list of ints is refused with a hint."""
    if isinstance(prompts, np.ndarray) and prompts.ndim == 1:
        prompts = [prompts]
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, (list, tuple, np.ndarray)) or len(prompts) == 0:
        raise PromptError(f"prompts must be a non-empty list of token-id sequences, got {prompts!r:.80}")
    if all(isinstance(p, (int, np.integer)) for p in prompts):
        raise PromptError("prompts must be a list of token-id sequences; for one prompt pass [ids]")
    return [check_prompt(p, vocab_size, i) for i, p in enumerate(prompts)]
