"""Make the HF-parity test data: tiny random Llama, Qwen2 and Mistral checkpoints plus transformers logits.

Needs torch and transformers, which the project (and CI) does not: run it from a
separate virtual environment, e.g.

    python3.11 -m venv /tmp/hfvenv && /tmp/hfvenv/bin/pip install torch transformers safetensors
    /tmp/hfvenv/bin/python tests/data/make_hf_parity.py

It writes, next to itself:

* ``hf_llama/``   LlamaForCausalLM, Llama-3.1 rope scaling (factor 8, original context 16, so the
                  scaling changes most frequencies), GQA 4:2, untied head.
* ``hf_qwen2/``   Qwen2ForCausalLM, q/k/v biases, GQA 4:1, tied embeddings, saved *sharded*
                  (``model.safetensors.index.json`` + several shards).
* ``hf_mistral/`` MistralForCausalLM, explicit head_dim (32) != hidden/heads (16), GQA 4:2,
                  sliding_window 4096 (longer than anything the tests run).
* ``hf_parity.npz`` per model: ``<name>_input_ids [2, 11]`` and the fp32 eager-attention logits
                  ``<name>_logits [2, 11, V]``; ``<name>_gen_prompt [1, 5]`` and
                  ``<name>_gen_tokens [8]``, transformers' greedy ``generate`` continuation.

Every weight is re-drawn from a seeded normal (norm weights around 1, non-zero
biases) so that biases, norms and the rope scaling all move the logits.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

HERE = Path(__file__).resolve().parent
COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2, rms_norm_eps=1e-5,
              max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def models():
    llama = LlamaConfig(
        **COMMON, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16},
        rope_theta=10000.0,
    )
    qwen2 = Qwen2Config(**COMMON, num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True,
                        rope_theta=1000000.0, use_sliding_window=False)
    mistral = MistralConfig(**COMMON, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                            tie_word_embeddings=False, rope_theta=10000.0, sliding_window=4096)
    return [("llama", LlamaForCausalLM, llama, 1, None), ("qwen2", Qwen2ForCausalLM, qwen2, 2, "40KB"),
            ("mistral", MistralForCausalLM, mistral, 3, None)]


def randomize(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if "norm" in name:
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.2 * noise)
            else:
                p.copy_(noise * (2.0 / p.shape[-1] ** 0.5))


def main() -> None:
    out = {}
    for name, cls, cfg, seed, shard in models():
        torch.manual_seed(seed)
        cfg._attn_implementation = "eager"
        model = cls(cfg).to(torch.float32).eval()
        randomize(model, seed)
        path = HERE / f"hf_{name}"
        shutil.rmtree(path, ignore_errors=True)
        kwargs = {"max_shard_size": shard} if shard else {}
        model.save_pretrained(path, **kwargs)
        for extra in path.glob("generation_config.json"):
            extra.unlink()  # not needed by the loader
        rng = np.random.default_rng(seed)
        ids = torch.tensor(rng.integers(3, cfg.vocab_size, size=(2, 11)), dtype=torch.long)
        with torch.no_grad():
            logits = model(ids).logits.float().numpy()
        prompt = torch.tensor(rng.integers(3, cfg.vocab_size, size=(1, 5)), dtype=torch.long)
        with torch.no_grad():
            gen = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
                                 do_sample=False, eos_token_id=None, pad_token_id=0)
        out[f"{name}_input_ids"] = ids.numpy().astype(np.int32)
        out[f"{name}_logits"] = logits.astype(np.float32)
        out[f"{name}_gen_prompt"] = prompt.numpy().astype(np.int32)
        out[f"{name}_gen_tokens"] = gen[0, prompt.shape[1]:].numpy().astype(np.int32)
        files = sorted(p.name for p in path.iterdir())
        print(f"{name}: {files}, logits |max| {np.abs(logits).max():.3f}, greedy {out[f'{name}_gen_tokens']}")
    np.savez_compressed(HERE / "hf_parity.npz", **out)
    (HERE / "hf_parity_versions.json").write_text(json.dumps(
        {"torch": torch.__version__, "transformers": transformers.__version__, "numpy": np.__version__},
        indent=2) + "\n")


if __name__ == "__main__":
    main()
