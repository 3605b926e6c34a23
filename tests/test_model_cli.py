"""The main command: ``jax-vattention generate`` (in-process through ``main(argv)``, plus one subprocess)."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

# Without the models package's dependencies (e.g. a device image with only jax), skip rather than
# break collection of the whole suite.
pytest.importorskip("flax", reason="models needs flax (pip install -e .)")
pytest.importorskip("safetensors", reason="models needs safetensors (pip install -e .)")

from jax_vattention_cli.main import main

DATA = Path(__file__).parent / "data"
PARITY = np.load(DATA / "hf_parity.npz")


def run(capsys, *argv):
    rc = main(["generate", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def generated_ids(out: str) -> list[list[int]]:
    return [json.loads(m) for m in re.findall(r"new \((?:length|stop)\): (\[.*\])", out)]


def test_default_tiny_preset_runs(capsys):
    rc, out, err = run(capsys, "--max-tokens", "6", "--num-prompts", "3", "--prompt-len", "20")
    assert rc == 0, err
    assert "preset 'tiny', random weights" in out
    assert "[0] prompt 20 tokens -> 6 new (length)" in out
    ids = generated_ids(out)
    assert len(ids) == 3 and all(len(t) == 6 for t in ids)
    assert re.search(r"throughput: [\d,.]+ tokens/s overall, [\d,.]+ tokens/s in decode", out)
    mapped = re.search(r"physical mapped at the end\s+([\d.]+) KiB", out)
    static = re.search(r"static cache 3 x 32768\s+([\d.]+) MiB = ([\d.]+)x the mapped memory", out)
    assert mapped and static and float(static.group(2)) > 1
    assert "closed: nothing reserved or mapped" in out
    assert "byte-level tokenizer" in out and len(re.findall(r"    text: '", out)) == 3  # presets show text too


def test_text_round_trips_on_the_tiny_preset(capsys):
    prompt = "héllo, vAttention ✓"
    rc, out, err = run(capsys, "--prompt", prompt, "--max-tokens", "4", "--ignore-eos")
    assert rc == 0, err
    assert f"[0] prompt {len(prompt.encode())} tokens -> 4 new (length)" in out  # one token per UTF-8 byte
    import models

    tok = models.tokenizer_for(models.get_preset("tiny"))
    for text in ("héllo, vAttention ✓", "  tabs\tand\nnewlines", "日本語 🙂", ""):
        ids = tok.encode(text).ids
        assert ids == list(text.encode()) and tok.decode(ids) == text
    assert models.tokenizer_for(models.get_preset("tiny").replace(vocab_size=128)) is None
    with pytest.raises(ValueError, match="vocab_size >= 258"):
        models.byte_level_tokenizer(200)


def test_hf_checkpoint_matches_transformers_greedy(capsys):
    prompt = " ".join(str(t) for t in PARITY["llama_gen_prompt"][0])
    want = PARITY["llama_gen_tokens"].tolist()
    rc, out, err = run(capsys, "--model", str(DATA / "hf_llama"), "--prompt-ids", prompt, "--max-tokens",
                       str(len(want)), "--ignore-eos")
    assert rc == 0, err
    assert "LlamaForCausalLM" in out and "float32 on cpu" in out
    assert generated_ids(out) == [want]


def make_tokenizer(directory: Path, vocab_size: int) -> None:
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.save(str(directory / "tokenizer.json"))


def test_text_prompts_with_tokenizer(tmp_path, capsys):
    d = tmp_path / "llama"
    shutil.copytree(DATA / "hf_llama", d)
    make_tokenizer(d, 128)
    rc, out, err = run(capsys, "--model", str(d), "--prompt", "w5 w17 w99", "--prompt", "w3",
                       "--max-tokens", "5", "--ignore-eos")
    assert rc == 0, err
    texts = re.findall(r"    text: '(.*)'", out)
    assert len(texts) == 2 and all(re.fullmatch(r"(w\d+ ?){5}", t) for t in texts), out
    rc, out2, _ = run(capsys, "--model", str(d), "--prompt-ids", "5 17 99", "--max-tokens", "5", "--ignore-eos")
    assert re.findall(r"    text: '(.*)'", out2) == texts[:1]  # the same tokens as the id prompt
    (d / "tokenizer.json").unlink()
    rc, out3, _ = run(capsys, "--model", str(d), "--prompt-ids", "5 17 99", "--max-tokens", "5", "--ignore-eos")
    assert " ".join(f"w{i}" for i in generated_ids(out3)[0]) == texts[0]


def test_static_cache_sampling_and_progress(capsys):
    rc, out, err = run(capsys, "--cache", "static", "--max-tokens", "24", "--progress", "on", "--decode-chunk",
                       "5", "--temperature", "0.9", "--top-k", "50", "--top-p", "0.95", "--seed", "3",
                       "--prefill-chunk", "16")
    assert rc == 0, err
    assert "static cache" in out and "physical mapped" not in out
    assert "decode" in err  # the tqdm bar
    assert all(len(t) == 24 for t in generated_ids(out))


def _corrupt_dir(tmp_path):
    d = tmp_path / "corrupt"
    shutil.copytree(DATA / "hf_mistral", d)
    (d / "model.safetensors").write_bytes(b"\x00" * 100)
    return d


def _no_tokenizer_dir(tmp_path):
    d = tmp_path / "no_tokenizer"
    shutil.copytree(DATA / "hf_llama", d)
    (d / "tokenizer.json").unlink()
    return d


@pytest.mark.parametrize("argv,message", [
    (["--preset", "llama-5"], "unknown preset 'llama-5'"),
    (["--model", "/nonexistent/model"], "model directory '/nonexistent/model' does not exist"),
    (["--model", "CORRUPT"], "cannot read safetensors file"),
    (["--max-tokens", "0"], "max_tokens must be a positive int, got 0"),
    (["--prompt-ids", " ".join(["7"] * 20), "--max-seq", "16"], "20 tokens, longer than max_seq=16"),
    (["--prompt-ids", "1 2 3", "--max-seq", "16", "--max-tokens", "15"], "need 17 cache tokens"),
    (["--model", "HF_NO_TOKENIZER", "--prompt", "hello"], "this model directory has no tokenizer.json"),
    (["--top-p", "0"], "top_p must be in"),
])
def test_bad_input_exits_nonzero_with_message(tmp_path, capsys, argv, message):
    places = {"CORRUPT": lambda: str(_corrupt_dir(tmp_path)),
              "HF_NO_TOKENIZER": lambda: str(_no_tokenizer_dir(tmp_path))}
    argv = [places[a]() if a in places else a for a in argv]
    rc, out, err = run(capsys, *argv)
    assert rc == 2
    assert "error: " in err and message in err, err
    assert "Traceback" not in err and "closed: nothing reserved" not in out  # stopped before any cache work


def test_console_entry_point_subprocess():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    ok = subprocess.run([sys.executable, "-m", "jax_vattention_cli", "generate", "--max-tokens", "4",
                         "--num-prompts", "2", "--prompt-len", "8"], capture_output=True, text=True, env=env,
                        timeout=300)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "closed: nothing reserved or mapped" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "jax_vattention_cli", "generate", "--max-tokens", "-1"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2 and "error: max_tokens must be a positive int" in bad.stderr


def test_bench_runs_the_engine_on_a_synthetic_workload(capsys):
    argv = ["bench", "--requests", "6", "--prompt-median", "12", "--output-median", "10", "--max-batch", "4",
            "--chunk-size", "64", "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    # packed steps: one shape per token bucket, 16 .. 512 (the default token budget) in steps of 2^k and 3 * 2^(k-1)
    assert "6 (6 complete)" in out and "output tok/s" in out and "peak batch" in out and "compiled 11 step" in out
    assert "closed: nothing reserved or mapped" in out


@pytest.mark.parametrize("argv,message", [(["--requests", "0"], "--requests must be positive"),
                                          (["--preset", "nope"], "nope")])
def test_bench_bad_input_exits_nonzero_with_message(capsys, argv, message):
    assert main(["bench", "--no-progress", *argv]) == 2
    assert message in capsys.readouterr().err
