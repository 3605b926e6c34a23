"""Model sources: ``LLM("tiny")`` or ``LLM("/path/to/hf-dir")``, resolved by loaders that model packages register.

The library never imports a model package (``models`` sits above it). A package that can turn a string into a
model offers a ``ModelSource`` under the entry-point group ``jax_vattention.models``; this distribution declares
``models``' own (``models.source:SOURCE``: a Hugging Face directory, or a preset name with random weights)::

    [project.entry-points."jax_vattention.models"]
    models = "models.source:SOURCE"

``register_model_source`` adds one at run time (it is asked before the entry points). ``load_model_source`` asks
each in turn; the first that recognises the string returns a ``LoadedModel`` (the model, its tokenizer and chat
template when it has them, and a name); when none does, the error lists what each accepts.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ..chat import ChatTemplate
from ..manager import default_device
from ..text import TextTokenizer
from .protocol import CausalLM

GROUP = "jax_vattention.models"


class ModelSourceError(ValueError):
    """A string names no model any installed source can load."""


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """What a source gives ``LLM``: the model, its tokenizer and chat template (None when it has none), a name."""

    model: CausalLM
    tokenizer: TextTokenizer | None = None
    chat_template: ChatTemplate | None = None
    name: str | None = None  # what a server calls it (a directory's base name, a preset's name)


@runtime_checkable
class ModelSource(Protocol):
    """Turns a string into a model: ``load`` returns None for a string it does not recognise (another source may),
    and raises for one it recognises but cannot load (a broken checkpoint). For tensor parallelism the engine also
    passes ``mesh=`` (a ``jax.sharding.Mesh`` with the axis ``"tp"``): a source that accepts it loads the weights
    straight into their shards; one that does not is given no mesh, and the engine places the loaded model."""

    def load(self, source: str, *, dtype: str, seed: int) -> LoadedModel | None: ...

    def describe(self) -> str:
        """What it accepts, for the error when nothing does (e.g. the preset names)."""
        ...


_registered: list[ModelSource] = []


def register_model_source(source: ModelSource) -> None:
    """Ask ``source`` (before the entry points and earlier registrations) when a model is given as a string."""
    if not isinstance(source, ModelSource):
        raise TypeError(f"a model source needs load(source, *, dtype, seed) and describe(), "
                        f"got {type(source).__name__}")
    _registered.insert(0, source)


def model_sources() -> list[ModelSource]:
    """The registered sources, then those of the ``jax_vattention.models`` entry points (by name)."""
    found = list(_registered)
    for ep in sorted(entry_points(group=GROUP), key=lambda e: e.name):
        source = ep.load()
        if not isinstance(source, ModelSource):
            raise TypeError(f"entry point {ep.name} = {ep.value} of {GROUP!r} is not a ModelSource")
        found.append(source)
    return found


def default_model_dtype() -> str:
    """The dtype a model loaded from a string gets unless ``LLM(..., dtype=...)`` says: bf16 on a GPU, else fp32."""
    return "bfloat16" if default_device().platform == "gpu" else "float32"


def load_model_source(source: str | os.PathLike, *, dtype: str | None = None, seed: int = 0,
                      mesh=None) -> LoadedModel:
    """The model ``source`` names (a directory, a preset, ...), from the first source that recognises it.

    ``dtype``: the parameters' (default ``default_model_dtype()``); ``seed``: random weights, where a source makes
    them (presets); ``mesh``: tensor parallelism, passed to sources whose ``load`` takes it (``ModelSource``).
    """
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"a model source is a string or a path, got {type(source).__name__}")
    text = os.fspath(source)
    if not isinstance(text, str):
        raise TypeError(f"a model source is a string or a path, got {source!r}")
    sources = model_sources()
    for s in sources:
        kw: dict[str, Any] = dict(dtype=dtype or default_model_dtype(), seed=seed)
        if mesh is not None and "mesh" in inspect.signature(s.load).parameters:
            kw["mesh"] = mesh
        loaded = s.load(text, **kw)
        if loaded is not None:
            if not isinstance(loaded, LoadedModel):
                raise TypeError(f"{type(s).__name__}.load returned {type(loaded).__name__}, not a LoadedModel")
            return loaded
    if not sources:
        raise ModelSourceError(f"cannot load the model {text!r}: no model source is installed (the entry-point "
                               f"group {GROUP!r} is empty; reinstall jax-vattention, or pass a model object)")
    accepted = "; ".join(s.describe() for s in sources)
    missing = " (no such directory)" if os.sep in text or text.startswith(".") else ""
    raise ModelSourceError(f"cannot load the model {text!r}{missing}: expected {accepted}")


def load_tokenizer_file(path: str | os.PathLike) -> Any:
    """A ``tokenizers.Tokenizer`` from a ``tokenizer.json`` file, or a directory holding one."""
    p = Path(path)
    file = p / "tokenizer.json" if p.is_dir() else p
    if not file.is_file():
        raise ValueError(f"tokenizer {os.fspath(path)!r}: no such file, nor a directory with a tokenizer.json")
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:
        raise ValueError(f"{file}: cannot load the tokenizer ({type(e).__name__}: {e})") from None
