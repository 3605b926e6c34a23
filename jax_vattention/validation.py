"""Argument checks shared by every public entry point: one rule for what counts as an integer.

Python ints and numpy integers are integers; bools and floats are not (no silent
coercion). The error names the field.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def is_int(value: Any) -> bool:
    """An int or numpy integer, not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_int(name: str, value: Any, *, low: int | None = None, high: int | None = None, hint: str = "",
              error: type[Exception] = ValueError) -> int:
    """``value`` as an int, or ``error`` naming ``name`` when it is not an integer in ``[low, high]``."""
    if low is not None and high is not None:
        want = f"an int in [{low}, {high}]"
    elif low is not None:
        want = "a positive int" if low == 1 else f"an int >= {low}"
    elif high is not None:
        want = f"an int <= {high}"
    else:
        want = "an int"
    hint = f" {hint}" if hint else ""
    if not is_int(value):
        raise error(f"{name} must be {want}{hint}, got {value!r} ({type(value).__name__})")
    if (low is not None and value < low) or (high is not None and value > high):
        raise error(f"{name} must be {want}{hint}, got {value!r}")
    return int(value)
