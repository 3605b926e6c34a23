"""Text in, text out: incremental detokenization and stop strings (vLLM's semantics).

The library stays tokenizer-agnostic: a ``TextTokenizer`` is anything with
``encode(text) -> .ids`` and ``decode(ids, skip_special_tokens=...)``, e.g. a
``tokenizers.Tokenizer`` (a checkpoint's ``tokenizer.json``, or
``models.byte_level_tokenizer``).

``Detokenizer`` turns a request's tokens into text one token at a time, as
vLLM does: it decodes a short window of recent tokens and emits only what
became final, so a multi-byte character split over several byte tokens comes
out whole (never as U+FFFD) and word-boundary spacing matches a full decode.
Stop strings are matched on that text; the stop string and whatever follows it
are not part of the output.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, Protocol

REPLACEMENT = "\ufffd"  # what a decode of an incomplete UTF-8 sequence ends with
CONTEXT_TOKENS = 6  # prompt tokens decoded before the output, for word-boundary spacing


class TextTokenizer(Protocol):
    def encode(self, text: str) -> Any: ...  # with ``.ids``

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


def encode(tokenizer: TextTokenizer, text: str, *, add_special_tokens: bool = True) -> list[int]:
    """Token ids of ``text`` (``tokenizers`` returns an ``Encoding``; a plain list is taken as it is).

    ``add_special_tokens=False`` leaves out what the tokenizer adds around a text (Llama's and Mistral's BOS):
    a rendered chat template already holds them as text (transformers' ``apply_chat_template`` and vLLM encode
    it so). Special tokens written in the text are still matched. A tokenizer whose ``encode`` takes no
    ``add_special_tokens`` adds nothing, so it is called plainly.
    """
    if add_special_tokens or not _takes_add_special_tokens(tokenizer.encode):
        out = tokenizer.encode(text)
    else:
        out = tokenizer.encode(text, add_special_tokens=False)  # type: ignore[call-arg]
    return list(getattr(out, "ids", out))


def _takes_add_special_tokens(method: Any) -> bool:
    try:
        params = inspect.signature(method).parameters.values()
    except (TypeError, ValueError):  # no signature to read: assume the usual (tokenizers, transformers) one
        return True
    return any(p.name == "add_special_tokens" or p.kind is p.VAR_KEYWORD for p in params)


class Detokenizer:
    """The text of a request's output so far, built one token at a time."""

    def __init__(self, tokenizer: TextTokenizer, prompt: Sequence[int], stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self._ids = list(prompt[-CONTEXT_TOKENS:])
        self._prefix = 0  # ids[prefix:read] decode to text already emitted (context, then output)
        self._read = len(self._ids)
        self.text = ""
        self._sent = 0  # characters of ``text`` returned by ``add`` / ``flush``
        self.stopped_by: str | None = None  # the stop string that ended the text, if any

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def _undecided(self) -> str:
        """The text the tokens after ``read`` add to the window's decode (empty when they add none)."""
        before = self._decode(self._ids[self._prefix:self._read])
        after = self._decode(self._ids[self._prefix:])
        return after[len(before):] if len(after) > len(before) else ""

    def add(self, token: int) -> str:
        """Append one token; returns the text that became final and safe to stream (maybe empty).

        Text that could still be the start of a stop string is held back until it is known not to be
        (``flush`` returns it at the end). A stop string cuts ``text`` where it starts and sets ``stopped_by``.
        """
        self._ids.append(int(token))
        delta = self._undecided()
        if not delta or delta.endswith(REPLACEMENT):
            return ""  # nothing final yet (an incomplete character, or a token with no text)
        self._prefix, self._read = self._read, len(self._ids)
        longest = max((len(s) for s in self.stop), default=0)
        start = max(0, len(self.text) - longest + 1)  # a stop string may begin in the held-back tail
        self.text += delta
        hits = [(i, s) for s in self.stop if (i := self.text.find(s, start)) >= 0]
        if hits:
            cut, self.stopped_by = min(hits)
            self.text = self.text[:cut]
            return self.flush()
        end = max(self._sent, len(self.text) - max(0, longest - 1))
        out, self._sent = self.text[self._sent:end], end
        return out

    def finish(self) -> str:
        """No more tokens: take the undecided tail as a full decode would (an incomplete character becomes U+FFFD)
        unless a stop string ended the text, and return what was not yet streamed."""
        if self.stopped_by is None:
            self.text += self._undecided()
            self._prefix = self._read = len(self._ids)
        return self.flush()

    @property
    def streamable(self) -> str:
        """The part of ``text`` that is final: everything ``add`` / ``flush`` returned so far."""
        return self.text[:self._sent]

    def flush(self) -> str:
        """The text not yet returned by ``add`` (what it held back for the stop strings)."""
        out, self._sent = self.text[self._sent:], len(self.text)
        return out


def check_stop(stop: Any) -> tuple[str, ...]:
    """``SamplingParams.stop`` as a tuple of non-empty strings (one string is one stop string)."""
    if isinstance(stop, str):
        stop = (stop,)
    if stop is None:
        return ()
    if isinstance(stop, bytes) or not isinstance(stop, Sequence) or not all(isinstance(s, str) for s in stop):
        raise ValueError(f"SamplingParams.stop must be a string or a sequence of strings, got {stop!r:.80}")
    if any(s == "" for s in stop):
        raise ValueError("SamplingParams.stop strings must be non-empty")
    return tuple(stop)
