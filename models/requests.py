"""What ``Generator`` takes and gives: request checks before anything is allocated, and ``GenerationResult``."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from jax_vattention.cache import StaticKVCache
from jax_vattention.inputs import PromptError, check_prompts
from jax_vattention.sampling import SamplingParams

from .errors import GenerationInputError, UnsupportedModelError


@dataclasses.dataclass
class GenerationResult:
    tokens: list[list[int]]  # generated ids per request (a stop token, if hit, is the last one)
    finish_reasons: list[str]  # "stop" or "length"
    prompt_lengths: list[int]
    cache_lengths: list[int]  # tokens each request holds in the cache at the end
    slot_capacity: list[int] | None  # tokens backed per request's slot at the end (vAttention)
    prefill_seconds: float
    decode_seconds: float
    compile_seconds: float
    decode_steps: int
    mapped_bytes: int | None  # physical KV bytes mapped at the end, before slots are freed (vAttention)
    needed_bytes: int  # bytes the cached tokens occupy
    static_bytes: int  # what a static [requests, max_seq] cache holds
    static_cache: StaticKVCache | None = None

    @property
    def num_generated(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens produced by the decode loop (all but each request's first) per second."""
        n = self.num_generated - len(self.tokens)
        return n / self.decode_seconds if self.decode_seconds > 0 else float("nan")

    @property
    def tokens_per_second(self) -> float:
        total = self.prefill_seconds + self.decode_seconds
        return self.num_generated / total if total > 0 else float("nan")


def check_requests(prompts, params, *, vocab_size: int, max_seq: int, max_batch: int,
                   sliding_window: int | None = None) -> tuple[list[np.ndarray], list[SamplingParams]]:
    """Validate prompts and their ``SamplingParams`` before anything is allocated."""
    try:
        out = check_prompts(prompts, vocab_size)
    except PromptError as e:
        raise GenerationInputError(str(e)) from None
    if len(out) > max_batch:
        raise GenerationInputError(f"{len(out)} prompts exceed the cache's max_batch={max_batch}")
    if isinstance(params, SamplingParams):
        params = [params] * len(out)
    if not isinstance(params, (list, tuple)) or len(params) != len(out):
        raise GenerationInputError(f"give one SamplingParams or one per prompt ({len(out)}), got {params!r:.80}")
    for i, p in enumerate(params):
        if not isinstance(p, SamplingParams):
            raise GenerationInputError(f"params[{i}] must be a SamplingParams, got {type(p).__name__}")
        if p.stop:
            raise GenerationInputError(f"params[{i}]: stop strings need text; the Generator decodes token ids only "
                                       "(use stop_token_ids, or the engine: LLM(model, tokenizer=...))")
        if out[i].size > max_seq:
            raise GenerationInputError(f"prompt {i} has {out[i].size} tokens, longer than max_seq={max_seq}")
        need = out[i].size + p.max_tokens - 1  # the last sampled token is never written
        if need > max_seq:
            raise GenerationInputError(
                f"prompt {i}: {out[i].size} prompt tokens + max_tokens={p.max_tokens} need {need} cache tokens, "
                f"more than max_seq={max_seq}")
        if sliding_window is not None and need > sliding_window:
            raise UnsupportedModelError(
                f"prompt {i} needs {need} tokens of context, beyond the model's sliding_window={sliding_window} "
                "(sliding-window attention is not implemented)")
    return out, [p.seeded() for p in params]


def stop_matrix(params: Sequence[SamplingParams], eos: Sequence[int]) -> np.ndarray:
    rows = [p.stop_ids(eos) for p in params]
    width = max(1, max(len(r) for r in rows))
    mat = np.full((len(rows), width), -1, np.int32)
    for i, r in enumerate(rows):
        mat[i, : len(r)] = r
    return mat
