"""``models`` as a ``jax_vattention`` model source: ``LLM("/path/to/hf-dir")`` and ``LLM("tiny")``.

Declared in pyproject.toml under the entry-point group ``jax_vattention.models`` (the library finds it there and
never imports this package). A directory is a Hugging Face checkpoint: ``load_model`` with its ``tokenizer.json``
(None without one) and the chat template of its ``tokenizer_config.json``. A preset name gives random weights
(``seed``) with the byte-level tokenizer and chat template (None when the vocabulary is too small for them).
"""

from __future__ import annotations

from pathlib import Path

from jax_vattention.engine.loaders import LoadedModel

from .config import PRESETS, get_preset
from .llama import random_model
from .loading import load_chat_template, load_model, load_tokenizer
from .tokenizer import chat_template_for, tokenizer_for


class ModelsSource:
    """Hugging Face directories and the presets of ``models.PRESETS``."""

    def load(self, source: str, *, dtype: str, seed: int, mesh=None) -> LoadedModel | None:
        """``mesh``: tensor parallelism, the weights loaded (or initialized) straight into their shards."""
        path = Path(source)
        if path.is_dir():
            model = load_model(path, dtype=dtype, mesh=mesh)
            return LoadedModel(model, load_tokenizer(path), load_chat_template(path), path.resolve().name)
        if source in PRESETS:
            model = random_model(get_preset(source), seed=seed, dtype=dtype, mesh=mesh)
            return LoadedModel(model, tokenizer_for(model.config), chat_template_for(model.config), source)
        return None

    def describe(self) -> str:
        return (f"a Hugging Face checkpoint directory (config.json and *.safetensors) or a preset name "
                f"({', '.join(PRESETS)})")


SOURCE = ModelsSource()
