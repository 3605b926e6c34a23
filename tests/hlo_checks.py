"""Re-exported for the tests: the HLO copy checks live in jax_vattention.hlo."""

from jax_vattention.hlo import cache_sized_copies, copied_element_counts  # noqa: F401
