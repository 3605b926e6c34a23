"""vLLM's offline output API: ``RequestOutput`` / ``CompletionOutput`` / ``RequestMetrics``, ``SamplingParams.n``,
and ``LLM(model)`` from a preset name or a checkpoint directory (model sources)."""

import dataclasses
import pathlib
import shutil

import jax
import jax.numpy as jnp
import pytest

pytest.importorskip("flax")
pytest.importorskip("tokenizers")
import models  # noqa: E402
from jax_vattention.attention import AttentionSpec  # noqa: E402
from jax_vattention.engine import LLM, SamplingParams  # noqa: E402
from jax_vattention.engine.loaders import (  # noqa: E402
    LoadedModel,
    ModelSourceError,
    load_model_source,
    model_sources,
    register_model_source,
)
from jax_vattention.engine.outputs import (  # noqa: E402
    CompletionOutput,
    RequestMetrics,
    RequestOutput,
    child_params,
)
from jax_vattention.engine.request import Request  # noqa: E402
from jax_vattention.sampling import Logprob  # noqa: E402

DATA = pathlib.Path(__file__).resolve().parent / "data"
CFG = models.get_preset("tiny").replace(vocab_size=258)  # every id is a byte or a special token: real text
TOK = models.byte_level_tokenizer(258)
KW = dict(max_batch=4, max_seq=128, page_bytes=4096, attn=AttentionSpec(impl="reference"))
HOT = dict(max_tokens=8, temperature=1.0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm():
    model = models.random_model(CFG, seed=3, dtype=jnp.float32, init_std=0.5)
    with LLM(model, tokenizer=TOK, chat_template=models.chat_template_for(CFG), **KW) as engine:
        yield engine


def tokens(outs):
    return [[c.token_ids for c in o.outputs] for o in outs]


def test_request_output_shape_for_text_and_token_prompts(llm):
    outs = llm.generate(["Hello", [5, 6, 7]], SamplingParams(max_tokens=6, ignore_eos=True))
    assert [type(o) for o in outs] == [RequestOutput, RequestOutput]
    text, ids = outs
    assert text.prompt == "Hello" and text.prompt_token_ids == TOK.encode("Hello").ids
    assert ids.prompt is None and ids.prompt_token_ids == [5, 6, 7]
    assert ids.request_id == text.request_id + 1 and text.finished and ids.finished and text.error is None
    for o in outs:
        (c,) = o.outputs
        assert isinstance(c, CompletionOutput) and c.index == 0 and len(c.token_ids) == 6 and c.finished()
        assert c.finish_reason == "length" and c.stop_reason is None
        assert c.text == TOK.decode(c.token_ids)
        assert c.logprobs is None and c.cumulative_logprob is None  # not asked for
        m = o.metrics
        assert isinstance(m, RequestMetrics) and m.num_preemptions == 0 and len(m.inter_token_s) == 5
        assert m.first_token_time is not None and m.finished_time is not None
        assert m.ttft_s == pytest.approx(m.first_token_time - m.arrival_time) and 0 < m.ttft_s <= m.latency_s
    with pytest.raises(dataclasses.FrozenInstanceError):
        text.prompt = "changed"


def test_one_prompt_may_be_text_ids_or_a_vllm_dict(llm):
    sp = SamplingParams(max_tokens=3, ignore_eos=True)
    (a,) = llm.generate("Hi there", sp)  # one text prompt
    (b,) = llm.generate(TOK.encode("Hi there").ids, sp)  # one token-id prompt (a flat list)
    c, d = llm.generate([{"prompt": "Hi there"}, {"prompt_token_ids": TOK.encode("Hi there").ids}], sp)
    assert a.prompt == c.prompt == "Hi there" and b.prompt is None and d.prompt is None
    assert tokens([a]) == tokens([b]) == tokens([c]) == tokens([d])
    with pytest.raises(ValueError, match="'prompt'.*'prompt_token_ids'"):
        llm.generate([{"text": "x"}], sp)
    (chat,) = llm.chat([{"role": "user", "content": "Hi"}], sp)
    assert chat.prompt.endswith("user: Hi\nassistant: ") and chat.prompt_token_ids == TOK.encode(chat.prompt).ids


def test_n_with_a_seed_equals_single_requests_with_seed_plus_i(llm):
    (many,) = llm.generate(["Once upon"], SamplingParams(n=3, seed=40, **HOT))
    assert [c.index for c in many.outputs] == [0, 1, 2] and many.prompt == "Once upon" and many.finished
    singles = [llm.generate(["Once upon"], SamplingParams(seed=40 + i, **HOT))[0].outputs[0] for i in range(3)]
    assert [c.token_ids for c in many.outputs] == [c.token_ids for c in singles]
    assert [c.text for c in many.outputs] == [c.text for c in singles]
    assert len({tuple(c.token_ids) for c in many.outputs}) > 1, "different seeds should sample differently"
    assert len(many.metrics.inter_token_s) == 3 * 7  # every sequence's gaps
    # per-prompt params mix n: outputs stay one per prompt, in order
    outs = llm.generate([[1, 2], [3, 4]], [SamplingParams(n=2, seed=1, **HOT), SamplingParams(seed=9, **HOT)])
    assert [len(o.outputs) for o in outs] == [2, 1] and outs[1].request_id == outs[0].request_id + 2
    assert not llm.scheduler.has_unfinished()


def test_n_without_a_seed_samples_independently(llm):
    (o,) = llm.generate([[7, 8, 9]], SamplingParams(n=4, **HOT))
    assert len(o.outputs) == 4 and len({tuple(c.token_ids) for c in o.outputs}) > 1
    children = child_params(SamplingParams(n=4, **HOT))
    assert [p.n for p in children] == [1] * 4 and all(p.seed is None for p in children)


def test_child_params_follow_vllm_and_wrap_the_int32_seed():
    assert child_params(SamplingParams(seed=5)) == [SamplingParams(seed=5)]
    assert [p.seed for p in child_params(SamplingParams(n=3, seed=5))] == [5, 6, 7]
    assert [p.seed for p in child_params(SamplingParams(n=3, seed=2**31 - 2))] == [2**31 - 2, 2**31 - 1, -2**31]


@pytest.mark.parametrize("n", [0, -1, 129, 1.5, True, "2"])
def test_n_is_checked(n):
    with pytest.raises(ValueError, match="SamplingParams.n"):
        SamplingParams(n=n)


def test_add_request_queues_one_sequence(llm):
    with pytest.raises(ValueError, match="one sequence"):
        llm.add_request([1, 2], SamplingParams(n=2))
    assert not llm.scheduler.has_unfinished()


def test_cumulative_logprob_sums_the_sampled_tokens():
    r = Request(0, [1, 2], SamplingParams(max_tokens=2))
    r.output = [5, 6]
    r.logprobs = [{5: Logprob(-0.5, 1)}, {6: Logprob(-1.25, 2), 7: Logprob(-0.25, 1)}]
    c = CompletionOutput.of(r)
    assert c.cumulative_logprob == -1.75 and c.logprobs == r.logprobs and c.logprobs is not r.logprobs


def test_gathered_metrics_span_every_sequence():
    a, b = Request(0, [1], SamplingParams()), Request(1, [1], SamplingParams())
    a.arrival_time, b.arrival_time = 10.0, 10.5
    for r, times in ((a, [11.0, 11.5]), (b, [10.75, 12.0])):
        for t in times:
            r.append_token(3, t)
    a.finish("length", 11.5)
    m = RequestMetrics.of([a, b])
    assert (m.arrival_time, m.first_token_time, m.ttft_s) == (10.0, 10.75, 0.75)
    assert m.finished_time is None and m.latency_s is None  # b is still running
    assert sorted(m.inter_token_s) == [0.5, 1.25]
    out = RequestOutput.of([a, b], "x")
    assert not out.finished and out.request_id == 0 and [c.index for c in out.outputs] == [0, 1]


def test_llm_from_a_preset_name():
    with LLM("tiny", seed=1, **KW) as llm:
        assert llm.model_name == "tiny" and llm.tokenizer is not None and llm.chat_template is not None
        assert llm.model.config == models.get_preset("tiny") and jax.tree.leaves(llm.model)[0].dtype == jnp.float32
        (o,) = llm.generate("The cache", SamplingParams(max_tokens=4, ignore_eos=True))
        assert len(o.outputs[0].token_ids) == 4 and o.outputs[0].text is not None
        (chat,) = llm.chat([{"role": "user", "content": "Hi"}], SamplingParams(max_tokens=2, ignore_eos=True))
        assert chat.prompt.startswith("<|begin_of_text|>user: Hi")
    same = models.random_model(models.get_preset("tiny"), seed=1, dtype=jnp.float32)
    with LLM(same, tokenizer=models.tokenizer_for(same.config), **KW) as ref:
        want = ref.generate("The cache", SamplingParams(max_tokens=4, ignore_eos=True))[0].outputs[0].token_ids
    assert o.outputs[0].token_ids == want  # the preset's weights are random_model(preset, seed)


def test_llm_from_a_checkpoint_directory(tmp_path):
    src = DATA / "hf_llama"
    with LLM(str(src), **KW) as llm:
        assert llm.model_name == "hf_llama" and llm.model.config.vocab_size == 128
        assert (llm.tokenizer is None) == (not (src / "tokenizer.json").is_file())
        (o,) = llm.generate([[1, 5, 9]], SamplingParams(max_tokens=5, ignore_eos=True))
        want = o.outputs[0].token_ids
    bare = tmp_path / "weights-only"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(src / name, bare / name)
    with LLM(bare, **KW) as llm:  # a path object; no tokenizer.json: token ids only
        assert llm.tokenizer is None and llm.chat_template is None and llm.model_name == "weights-only"
        assert llm.generate([[1, 5, 9]], SamplingParams(max_tokens=5, ignore_eos=True))[0].outputs[0].token_ids == want
        with pytest.raises(ValueError, match="need a tokenizer"):
            llm.generate("text", SamplingParams(max_tokens=2))


def test_explicit_tokenizer_and_template_override_the_source(tmp_path):
    path = tmp_path / "tokenizer.json"
    TOK.save(str(path))
    with LLM("tiny", tokenizer=str(path), chat_template="{{ messages[0]['content'] }}", **KW) as llm:
        assert llm.tokenizer.get_vocab_size() == 258  # the file's, not the preset's 512-id tokenizer
        (o,) = llm.chat([{"role": "user", "content": "plain"}], SamplingParams(max_tokens=2, ignore_eos=True))
        assert o.prompt == "plain"
    with pytest.raises(ValueError, match="no such file"):
        LLM("tiny", tokenizer=str(tmp_path / "missing.json"), **KW)


def test_a_string_naming_no_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelSourceError, match="cannot load the model 'no-such-model'.*preset.*tiny.*llama-3.2-1b"):
        LLM("no-such-model", **KW)
    with pytest.raises(ModelSourceError, match="no such directory"):
        load_model_source(str(tmp_path / "nowhere"))
    with pytest.raises(TypeError, match="CausalLM"):
        LLM(None, **KW)


def test_sources_come_from_the_entry_point_and_registrations():
    assert any(type(s).__name__ == "ModelsSource" for s in model_sources()), "models' entry point is not installed"

    class Echo:
        def load(self, source, *, dtype, seed):
            if source == "echo-model":
                return LoadedModel(models.random_model(CFG, seed=seed, dtype=dtype), TOK, None, "echo")
            return None

        def describe(self):
            return "echo-model"

    register_model_source(Echo())
    try:
        loaded = load_model_source("echo-model", seed=2)
        assert loaded.name == "echo" and loaded.tokenizer is TOK and loaded.model.config == CFG
        with pytest.raises(ModelSourceError, match="echo-model.*preset"):
            load_model_source("neither")
    finally:
        from jax_vattention.engine import loaders

        loaders._registered.clear()
    with pytest.raises(TypeError, match="load"):
        register_model_source(object())
