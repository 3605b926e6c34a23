"""OpenAI request bodies (the fields this server honours) and OpenAI-style errors."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class OpenAIError(Exception):
    """An error the client caused: answered as ``{"error": {...}}`` with a 4xx status."""

    def __init__(self, message: str, *, status: int = 400, type: str = "invalid_request_error",
                 param: str | None = None):
        super().__init__(message)
        self.status, self.type, self.param = status, type, param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": None}}


class StreamOptions(BaseModel):
    """OpenAI's ``stream_options``: ``include_usage`` adds a last chunk (``choices: []``) with the request's usage;
    vLLM's ``continuous_usage_stats`` puts the usage so far in every chunk too (a client counts each chunk's
    tokens from it)."""

    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False
    continuous_usage_stats: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")  # kept in ``model_extra``, where ``check_supported`` looks

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Ranges are SamplingParams' to check (its ValueError becomes the 400); None is the neutral value.
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    # vLLM's extensions to the OpenAI API
    top_k: int = 0
    ignore_eos: bool = False
    min_p: float | None = None
    min_tokens: int | None = None
    repetition_penalty: float | None = None
    stop_token_ids: list[int] | None = None
    best_of: int | None = None  # only best_of == n (what it means when nothing is ranked)


# OpenAI / vLLM fields this server does not implement: refused when set to anything but their neutral value,
# never silently ignored.
UNSUPPORTED: dict[str, Any] = {
    "echo": False, "suffix": None, "logit_bias": None, "prompt_logprobs": None, "top_logprobs": None,
    "tools": None, "tool_choice": "none", "functions": None, "function_call": None, "response_format": None,
    "use_beam_search": False, "include_stop_str_in_output": False, "allowed_token_ids": None, "bad_words": None,
    "truncate_prompt_tokens": None, "guided_json": None, "guided_regex": None, "guided_choice": None,
    "guided_grammar": None, "structured_outputs": None}


def check_supported(body: _Sampling) -> None:
    extra = body.model_extra or {}
    for name, default in UNSUPPORTED.items():
        if extra.get(name, default) not in (None, default, {}, []):
            raise OpenAIError(f"{name} is not supported by this server", param=name)
    if body.stream_options is not None and not body.stream:
        raise OpenAIError("stream_options is only allowed with stream: true", param="stream_options")
    if body.best_of is not None and body.best_of != body.n:
        raise OpenAIError(f"best_of={body.best_of} is not supported by this server (only best_of == n)",
                          param="best_of")


class CompletionRequest(_Sampling):
    prompt: str | list[int]
    max_tokens: int | None = Field(default=16, ge=1)
    logprobs: int | None = None  # the legacy format: the sampled token's logprob plus the top ``logprobs``


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: str


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = False
    top_logprobs: int | None = None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())
