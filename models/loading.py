"""Load a Llama-family model from a local Hugging Face directory (``config.json`` + ``*.safetensors``).

    model = load_model("/path/to/Llama-3.2-1B", dtype="bfloat16")

* Single-file (``model.safetensors``) and sharded checkpoints
  (``model.safetensors.index.json`` naming the shard of every tensor).
* Tensors are read one at a time with the safetensors library onto the default
  jax device, transposed to the ``[in, out]`` kernel layout where needed and
  converted to ``dtype`` (fp32 or bf16), whatever dtype the file stores.
* Every problem is a ``CheckpointError`` (or ``UnsupportedModelError``) naming
  the file and tensor: a missing directory, config or shard, a corrupt file, a
  missing tensor, a shape mismatch.
"""

from __future__ import annotations

import functools
import json
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from .config import ModelConfig
from .errors import CheckpointError
from .llama import LlamaForCausalLM, abstract_model
from .sharding import check_divisible, param_sharding

LOAD_DTYPES = ("float32", "bfloat16", "float16")
# Buffers some checkpoints carry that are not parameters (recomputed from the config).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def hf_name(path: tuple) -> tuple[str, bool]:
    """HF tensor name of an NNX parameter path, and whether the tensor is stored transposed."""
    parts = [str(p) for p in path]
    leaf = parts[-1]
    if leaf == "kernel":
        return ".".join(parts[:-1] + ["weight"]), True
    if leaf == "embedding":
        return ".".join(parts[:-1] + ["weight"]), False
    return ".".join(parts), False


def checkpoint_files(directory: Path) -> dict[str, Path]:
    """Map every tensor name to the safetensors file that holds it."""
    from safetensors import safe_open

    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{index}: corrupt index ({type(e).__name__}: {e})") from None
        files = {}
        for name, shard in weight_map.items():
            path = directory / shard
            if not path.is_file():
                raise CheckpointError(f"{index}: shard {shard!r} (holding {name!r}) is missing")
            files[name] = path
        return files
    shards = sorted(directory.glob("*.safetensors"))
    if not shards:
        raise CheckpointError(f"{directory}: no *.safetensors files (only safetensors checkpoints are supported)")
    files = {}
    for shard in shards:
        for name in _open(shard, safe_open).keys():
            files[name] = shard
    return files


def _open(path: Path, safe_open, framework: str = "flax"):
    try:
        return safe_open(str(path), framework=framework)
    except Exception as e:  # safetensors raises its own SafetensorError / OSError variants
        raise CheckpointError(f"{path}: cannot read safetensors file ({type(e).__name__}: {e})") from None


def load_model(directory: str | Path, *, dtype="float32", config: ModelConfig | None = None, mesh: Mesh | None = None,
               axis: str = "tp") -> LlamaForCausalLM:
    """A ``LlamaForCausalLM`` with the checkpoint's weights, converted to ``dtype``.

    With ``mesh``, the model comes out tensor-parallel over ``mesh``'s ``axis`` (``models.sharding``): each tensor
    is read to host memory, converted there and sent to its shards, so every device receives only its part and no
    device ever holds a whole weight.
    """
    from safetensors import safe_open

    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"model directory {str(directory)!r} does not exist")
    dtype = jnp.dtype(dtype).name
    if dtype not in LOAD_DTYPES:
        raise CheckpointError(f"dtype must be one of {LOAD_DTYPES}, got {dtype!r}")
    cfg = config or ModelConfig.from_hf_json(directory)
    if mesh is not None:
        check_divisible(cfg, mesh.shape[axis])
    files = checkpoint_files(directory)
    graphdef, abstract_state = nnx.split(abstract_model(cfg, dtype=dtype))
    flat = nnx.to_flat_state(abstract_state)
    handles: dict[Path, Any] = {}  # safetensors handles
    wanted = set()
    loaded = []
    for path, var in flat:
        name, transposed = hf_name(path)
        wanted.add(name)
        if name not in files:
            raise CheckpointError(
                f"{directory}: tensor {name!r} is missing from the checkpoint (config {cfg.architecture}, "
                f"{cfg.num_layers} layers, tie_word_embeddings={cfg.tie_word_embeddings})")
        file = files[name]
        if file not in handles:
            handles[file] = _open(file, safe_open, "flax" if mesh is None else "numpy")
        try:
            tensor = handles[file].get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"{file}: cannot read tensor {name!r} ({type(e).__name__}: {e})") from None
        want = tuple(var.shape)
        got = tuple(tensor.shape)
        expect = want[::-1] if transposed else want
        if got != expect:
            raise CheckpointError(f"{file}: tensor {name!r} has shape {list(got)}, the config implies {list(expect)}")
        if mesh is None:
            value = _convert(tensor, transposed, dtype)
        else:  # host conversion, then only each device's part goes to it
            host = np.asarray(tensor.T if transposed else tensor).astype(jnp.dtype(dtype))
            value = jax.device_put(host, param_sharding(path, host.ndim, mesh, axis))
        loaded.append((path, var.replace(value)))
    extra = sorted(n for n in files if n not in wanted and not n.endswith(IGNORED_SUFFIXES)
                   and not (cfg.tie_word_embeddings and n == "lm_head.weight"))
    if extra:
        warnings.warn(f"{directory}: ignoring {len(extra)} tensor(s) the model does not use: {extra[:5]}",
                      stacklevel=2)
    state = nnx.from_flat_state(loaded)
    return nnx.merge(graphdef, state)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _convert(tensor, transposed: bool, dtype: str):
    x = tensor.T if transposed else tensor
    return x.astype(dtype)


def load_tokenizer(directory: str | Path):
    """The ``tokenizers.Tokenizer`` of ``directory/tokenizer.json``, or None if there is none."""
    path = Path(directory) / "tokenizer.json"
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:
        raise CheckpointError(f"{path}: cannot load tokenizer ({type(e).__name__}: {e})") from None


def load_chat_template(directory: str | Path):
    """The ``jax_vattention.chat.ChatTemplate`` of a checkpoint directory, or None without one.

    Read as ``transformers`` does: the template is ``chat_template.jinja`` when there is one (newer
    ``transformers`` save it there), else ``tokenizer_config.json``'s ``chat_template``: a string, or a list of
    ``{"name", "template"}`` whose ``default`` entry is taken. ``bos_token`` / ``eos_token`` come from
    ``tokenizer_config.json``, else ``special_tokens_map.json`` (older checkpoints keep them only there), and may
    be strings, ``{"content": ...}`` dicts or null.
    """
    from jax_vattention.chat import ChatTemplate

    directory = Path(directory)
    cfg = _read_json(directory / "tokenizer_config.json")
    special = _read_json(directory / "special_tokens_map.json")
    template: Any = cfg.get("chat_template")
    path = directory / "chat_template.jinja"
    if path.is_file():
        try:
            template = path.read_text(encoding="utf-8")
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
    else:
        path = directory / "tokenizer_config.json"
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is None:
        return None
    if not isinstance(template, str):
        raise CheckpointError(f"{path}: chat_template must be a string or a list of named templates")

    def token(name: str) -> str:
        value = cfg[name] if name in cfg else special.get(name)
        if isinstance(value, dict):
            value = value.get("content")
        if value is not None and not isinstance(value, str):
            raise CheckpointError(f"{directory}: {name} must be a string or {{'content': ...}}, got {value!r:.40}")
        return value or ""

    return ChatTemplate(template, token("bos_token"), token("eos_token"))


def _read_json(path: Path) -> dict:
    """The JSON object in ``path``, or {} if there is no such file."""
    if not path.is_file():
        return {}
    try:
        out = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
    if not isinstance(out, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(out).__name__}")
    return out
