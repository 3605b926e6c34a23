"""A byte-level tokenizer for models without one (the presets' random weights): text round-trips, no download.

Built with the ``tokenizers`` library the way GPT-2 / Llama-3 tokenizers are, minus the learned merges: the
ByteLevel pre-tokenizer maps every UTF-8 byte to one of 256 printable characters, each a token (id = byte
value), so any text encodes and decodes exactly. Ids 256 and 257 are ``<|begin_of_text|>`` and
``<|end_of_text|>``, and every id above them up to the model's vocabulary is a reserved special token
(``<|reserved_N|>``, as Llama-3 reserves its unused ids): all are skipped by ``decode`` unless
``skip_special_tokens=False``, which shows what a random-weight model really emitted. Checkpoint directories
bring their own ``tokenizer.json`` (``models.load_tokenizer``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .config import ModelConfig

if TYPE_CHECKING:  # imported where used: ``import models`` works without tokenizers (e.g. a bare GPU image)
    from tokenizers import Tokenizer

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
NUM_BYTES = 256
MIN_VOCAB = NUM_BYTES + 2  # the bytes and the two special tokens


def _byte_chars() -> list[str]:
    """GPT-2's reversible byte -> printable character map, in byte order (what ByteLevel emits)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(NUM_BYTES):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(NUM_BYTES + extra)
            extra += 1
    return [chars[b] for b in range(NUM_BYTES)]


def byte_level_tokenizer(vocab_size: int) -> Tokenizer:
    """Token ``b`` is byte ``b`` (0-255), then ``<|begin_of_text|>`` (256) and ``<|end_of_text|>`` (257).

    ``vocab_size`` is the model's; it must hold those 258 ids. Ids above them are reserved special tokens:
    ``encode`` never produces them.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB:
        raise ValueError(f"a byte-level tokenizer needs vocab_size >= {MIN_VOCAB}, got {vocab_size!r}")
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
    from tokenizers import models as tok_models

    vocab = {ch: b for b, ch in enumerate(_byte_chars())}
    tok = Tokenizer(tok_models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    reserved = [f"<|reserved_{i}|>" for i in range(vocab_size - MIN_VOCAB)]  # ids 258 on, as Llama-3 reserves them
    tok.add_special_tokens([AddedToken(t, special=True) for t in (BOS, EOS, *reserved)])
    assert tok.token_to_id(BOS) == NUM_BYTES and tok.token_to_id(EOS) == NUM_BYTES + 1
    assert tok.get_vocab_size() == vocab_size
    return tok


def tokenizer_for(cfg: ModelConfig) -> Tokenizer | None:
    """The byte-level tokenizer for a model with random weights, or None when its vocabulary is too small."""
    return byte_level_tokenizer(cfg.vocab_size) if cfg.vocab_size >= MIN_VOCAB else None


# A plain chat format for the byte-level presets (no role tokens to learn: the roles are text).
BYTE_LEVEL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def chat_template_for(cfg: ModelConfig):
    """The presets' ``ChatTemplate`` (with the byte-level tokenizer), or None when that tokenizer does not fit."""
    from jax_vattention.chat import ChatTemplate

    return ChatTemplate(BYTE_LEVEL_CHAT_TEMPLATE, BOS, EOS) if cfg.vocab_size >= MIN_VOCAB else None
