"""Chat prompts: a conversation rendered with the checkpoint's chat template, as Hugging Face defines it.

A chat template is a Jinja2 template (``tokenizer_config.json``'s ``chat_template``) over ``messages`` (a list
of ``{"role", "content"}``), ``add_generation_prompt``, ``bos_token`` and ``eos_token``. It is rendered the way
``transformers`` does: in a sandboxed environment with ``trim_blocks`` and ``lstrip_blocks``, and with
``raise_exception`` available to the template.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

ROLES = ("system", "user", "assistant", "tool")


class ChatTemplateError(ValueError):
    """A template that does not render, or a conversation that is not a list of role/content messages."""


def check_messages(messages: Any, index: int | None = None) -> list[dict[str, str]]:
    """``messages`` as a list of ``{"role", "content"}`` dicts, or ``ChatTemplateError`` naming the bad one."""
    what = "the conversation" if index is None else f"conversation {index}"
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence) or not messages:
        raise ChatTemplateError(f"{what} must be a non-empty list of {{'role', 'content'}} messages, "
                                f"got {messages!r:.80}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ChatTemplateError(f"{what}: message {i} must be a dict with string 'role' and 'content', "
                                    f"got {m!r:.80}")
        if m["role"] not in ROLES:
            raise ChatTemplateError(f"{what}: message {i} has role {m['role']!r}; expected one of {ROLES}")
        out.append(dict(m))
    return out


@functools.lru_cache(maxsize=8)
def _compile(template: str):
    try:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ChatTemplateError("chat templates need jinja2 (pip install jinja2)") from None

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template)
    except TemplateError as e:
        raise ChatTemplateError(f"the chat template does not parse: {e}") from None


def render_chat(template: str, messages: Any, *, add_generation_prompt: bool = True, bos_token: str = "",
                eos_token: str = "") -> str:
    """The prompt text of one conversation."""
    if not isinstance(template, str) or not template:
        raise ChatTemplateError(f"a chat template must be a non-empty string, got {template!r:.80}")
    messages = check_messages(messages)
    compiled = _compile(template)
    from jinja2.exceptions import TemplateError

    try:
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, bos_token=bos_token,
                               eos_token=eos_token)
    except TemplateError as e:
        raise ChatTemplateError(f"the chat template refused the conversation: {e}") from None


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """A chat template with the special-token strings it refers to (``tokenizer_config.json``'s fields)."""

    template: str
    bos_token: str = ""
    eos_token: str = ""

    def __post_init__(self):
        if not isinstance(self.template, str) or not self.template:
            raise ChatTemplateError(f"a chat template must be a non-empty string, got {self.template!r:.80}")
        for name in ("bos_token", "eos_token"):
            if not isinstance(getattr(self, name), str):
                raise ChatTemplateError(f"ChatTemplate.{name} must be a string, got {getattr(self, name)!r:.40}")
        _compile(self.template)  # a template that does not parse fails here, not at the first request

    def render(self, messages: Any, *, add_generation_prompt: bool = True) -> str:
        return render_chat(self.template, messages, add_generation_prompt=add_generation_prompt,
                           bos_token=self.bos_token, eos_token=self.eos_token)
