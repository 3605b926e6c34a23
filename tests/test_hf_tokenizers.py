"""The HF test checkpoints' tokenizers and chat templates (``tests/data/make_hf_tokenizers.py``), end to end."""

import importlib.util
import json
import re
import shutil
import string
from pathlib import Path

import pytest

pytest.importorskip("flax", reason="models needs flax (pip install -e .)")
pytest.importorskip("safetensors", reason="models needs safetensors (pip install -e .)")
pytest.importorskip("tokenizers")
pytest.importorskip("jinja2")
import models  # noqa: E402
from jax_vattention.attention import AttentionSpec  # noqa: E402
from jax_vattention.chat import ChatTemplateError  # noqa: E402
from jax_vattention.engine import LLM, SamplingParams  # noqa: E402
from jax_vattention_cli.main import main  # noqa: E402

DATA = Path(__file__).parent / "data"
CHECKPOINTS = ("hf_llama", "hf_qwen2", "hf_mistral")
ADDS_BOS = {"hf_llama": True, "hf_qwen2": False, "hf_mistral": True}
ASCII = string.printable.replace("\r", "").replace("\x0b", "").replace("\x0c", "")  # every character in the vocab
TEXTS = ["Hello, world!", "  two leading, two trailing  ", "tabs\tand\nnew lines\n\n", " ", ASCII,
         "x" * 200, "a  b   c    d"]
CONV = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"}]
KW = dict(max_batch=4, max_seq=64, page_bytes=4096, attn=AttentionSpec(impl="reference"))


def config(name: str) -> dict:
    return json.loads((DATA / name / "config.json").read_text())


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_tokenizer_fits_the_vocab_and_round_trips_ascii(name):
    tok, cfg = models.load_tokenizer(DATA / name), config(name)
    assert tok.get_vocab_size() == cfg["vocab_size"] == 128 and max(tok.get_vocab().values()) == 127
    assert [tok.token_to_id(t) for t in ("<pad>", "<s>", "</s>", "<unk>")] == [
        cfg["pad_token_id"], cfg["bos_token_id"], cfg["eos_token_id"], 3]
    bos = [1] if ADDS_BOS[name] else []
    for text in TEXTS:
        ids = tok.encode(text).ids
        assert ids[:len(bos)] == bos and len(ids) == len(bos) + len(text)  # one token per character
        assert all(3 < i < 128 for i in ids[len(bos):])
        assert tok.decode(ids) == text, (name, text)
        assert tok.encode(text, add_special_tokens=False).ids == ids[len(bos):]
    assert tok.decode(tok.encode(ASCII).ids, skip_special_tokens=False) == ("<s>" if bos else "") + ASCII
    assert [tok.encode(c, add_special_tokens=False).ids for c in "a\n"] == [[tok.token_to_id(c)] for c in "a\n"]
    # Anything else is <unk>, one per character (and dropped by a decode that skips special tokens).
    unk = tok.encode("héllo ✓ 日本", add_special_tokens=False)
    assert unk.tokens == ["h", "<unk>", "l", "l", "o", " ", "<unk>", " ", "<unk>", "<unk>"]
    assert tok.decode(unk.ids) == "hllo  "
    # Every id the model can emit decodes: characters to themselves, special tokens to nothing.
    chars = [i for i in range(128) if tok.decode([i])]
    assert len(chars) == len(ASCII) and "".join(sorted(tok.decode(chars))) == "".join(sorted(ASCII))
    assert tok.decode(list(range(128)), skip_special_tokens=False).count("<|reserved_") > 20


def _generator():
    spec = importlib.util.spec_from_file_location("make_hf_tokenizers", DATA / "make_hf_tokenizers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_checked_in_files_are_what_the_script_makes(name):
    gen = _generator()
    family = gen.FAMILIES[name]
    tok = gen.char_tokenizer(family["markers"], family["add_bos"])
    assert json.loads(tok.to_str()) == json.loads((DATA / name / "tokenizer.json").read_text())
    assert gen.tokenizer_config(tok, family) == json.loads((DATA / name / "tokenizer_config.json").read_text())
    for marker in family["markers"]:  # the chat markers are single special tokens, as in the real tokenizers
        assert tok.encode(marker, add_special_tokens=False).ids == [tok.token_to_id(marker)]


EXPECTED_CHAT = {
    "hf_llama": "<s><|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
                "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>",
    "hf_qwen2": "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
                "<|im_start|>user\nBye<|im_end|>\n",
    "hf_mistral": "<s>[INST] Hi there [/INST]Hello!</s>[INST] Bye [/INST]",
}
GENERATION_PROMPT = {"hf_llama": "<|start_header_id|>assistant<|end_header_id|>\n\n",
                     "hf_qwen2": "<|im_start|>assistant\n", "hf_mistral": ""}


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_chat_template_renders_the_family_format(name):
    chat, tok = models.load_chat_template(DATA / name), models.load_tokenizer(DATA / name)
    assert (chat.bos_token, chat.eos_token) == ("<s>" if ADDS_BOS[name] else "", "</s>")
    assert chat.render(CONV, add_generation_prompt=False) == EXPECTED_CHAT[name]
    prompt = chat.render(CONV)
    assert prompt == EXPECTED_CHAT[name] + GENERATION_PROMPT[name]
    # As transformers' apply_chat_template tokenizes it (no special tokens added): at most one BOS, at the start,
    # and every marker is a single special token.
    ids = tok.encode(prompt, add_special_tokens=False).ids
    assert ids.count(1) == (1 if ADDS_BOS[name] else 0) and (ids[0] == 1) == ADDS_BOS[name]
    assert tok.decode(ids, skip_special_tokens=False) == prompt
    assert "<unk>" not in tok.encode(prompt).tokens and len(ids) < 64  # fits the checkpoints' 64 positions
    assert tok.decode(ids) == re.sub(r"<[^>]*>|\[/?INST\]", "", prompt)  # markers are special: skipped


def test_mistral_template_refuses_what_mistral_refuses():
    chat = models.load_chat_template(DATA / "hf_mistral")
    with pytest.raises(ChatTemplateError, match="Only user and assistant roles"):
        chat.render([{"role": "user", "content": "q"}, {"role": "system", "content": "s"}])
    with pytest.raises(ChatTemplateError, match="must alternate"):
        chat.render([{"role": "assistant", "content": "a"}])


def test_generate_cli_with_a_text_prompt(capsys):
    prompt = "Hello, vAttention"
    argv = ["generate", "--model", str(DATA / "hf_llama"), "--max-tokens", "6", "--ignore-eos"]
    assert main([*argv, "--prompt", prompt]) == 0
    out = capsys.readouterr().out
    assert "LlamaForCausalLM" in out
    assert f"[0] prompt {len(prompt) + 1} tokens -> 6 new (length)" in out  # BOS + one token per character
    ids = json.loads(re.search(r"new \(length\): (\[.*\])", out).group(1))
    tok = models.load_tokenizer(DATA / "hf_llama")
    assert f"    text: {tok.decode(ids, skip_special_tokens=False)!r}\n" in out
    assert main([*argv, "--prompt-ids", " ".join(map(str, tok.encode(prompt).ids))]) == 0  # the same prompt as ids
    assert f"new (length): {ids}" in capsys.readouterr().out


def test_chat_on_qwen2_through_the_engine():
    model = models.load_model(DATA / "hf_qwen2", dtype="float32")
    tok, chat = models.load_tokenizer(DATA / "hf_qwen2"), models.load_chat_template(DATA / "hf_qwen2")
    short = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
             {"role": "user", "content": "?"}]
    conversations = [short, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"}]]
    sp = SamplingParams(max_tokens=8, ignore_eos=True)
    with LLM(model, tokenizer=tok, chat_template=chat, **KW) as llm:
        outs = llm.chat(conversations, sp)
        for out, conv in zip(outs, conversations):
            prompt = chat.render(conv)
            assert prompt.startswith("<|im_start|>") and prompt.endswith("<|im_start|>assistant\n")
            assert out.prompt == prompt and out.prompt_token_ids == tok.encode(prompt).ids
            assert 1 not in out.prompt_token_ids  # ChatML: no BOS
            (seq,) = out.outputs
            assert len(seq.token_ids) == 8 and seq.finish_reason == "length"
            assert seq.text == tok.decode(seq.token_ids)  # the detokenizer agrees with a full decode
        by_ids = llm.generate([o.prompt_token_ids for o in outs], sp)
        assert [o.outputs[0].token_ids for o in by_ids] == [o.outputs[0].token_ids for o in outs]  # only a prompt
        (one,) = llm.chat(short, sp)
        assert one.outputs[0].token_ids == outs[0].outputs[0].token_ids
        assert not llm.scheduler.has_unfinished()
    assert llm.manager.stats().pages_mapped == 0


@pytest.mark.parametrize("name", ["hf_llama", "hf_mistral"])
def test_chat_prompt_has_one_bos(name):
    """The template writes the BOS; the rendered text is encoded without the tokenizer's (transformers, vLLM)."""
    model = models.load_model(DATA / name, dtype="float32")
    tok, chat = models.load_tokenizer(DATA / name), models.load_chat_template(DATA / name)
    with LLM(model, tokenizer=tok, chat_template=chat, **KW) as llm:
        (out,) = llm.chat([{"role": "user", "content": "Hi"}], SamplingParams(max_tokens=2, ignore_eos=True))
    prompt = chat.render([{"role": "user", "content": "Hi"}])
    assert out.prompt == prompt and out.prompt_token_ids == tok.encode(prompt, add_special_tokens=False).ids
    assert out.prompt_token_ids.count(1) == 1


def test_chat_template_loader_reads_what_transformers_reads(tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(DATA / "hf_mistral", d)
    # Newer transformers save the template beside the config, and that file wins over the inline one.
    (d / "chat_template.jinja").write_text("{{ bos_token }}[{{ messages[0]['content'] }}]{{ eos_token }}")
    assert models.load_chat_template(d).render([{"role": "user", "content": "q"}]) == "<s>[q]</s>"
    # Older checkpoints keep the special tokens only in special_tokens_map.json (strings or AddedToken dicts).
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": "x"}))
    (d / "special_tokens_map.json").write_text(json.dumps({"bos_token": {"content": "<s>", "lstrip": False},
                                                           "eos_token": "</s>"}))
    (d / "chat_template.jinja").unlink()
    t = models.load_chat_template(d)
    assert (t.template, t.bos_token, t.eos_token) == ("x", "<s>", "</s>")
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": "x", "bos_token": None}))
    assert models.load_chat_template(d).bos_token == ""  # an explicit null (Qwen2) is no BOS, not the map's
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": "x", "eos_token": 7}))
    with pytest.raises(models.CheckpointError, match="eos_token must be a string"):
        models.load_chat_template(d)
    (d / "special_tokens_map.json").write_text("[1]")
    with pytest.raises(models.CheckpointError, match="expected a JSON object"):
        models.load_chat_template(d)
    (d / "special_tokens_map.json").unlink()
    (d / "tokenizer_config.json").unlink()
    assert models.load_chat_template(d) is None
    (d / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")  # a template file alone is enough
    assert models.load_chat_template(d).render([{"role": "user", "content": "q"}]) == "q"
