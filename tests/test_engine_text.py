"""Text in, text out on the engine: a tokenizer, incremental detokenization and stop strings (vLLM's semantics)."""

import jax.numpy as jnp
import pytest

pytest.importorskip("flax")
pytest.importorskip("tokenizers")
import models  # noqa: E402
from jax_vattention.attention import AttentionSpec  # noqa: E402
from jax_vattention.engine import LLM, SamplingParams  # noqa: E402
from jax_vattention.text import Detokenizer  # noqa: E402

# vocab_size 258: every id the model can emit is a byte or a special token, so its outputs are text
CFG = models.get_preset("tiny").replace(vocab_size=258)
TOK = models.byte_level_tokenizer(258)
KW = dict(max_batch=4, max_seq=128, page_bytes=4096, attn=AttentionSpec(impl="reference"))


@pytest.fixture(scope="module")
def llm():
    model = models.random_model(CFG, seed=3, dtype=jnp.float32, init_std=0.5)
    with LLM(model, tokenizer=TOK, **KW) as engine:
        yield engine


def test_detokenizer_emits_whole_characters_and_matches_a_full_decode():
    text = "héllo ✓ 日本語 🙂 and plain words"
    ids = TOK.encode(text).ids
    d = Detokenizer(TOK, TOK.encode("prompt: ").ids)
    deltas = [d.add(t) for t in ids]
    assert "".join(deltas) == text == d.text and d.flush() == ""  # no stop strings: nothing held back
    assert all("\ufffd" not in x for x in deltas)  # a split multi-byte character comes out whole, once complete
    assert deltas[ids.index(0xe2)] == ""  # the first byte of "✓" alone is not final yet
    cut = Detokenizer(TOK, [])
    streamed = "".join(cut.add(t) for t in TOK.encode("ok ✓").ids[:-1])  # ends inside "✓"
    assert streamed == "ok " and cut.finish() == "\ufffd" and cut.text == TOK.decode(TOK.encode("ok ✓").ids[:-1])


@pytest.mark.parametrize("stops,cut", [(("日本",), "héllo ✓ "), (("lo", "✓"), "hél"), (("absent",), None)])
def test_detokenizer_stop_strings_cut_the_text(stops, cut):
    text = "héllo ✓ 日本語"
    d = Detokenizer(TOK, [], stops)
    emitted = "".join(d.add(t) for t in TOK.encode(text).ids if d.stopped_by is None) + d.flush()
    assert d.text == emitted == (text if cut is None else cut)  # nothing past a stop string is ever streamed
    assert (d.stopped_by is None) == (cut is None)


def test_text_prompts_and_outputs(llm):
    prompts = ["Hello, vAttention!", "naïve ✓"]
    outs = llm.generate(prompts, SamplingParams(max_tokens=12, ignore_eos=True))
    by_ids = llm.generate([TOK.encode(p).ids for p in prompts], SamplingParams(max_tokens=12, ignore_eos=True))
    for o, ids_out, p in zip(outs, by_ids, prompts):
        c, want = o.outputs[0], ids_out.outputs[0]
        assert o.prompt == p and ids_out.prompt is None  # the prompt's text, when it was given as text
        assert o.prompt_token_ids == TOK.encode(p).ids and c.token_ids == want.token_ids  # text is only encoded ids
        assert c.text == TOK.decode(c.token_ids) == want.text and len(c.token_ids) == 12


def test_stop_string_ends_the_request_and_is_excluded(llm):
    prompt = "The cache maps pages"
    free = llm.generate([prompt], SamplingParams(max_tokens=24, ignore_eos=True))[0].outputs[0]
    assert len(free.text) >= 4, f"the model should emit some text: {free.token_ids}"
    assert free.finish_reason == "length" and free.stop_reason is None
    stop = free.text[2:4]  # appears in the text: generation must end there, without it
    out = llm.generate([prompt], SamplingParams(max_tokens=24, ignore_eos=True, stop=[stop]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop and stop not in out.text
    assert out.text == free.text[:free.text.index(stop)]
    assert out.token_ids == free.token_ids[:len(out.token_ids)] and len(out.token_ids) < len(free.token_ids)
    assert not llm.scheduler.has_unfinished() and llm.manager.stats().live_slots == 0


def test_text_needs_a_tokenizer():
    model = models.random_model(CFG, seed=0, dtype=jnp.float32)
    with LLM(model, **KW) as bare:
        with pytest.raises(ValueError, match="need a tokenizer"):
            bare.generate(["hello"], SamplingParams(max_tokens=2))
        with pytest.raises(ValueError, match="stop strings need a tokenizer"):
            bare.generate([[1, 2]], SamplingParams(max_tokens=2, stop=["x"]))
        assert bare.generate([[1, 2]], SamplingParams(max_tokens=2))[0].outputs[0].text is None
        assert not bare.scheduler.has_unfinished()
    with pytest.raises(TypeError, match="encode and decode"):
        LLM(model, tokenizer=object(), **KW)
    for bad in ([""], [3], b"x"):
        with pytest.raises(ValueError, match="SamplingParams.stop"):
            SamplingParams(stop=bad)


def test_chat_renders_the_template_and_generates():
    pytest.importorskip("jinja2")
    from jax_vattention.chat import ChatTemplate, ChatTemplateError

    model = models.random_model(CFG, seed=3, dtype=jnp.float32, init_std=0.5)
    template = models.chat_template_for(CFG)
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi ✓"}]
    text = template.render(conv)
    assert text == "<|begin_of_text|>system: Be brief.\nuser: Hi ✓\nassistant: "
    assert TOK.encode(text).ids[0] == 256  # the special token is one id, not its characters
    with LLM(model, tokenizer=TOK, chat_template=template, **KW) as llm:
        sp = SamplingParams(max_tokens=6, ignore_eos=True)
        (one,) = llm.chat(conv, sp)
        assert one.prompt_token_ids == TOK.encode(text).ids and len(one.outputs[0].token_ids) == 6
        two = llm.chat([conv, conv[1:]], sp)
        assert two[0].outputs[0].token_ids == one.outputs[0].token_ids and len(two) == 2
        for bad, match in (([{"role": "user"}], "string 'role' and 'content'"),
                           ([{"role": "wizard", "content": "x"}], "role 'wizard'"), ([], "non-empty")):
            with pytest.raises(ChatTemplateError, match=match):
                llm.chat(bad, sp)
        assert not llm.scheduler.has_unfinished()
    strict = ChatTemplate("{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}x")
    with pytest.raises(ChatTemplateError, match="user first"):
        strict.render(conv)
    with pytest.raises(ChatTemplateError, match="does not parse"):
        ChatTemplate("{% for %}")
    with LLM(model, tokenizer=TOK, **KW) as plain, pytest.raises(ValueError, match="needs a chat template"):
        plain.chat(conv)


def test_chat_template_from_a_checkpoint_directory(tmp_path):
    pytest.importorskip("jinja2")
    import json

    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": [{"name": "default", "template": "{{ bos_token }}{{ messages[-1]['content'] }}"},
                          {"name": "tool_use", "template": "unused"}],
        "bos_token": {"content": "<s>"}, "eos_token": "</s>"}))
    t = models.load_chat_template(tmp_path)
    assert t.bos_token == "<s>" and t.eos_token == "</s>" and t.render([{"role": "user", "content": "q"}]) == "<s>q"
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(models.CheckpointError, match="cannot read"):
        models.load_chat_template(tmp_path)
    assert models.load_chat_template(tmp_path / "missing") is None
