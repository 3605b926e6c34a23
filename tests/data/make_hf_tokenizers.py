"""Make the HF test checkpoints' tokenizers and chat templates (needs only ``tokenizers``).

The checkpoints made by ``make_hf_parity.py`` have a 128-token vocabulary (pad 0, BOS 1, EOS 2), too small for
the byte-level tokenizer of ``models/tokenizer.py`` (256 + 2 ids). So each gets a character-level tokenizer
built the same way, with the ``tokenizers`` library:

* ids 0-3: ``<pad>``, ``<s>`` (BOS), ``</s>`` (EOS), ``<unk>``, all special;
* ids 4-100: one token per character: printable ASCII (space to ``~``), then ``\\n`` and ``\\t``. The model is a
  BPE with no merges and no pre-tokenizer (each character is its own token, spaces included) and a ``Fuse``
  decoder, so ``decode(encode(s)) == s`` for any text of those characters; any other character is ``<unk>``;
* ids 101 on: the family's chat markers as special tokens (as the real tokenizers have them), then
  ``<|reserved_N|>`` special tokens up to the vocabulary size, so that every id the model can emit decodes.

Llama and Mistral add BOS to every encoded text (a ``TemplateProcessing`` post-processor, as theirs do), Qwen2
does not. Each chat template is the family's real one: Llama-3-Instruct's headers, Qwen2's ChatML (without the
default system prompt, which would not fit the 64-position context) and Mistral-Instruct's ``[INST]``.

    python tests/data/make_hf_tokenizers.py

writes ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` into ``hf_llama/``,
``hf_qwen2/`` and ``hf_mistral/`` next to itself (the weights are left alone).
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, processors
from tokenizers import models as tok_models

HERE = Path(__file__).resolve().parent
VOCAB_SIZE = 128
PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
CHARS = [chr(c) for c in range(32, 127)] + ["\n", "\t"]

# Meta-Llama-3-8B-Instruct's template, verbatim.
LLAMA_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Qwen2-Instruct's ChatML template without its default system message.
QWEN2_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
    "'\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Mistral-7B-Instruct-v0.2's template, verbatim (user/assistant turns only; no generation prompt to add).
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

FAMILIES = {
    "hf_llama": dict(markers=["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], add_bos=True,
                     template=LLAMA_TEMPLATE),
    # Qwen2 has no BOS token of its own (``bos_token: null``) and adds none.
    "hf_qwen2": dict(markers=["<|im_start|>", "<|im_end|>"], add_bos=False, template=QWEN2_TEMPLATE),
    "hf_mistral": dict(markers=["[INST]", "[/INST]"], add_bos=True, template=MISTRAL_TEMPLATE),
}


def char_tokenizer(markers: list[str], add_bos: bool, vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    """The character-level tokenizer described above, with ``markers`` as special tokens after the characters."""
    specials = [PAD, BOS, EOS, UNK]
    reserved = [f"<|reserved_{i}|>" for i in range(vocab_size - len(specials) - len(CHARS) - len(markers))]
    tokens = [*specials, *CHARS, *markers, *reserved]
    assert len(tokens) == len(set(tokens)) == vocab_size
    tok = Tokenizer(tok_models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[], unk_token=UNK,
                                   fuse_unk=False))
    tok.decoder = decoders.Fuse()  # concatenate: without a decoder, tokens would be joined with spaces
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (*specials, *markers, *reserved)])
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                           special_tokens=[(BOS, 1)])
    assert tok.get_vocab_size() == vocab_size and [tok.token_to_id(t) for t in specials] == [0, 1, 2, 3]
    return tok


def tokenizer_config(tok: Tokenizer, family: dict) -> dict:
    specials = {i: t for i, t in sorted(tok.get_added_tokens_decoder().items())}
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 64,
        "bos_token": BOS if family["add_bos"] else None,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": UNK,
        **({"add_bos_token": True, "add_eos_token": False} if family["add_bos"] else {}),
        "clean_up_tokenization_spaces": False,
        "chat_template": family["template"],
        "added_tokens_decoder": {str(i): {"content": t.content, "special": True, "lstrip": False, "rstrip": False,
                                          "normalized": False, "single_word": False} for i, t in specials.items()},
    }


def main() -> None:
    for name, family in FAMILIES.items():
        path = HERE / name
        config = json.loads((path / "config.json").read_text())
        tok = char_tokenizer(family["markers"], family["add_bos"], config["vocab_size"])
        assert (tok.token_to_id(BOS), tok.token_to_id(EOS), tok.token_to_id(PAD)) == (
            config["bos_token_id"], config["eos_token_id"], config["pad_token_id"])
        tok.save(str(path / "tokenizer.json"))
        cfg = tokenizer_config(tok, family)
        (path / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        special = {k: cfg[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token") if cfg[k] is not None}
        (path / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
        print(f"{path}: {tok.get_vocab_size()} tokens, markers {family['markers']}")


if __name__ == "__main__":
    main()
